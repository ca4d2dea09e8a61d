"""Collect residual-stream activations at every layer, at chosen token positions, batched.

Only what directions need is stored: for each site a tensor of shape
``prompts x positions x layers x d_model`` (float32), never the per-token cache. Prompts are
left padded with an attention mask, so batched and one-at-a-time collection agree (tested).

Positions (``positions=``):

* ``"last"``: the last prompt token (with a chat template, the last token of the template);
* ``"mean"``: the mean over the prompt's tokens, BOS excluded (its norm is tens of times larger);
* ``"post_instruction"``: each token of the template after the instruction, as separate
  positions labelled ``post-k`` .. ``post-1`` (Arditi et al. 2024).

Two backends give the same numbers (tested): ``"fast"`` (default) places PyTorch hooks on the
plain ``transformers`` modules at the bridge's hook points and stops the forward pass after the
last layer needed, so the unembedding is never computed; ``"bridge"`` registers TransformerLens hooks
(``bridge.hooks(fwd_hooks=...)``) at the same hook names and stops the bridge's forward pass the
same way.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from refusal_dir.deprecation import renamed_keywords
from refusal_dir.errors import ConfigError, DataError
from refusal_dir.model import HookedModel, TokenBatch
from refusal_dir.sites import RESIDUAL_SITES, check_layer, check_site, hook_name

logger = logging.getLogger(__name__)

PositionRule = Literal["last", "mean", "post_instruction"]
POSITION_RULES: tuple[str, ...] = ("last", "mean", "post_instruction")

SiteActs = Float[Tensor, "prompts positions layers d_model"]


@dataclass(frozen=True)
class Activations:
    """Activations of a prompt set: ``acts[site]`` is ``prompts x positions x layers x d_model``."""

    acts: dict[str, SiteActs]
    positions: tuple[str, ...]
    layers: tuple[int, ...]
    n_prompts: int
    extra: dict[str, Any] = field(default_factory=dict)

    def site(self, site: str) -> SiteActs:
        if site not in self.acts:
            raise ConfigError(
                f"site {site!r} was not collected: collected are {', '.join(self.acts)}"
            )
        return self.acts[site]

    def mean(self, site: str) -> Float[Tensor, "positions layers d_model"]:
        """Mean over prompts, accumulated in float64."""
        return self.site(site).to(torch.float64).mean(dim=0)

    def select(self, indices: Sequence[int]) -> Activations:
        """The activations of a subset of prompts."""
        index = torch.as_tensor(list(indices), dtype=torch.long)
        return Activations(
            acts={name: tensor[index] for name, tensor in self.acts.items()},
            positions=self.positions,
            layers=self.layers,
            n_prompts=len(index),
        )

    def column(self, site: str, position: int, layer: int) -> Float[Tensor, "prompts d_model"]:
        """Every prompt's activation at one (position index, layer column)."""
        return self.site(site)[:, position, layer]

    def layer_mean(self, site: str, position: int, layer: int) -> Float[Tensor, " d_model"]:
        """The mean of :meth:`column`, accumulated in float64."""
        return self.column(site, position, layer).to(torch.float64).mean(dim=0)


class ActivationReader(Protocol):
    """What directions and layer scores read: :class:`Activations` in memory, or
    :class:`refusal_dir.store.StoredActivations` on disk (streamed, memory flat in the prompts)."""

    @property
    def positions(self) -> tuple[str, ...]: ...

    @property
    def layers(self) -> tuple[int, ...]: ...

    @property
    def n_prompts(self) -> int: ...

    def column(self, site: str, position: int, layer: int) -> Tensor: ...

    def layer_mean(self, site: str, position: int, layer: int) -> Tensor: ...

    def select(self, indices: Sequence[int]) -> ActivationReader: ...


def position_labels(rule: str, model: HookedModel) -> tuple[str, ...]:
    """The position labels a rule produces for this model's template."""
    if rule == "last":
        return ("last",)
    if rule == "mean":
        return ("mean",)
    if rule == "post_instruction":
        count = model.n_post_instruction_tokens
        if count == 0:
            raise ConfigError(
                "position 'post_instruction' needs a chat template with tokens after the "
                "instruction; this model's template has none: use position 'last'"
            )
        return tuple(f"post-{k}" for k in range(count, 0, -1))
    raise ConfigError(f"unknown position {rule!r}: choose one of {', '.join(POSITION_RULES)}")


