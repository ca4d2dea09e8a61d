"""Plain reference implementations that share no code with refusal_dir's hooks.

Written the obvious way and slowly: one prompt at a time, the whole sequence recomputed for
every new token (no KV cache), one plain PyTorch pre-hook that adds a vector at absolute
positions chosen by index. A KV offset that goes wrong in :func:`refusal_dir.steer` or
:func:`refusal_dir.bridge_hooks` (say, read from a ``transformers`` keyword that a release
renamed) makes the library disagree with this reference.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch


def until_stop(ids: list[int], stop_ids: set[int]) -> list[int]:
    """The tokens before the first stop token."""
    kept: list[int] = []
    for token in ids:
        if token in stop_ids:
            break
        kept.append(token)
    return kept


@contextmanager
def plain_addition(
    model, vector: torch.Tensor | None, rule: str, *, layer: int, alpha: float, prompt_length: int
) -> Iterator[None]:
    """One plain pre-hook on ``layer`` adding ``alpha * vector`` at the absolute positions of
    ``rule`` (positions from ``prompt_length`` on are generated); ``vector=None``: no hook."""

    def add(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        position = torch.arange(hidden.shape[1])
        covered = {
            "all": torch.ones_like(position, dtype=torch.bool),
            "prompt": position < prompt_length,
            "generated": position >= prompt_length,
        }[rule]
        edited = hidden + alpha * vector * covered.view(1, -1, 1).to(hidden.dtype)
        if args:
            return (edited, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": edited}

    handle = None if vector is None else model.layers[layer].register_forward_pre_hook(add, with_kwargs=True)
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


@torch.no_grad()
def reference_tokens(
    model,
    prompts: Sequence[str],
    vector: torch.Tensor | None,
    rule: str,
    *,
    layer: int,
    alpha: float,
    n_new: int,
) -> list[list[int]]:
    """Greedy tokens under ``alpha * vector`` added at ``layer``'s input, at the positions of
    ``rule`` (``"all"``, ``"prompt"`` or ``"generated"``); ``vector=None``: unsteered."""
    stop_ids = set(model.stop_token_ids())
    results = []
    for text in model.format_prompts(prompts):
        ids = model._encode(text)
        prompt_length = len(ids)
        with plain_addition(model, vector, rule, layer=layer, alpha=alpha, prompt_length=prompt_length):
            for _ in range(n_new):
                logits = model.hf(input_ids=torch.tensor([ids]), use_cache=False).logits
                ids.append(int(logits[0, -1].argmax()))
        results.append(until_stop(ids[prompt_length:], stop_ids))
    return results


@torch.no_grad()
def reference_continuation_logprobs(
    model,
    prompt_ids: Sequence[int],
    continuation_ids: Sequence[int],
    vector: torch.Tensor | None = None,
    rule: str = "all",
    *,
    layer: int = 0,
    alpha: float = 0.0,
) -> torch.Tensor:
    """Per-token log-probabilities (float64) of ``continuation_ids`` after ``prompt_ids``: one
    unpadded sequence through ``model.hf``, ``log_softmax`` and a gather, with ``alpha * vector``
    added at ``layer``'s input at the positions of ``rule`` (the continuation counts as
    generated); ``vector=None``: unsteered."""
    ids = torch.tensor([list(prompt_ids) + list(continuation_ids)])
    prompt_length = len(prompt_ids)
    with plain_addition(model, vector, rule, layer=layer, alpha=alpha, prompt_length=prompt_length):
        logits = model.hf(input_ids=ids, use_cache=False).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    steps = logprobs[prompt_length - 1 : -1]
    return steps.gather(1, torch.tensor(list(continuation_ids)).view(-1, 1)).squeeze(1)