def _gather(
    hidden: Tensor, rule: str, n_positions: int, mean_mask: Tensor
) -> Float[Tensor, "batch positions d_model"]:
    """Pick the stored positions out of a left-padded ``batch x pos x d_model`` tensor."""
    if rule == "mean":
        weights = mean_mask.to(device=hidden.device, dtype=torch.float64)  # blocks may sit on several devices
        summed = torch.einsum("bp,bpd->bd", weights, hidden.to(torch.float64))
        return (summed / weights.sum(dim=1, keepdim=True)).unsqueeze(1)
    return hidden[:, -n_positions:, :]


class _StopForward(Exception):
    """Raised inside a hook once every needed activation is stored."""


def _mean_mask(model: HookedModel, batch: TokenBatch) -> Tensor:
    mask = batch.attention_mask.clone()
    bos = model.tokenizer.bos_token_id
    if bos is not None:
        mask = mask * (batch.input_ids != bos).long()
    if (mask.sum(dim=1) == 0).any():
        raise DataError("a prompt has no tokens besides BOS: remove empty prompts")
    return mask


@dataclass(frozen=True)
class CollectionPlan:
    """A validated collection: the formatted texts, what is stored, and the batches.

    Batch ``k`` holds ``texts[k * batch_size : (k + 1) * batch_size]``; left padding makes a
    prompt's activations depend on its batch, so a resumed collection keeps the batch size.
    """

    texts: list[str]
    sites: tuple[str, ...]
    token: str
    labels: tuple[str, ...]
    layers: tuple[int, ...]
    batch_size: int
    backend: str

    @property
    def n_batches(self) -> int:
        return -(-len(self.texts) // self.batch_size)

    def rows(self, index: int) -> range:
        """The prompt rows of batch ``index``."""
        start = index * self.batch_size
        return range(start, min(start + self.batch_size, len(self.texts)))


def plan_collection(
    model: HookedModel,
    prompts: Sequence[str],
    *,
    sites: Sequence[str] = RESIDUAL_SITES,
    token: str | None = None,
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
    apply_chat_template: bool = True,
    backend: str = "fast",
) -> CollectionPlan:
    """Validate a collection's inputs (one-line errors) and format its prompts."""
    position = token or "last"
    if isinstance(prompts, str):
        raise DataError("prompts must be a list of strings, not one string")
    if len(prompts) == 0:
        raise DataError("the prompt set is empty: pass at least one prompt")
    if any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise DataError("a prompt is empty or not a string: remove it")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    for site in sites:
        check_site(site)
    layer_list = list(range(model.n_layers)) if layers is None else [int(x) for x in layers]
    for layer in layer_list:
        check_layer(layer, model.n_layers)
    labels = position_labels(position, model)
    if backend not in _BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}: choose fast or bridge")
    texts = model.format_prompts(prompts) if apply_chat_template else list(prompts)
    return CollectionPlan(
        texts=texts, sites=tuple(sites), token=position, labels=labels, layers=tuple(layer_list),
        batch_size=batch_size, backend=backend,
    )


def collect_batch(model: HookedModel, plan: CollectionPlan, index: int) -> dict[str, SiteActs]:
    """Batch ``index`` of the plan through the model: ``{site: batch x positions x layers x d}``."""
    rows = plan.rows(index)
    batch = model.tokenize(plan.texts[rows.start : rows.stop])
    if plan.token == "post_instruction":
        _check_post_instruction(model, batch)
    storage = _Storage(model, batch, plan.sites, plan.layers, plan.token, len(plan.labels))
    try:
        _BACKENDS[plan.backend](model, batch.to(model.device), storage, plan.sites, plan.layers)
    except _StopForward:
        pass
    return storage.stored


@renamed_keywords(position="token")
def collect_activations(
    model: HookedModel,
    prompts: Sequence[str],
    *,
    sites: Sequence[str] = RESIDUAL_SITES,
    token: str | None = None,
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
    apply_chat_template: bool = True,
    backend: Literal["fast", "bridge"] = "fast",
    progress: bool = True,
    description: str = "caching activations",
) -> Activations:
    """Run prompts through the model and store activations at the ``token`` rule's positions
    (``last`` (default), ``mean`` or ``post_instruction``; ``position=`` is its deprecated name).

    ``prompts`` are instructions, wrapped in the chat template unless
    ``apply_chat_template=False`` (then they must already be formatted, BOS included).
    Everything is kept in memory; :func:`refusal_dir.store.collect_to_store` writes the same
    activations to disk batch by batch instead.
    """
    plan = plan_collection(
        model, prompts, sites=sites, token=token, layers=layers, batch_size=batch_size,
        apply_chat_template=apply_chat_template, backend=backend,
    )
    out = {
        site: torch.zeros(len(plan.texts), len(plan.labels), len(plan.layers), model.d_model)
        for site in plan.sites
    }
    for index in tqdm(range(plan.n_batches), desc=description, disable=not progress, leave=False):
        rows = plan.rows(index)
        for site, stored in collect_batch(model, plan, index).items():
            out[site][rows.start : rows.stop] = stored
    return Activations(
        acts=out, positions=plan.labels, layers=plan.layers, n_prompts=len(plan.texts)
    )


def _check_post_instruction(model: HookedModel, batch: TokenBatch) -> None:
    expected = torch.tensor(model._post_instruction_ids)
    tails = batch.input_ids[:, -len(expected) :]
    if not bool((tails == expected).all()):
        raise DataError(
            "the prompts do not end with the chat template's post-instruction tokens: pass "
            "instructions with apply_chat_template=True, or use position 'last'"
        )


class _Storage:
    """The per-batch tensors one backend fills: ``stored[site]`` is ``batch x positions x layers x d``."""

    def __init__(
        self, model: HookedModel, batch: TokenBatch, sites: Sequence[str], layers: Sequence[int], rule: str, n_positions: int
    ) -> None:
        self.rule = rule
        self.n_positions = n_positions
        self.mean_mask = _mean_mask(model, batch).to(model.device)
        self.column = {layer: index for index, layer in enumerate(layers)}
        self.stored = {
            site: torch.zeros(len(batch), n_positions, len(layers), model.d_model) for site in sites
        }
        # The forward pass can stop once this (site, layer) is stored.
        self.last = ("resid_post" if "resid_post" in sites else "resid_pre", max(layers))

    def store(self, site: str, layer: int, hidden: Tensor) -> None:
        if site in self.stored and layer in self.column:
            picked = _gather(hidden, self.rule, self.n_positions, self.mean_mask)
            self.stored[site][:, :, self.column[layer], :] = picked.float().cpu()
        if (site, layer) == self.last:
            raise _StopForward


@torch.no_grad()
def _forward_fast(
    model: HookedModel, batch: TokenBatch, storage: _Storage, sites: Sequence[str], layers: Sequence[int]
) -> None:
    """Run ``batch`` (on the model's device) through the ``transformers`` model with forward
    hooks on the decoder blocks that hand each residual stream to ``storage``."""
    handles = []

    def make_pre_hook(layer: int):
        def hook(module: Any, args: tuple, kwargs: dict) -> None:
            storage.store("resid_pre", layer, args[0] if args else kwargs["hidden_states"])

        return hook

    def make_post_hook(layer: int):
        def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
            storage.store("resid_post", layer, output[0] if isinstance(output, tuple) else output)

        return hook

    try:
        for layer in range(max(layers) + 1):
            block = model.layers[layer]
            handles.append(block.register_forward_pre_hook(make_pre_hook(layer), with_kwargs=True))
            if "resid_post" in sites:
                handles.append(block.register_forward_hook(make_post_hook(layer), with_kwargs=True))
        model.hf(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            use_cache=False,
            logits_to_keep=1,
        )
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def _forward_bridge(
    model: HookedModel, batch: TokenBatch, storage: _Storage, sites: Sequence[str], layers: Sequence[int]
) -> None:
    """The same through TransformerLens hooks at the hook points. Stopped once the last one is
    stored: unlike run_with_cache(stop_at_layer=n_layers), this never computes the unembedding
    and keeps no per-token cache."""

    def make_hook(site: str, layer: int):
        def hook(act: Tensor, hook: Any) -> None:
            storage.store(site, layer, act)

        return hook

    fwd_hooks = [(hook_name(site, layer), make_hook(site, layer)) for site in sites for layer in layers]
    with model.bridge.hooks(fwd_hooks=fwd_hooks):
        model.bridge(batch.input_ids, attention_mask=batch.attention_mask, return_type=None)


_BACKENDS = {"fast": _forward_fast, "bridge": _forward_bridge}
"""How a batch is run while :class:`_Storage` keeps the activations; each raises
:class:`_StopForward` (from ``storage.store``) once the last needed activation is stored."""
