"""Batched, KV-cached, greedy-by-default generation and scoring under interventions.

Prompts are left padded with an attention mask, so a batch gives the same tokens as one prompt
at a time (tested). Per-row coefficients (``addition(..., alpha=[...])``) are matched to rows
across batches: row ``i`` of the whole prompt list uses coefficient ``i``; their count must equal
the number of prompts.

Position rules outside generation: :func:`next_token_logits` and
:func:`continuation_logprobs` run the prompt as a prefill, so every position is a prompt
position. An addition restricted to ``positions="generated"`` changes nothing there (its KL is
0); it acts from the first generated token on. The continuation in
:func:`continuation_logprobs` is tokenized apart from its prompt and the ids are joined.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from refusal_dir.errors import ConfigError, DataError
from refusal_dir.interventions import Intervention, PositionState, check_rows, row_groups, steer
from refusal_dir.model import HookedModel, TokenBatch, pad_ids

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings; the defaults are the evaluation settings (greedy)."""

    max_new_tokens: int = 64
    batch_size: int = 16
    do_sample: bool = False
    temperature: float = 1.0
    stop_strings: tuple[str, ...] = ()
    use_cache: bool = True
    share_prefix: bool = False
    """Prefill the token ids every prompt of a batch begins with (a chat template's system
    prompt) once per group of rows the interventions treat alike, instead of once per row
    (:func:`split_prefix`). The same tokens as without, up to float rounding: a greedy
    near-tie may break the other way. Needs ``use_cache``; a batch that cannot share
    (:func:`prefix_sharing_blocked`) runs whole prompts."""
    drop_finished: bool | None = None
    """Greedy decoding: every :data:`DROP_EVERY` new tokens, rows that have emitted a stop token
    leave the batch, their KV cache with them, so the answers still going run without the
    finished ones (:func:`_decode_dropping`). The same tokens as without, up to float rounding
    (the batch's width changes). ``None`` (the default): on where the model runs on the CPU,
    whose decode steps cost in proportion to the rows; off on an accelerator, where a step of
    fewer rows is not faster (not measured: no GPU was lent). Never while sampling (it would
    change the random draws), without ``use_cache``, or where the model's generation config sets
    anything that a decode split into calls could change (:func:`dropping_blocked`)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.do_sample and not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0 when sampling, got {self.temperature}")


def _check_prompts(prompts: Sequence[str]) -> None:
    if isinstance(prompts, str):
        raise DataError("prompts must be a list of strings, not one string")
    if len(prompts) == 0:
        raise DataError("the prompt list is empty: pass at least one prompt")
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"prompt {index} is empty or not a string: remove it")


def _batches(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def shared_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """How many leading token ids all rows share, every row keeping at least one of its own."""
    if not rows:
        return 0
    limit, first = min(len(ids) for ids in rows) - 1, rows[0]
    length = 0
    while length < limit and all(ids[length] == first[length] for ids in rows):
        length += 1
    return length


_BLOCKED_SEEN: set[str] = set()  # each reason a prefix was not shared, logged once


def prefix_sharing_blocked(model: HookedModel, length: int) -> str | None:
    """Why a batch of sequences up to ``length`` positions long (prompt and new tokens) cannot
    take a shared prefix on this model (``None``: it can). A sliding-window layer counts its
    window in cache slots, and the padding after the prefix would push the prefix out of it
    sooner than whole prompts do; ``generate`` refuses a cache passed in when the model's
    generation config names a cache kind of its own."""
    config = model.hf.config.get_text_config()
    window, kinds = getattr(config, "sliding_window", None), getattr(config, "layer_types", None)
    slides = any("sliding" in str(kind) for kind in kinds) if kinds else getattr(config, "use_sliding_window", True)
    if slides and isinstance(window, int) and 0 < window < length:
        return f"a sliding window of {window} positions, shorter than {length}"
    return _own_cache(model)


def _own_cache(model: HookedModel) -> str | None:
    """The generation config's own cache kind, which ``generate`` keeps to itself (it refuses a
    cache passed in), as a reason; ``None`` for none or Gemma 2's "hybrid" (dropped by
    ``generate`` itself)."""
    kind = getattr(getattr(model.hf, "generation_config", None), "cache_implementation", None)
    return None if kind in (None, "hybrid") else f"the generation config's own cache ({kind})"


def split_prefix(
    model: HookedModel, texts: Sequence[str], *, new_tokens: int = 0, share: bool = True
) -> tuple[TokenBatch, int]:
    """Formatted texts as ``(batch, k)``: the ``k`` ids all rows share first, then each row's own
    ids left padded (the padding sits between the two; the mask has it, so generation's
    positions, derived from the mask, run on without a gap). ``k = 0`` (``share`` off, nothing
    shared, or a model that cannot share with ``new_tokens`` to come,
    :func:`prefix_sharing_blocked`) gives exactly :meth:`HookedModel.tokenize`'s batch."""
    if not share:
        return model.tokenize(texts), 0
    encoded = model.encode_prompts(texts)
    k = shared_prefix_length(encoded)
    blocked = prefix_sharing_blocked(model, max(len(ids) for ids in encoded) + new_tokens) if k else None
    if blocked is not None:
        if blocked not in _BLOCKED_SEEN:
            _BLOCKED_SEEN.add(blocked)
            logger.warning("the prompts' shared first tokens are prefilled with every prompt: %s", blocked)
        k = 0
    if k == 0:
        return TokenBatch(*pad_ids(encoded, model.pad_token_id)), 0
    own_ids, own_mask = pad_ids([ids[k:] for ids in encoded], model.pad_token_id)
    prefix = torch.tensor(encoded[0][:k], dtype=torch.long).expand(len(encoded), k)
    return TokenBatch(torch.cat([prefix, own_ids], dim=1), torch.cat([torch.ones_like(prefix), own_mask], dim=1)), k


def prefill_prefix(
    model: HookedModel,
    batch: TokenBatch,
    k: int,
    interventions: Sequence[Intervention],
    state: PositionState,
    rows: slice,
    n_rows: int,
) -> object:
    """The KV cache of the first ``k`` positions of ``batch`` for its ``rows`` (of ``n_rows``),
    computed once per group of rows the interventions treat alike
    (:func:`~refusal_dir.interventions.row_groups`) and spread to every row. Call after
    ``state.start``; the state then continues with the rows' own positions."""
    first, group = row_groups(interventions, rows, n_rows)
    state.rows = first
    output = model.hf(
        input_ids=batch.input_ids[: len(first), :k].contiguous().to(model.device), use_cache=True, logits_to_keep=1
    )
    cache = output.past_key_values
    cache.batch_select_indices(group)  # a CPU index serves layers on any device
    state.resume(rows)
    return cache


def _decode_row(model: HookedModel, ids: list[int], stop_ids: set[int], stop_strings: Sequence[str]) -> tuple[str, list[int]]:
    kept: list[int] = []
    for token in ids:
        if token in stop_ids:
            break
        kept.append(token)
    text = model.tokenizer.decode(kept, skip_special_tokens=True)
    for stop in stop_strings:
        if stop in text:
            text = text[: text.index(stop)]
    return text, kept


DROP_EVERY = 8
"""New tokens between two checks for finished rows (:attr:`GenerationSettings.drop_finished`)."""

_SPLIT_SAFE = frozenset({
    # what every call reads the same way: the token ids, the length limits (new tokens are
    # passed per call; min_length and max_length count the whole sequence), the cache switch
    "bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "max_length",
    "max_new_tokens", "min_length", "use_cache", "cache_implementation", "transformers_version",
    "_from_model_config",
    # sampling settings: greedy decoding ignores them
    "do_sample", "temperature", "top_p", "top_k", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff",
    # processors that read the whole sequence so far, prompt included, at every step
    "repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "suppress_tokens",
    "renormalize_logits", "remove_invalid_values",
    # what generate returns
    "output_attentions", "output_hidden_states", "output_scores", "output_logits", "return_dict_in_generate",
})
"""Generation-config fields a greedy decode split into several ``generate`` calls reads exactly
as one call does. Any other field set on the model's config keeps one call per batch (beam
search, forced or suppressed tokens at a call's start or end, watermarking, guidance, a time
limit, assisted decoding, ``min_new_tokens`` and length penalties counted from a call's start)."""


def _runs_on_cpu(model: HookedModel) -> bool:
    """Every layer computes on the CPU (a disk-offloaded one too), not only the embedding."""
    placed = getattr(model.hf, "hf_device_map", None) or {"": model.device}
    return all(str(where) in ("cpu", "disk") for where in placed.values())


def dropping_blocked(model: HookedModel, settings: GenerationSettings) -> str | None:
    """Why finished rows cannot leave the batch under ``settings`` (``None``: they can)."""
    wanted = settings.drop_finished if settings.drop_finished is not None else _runs_on_cpu(model)
    if not wanted or settings.do_sample or not settings.use_cache:
        return "off"
    config = getattr(model.hf, "generation_config", None)
    fields = config.to_diff_dict() if config is not None else {}
    for name in sorted(fields):
        if name not in _SPLIT_SAFE:
            return f"the generation config's {name}"
    return _own_cache(model)


@torch.no_grad()
def generate(
    model: HookedModel,
    prompts: Sequence[str],
    *,
    interventions: Sequence[Intervention] = (),
    settings: GenerationSettings | None = None,
    apply_chat_template: bool = True,
    progress: bool = True,
    seed: int | None = 0,
) -> list[str]:
    """Generate a completion for every prompt under the interventions (none: unsteered)."""
    return generate_tokens(
        model,
        prompts,
        interventions=interventions,
        settings=settings,
        apply_chat_template=apply_chat_template,
        progress=progress,
        seed=seed,
    )[0]


@torch.no_grad()
def generate_tokens(
    model: HookedModel,
    prompts: Sequence[str],
    *,
    interventions: Sequence[Intervention] = (),
    settings: GenerationSettings | None = None,
    apply_chat_template: bool = True,
    progress: bool = True,
    seed: int | None = 0,
) -> tuple[list[str], list[list[int]]]:
    """Like :func:`generate`, also returning the generated token ids (stop tokens cut)."""
    settings = settings or GenerationSettings()
    _check_prompts(prompts)
    check_rows(interventions, len(prompts))
    texts = model.format_prompts(prompts) if apply_chat_template else list(prompts)
    stop_ids = model.stop_token_ids()
    outputs: list[str] = []
    tokens: list[list[int]] = []
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        _generate_batches(model, texts, interventions, settings, stop_ids, outputs, tokens, progress)
    return outputs, tokens


def _generate_batches(
    model: HookedModel,
    texts: list[str],
    interventions: Sequence[Intervention],
    settings: GenerationSettings,
    stop_ids: list[int],
    outputs: list[str],
    tokens: list[list[int]],
    progress: bool,
) -> None:
    sampling = (
        {"do_sample": True, "temperature": settings.temperature}
        if settings.do_sample
        else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    )
    stops, dropping = set(stop_ids), dropping_blocked(model, settings) is None
    with steer(model, *interventions) as state:
        for rows in tqdm(
            _batches(len(texts), settings.batch_size),
            desc="generating",
            disable=not progress,
            leave=False,
        ):
            batch, k = split_prefix(
                model, texts[rows], new_tokens=settings.max_new_tokens, share=settings.share_prefix and settings.use_cache
            )
            state.start(rows, prompt_length=batch.input_ids.shape[1])
            cached = {} if k == 0 else {"past_key_values": prefill_prefix(model, batch, k, interventions, state, rows, len(texts))}
            batch = batch.to(model.device)
            call: dict[str, object] = {"eos_token_id": stop_ids, "pad_token_id": model.pad_token_id, "use_cache": settings.use_cache, **sampling}
            if dropping:
                new = _decode_dropping(model, batch, cached, settings.max_new_tokens, call, state, rows, stops)
            else:
                generated = model.hf.generate(
                    input_ids=batch.input_ids, attention_mask=batch.attention_mask, **cached,
                    max_new_tokens=settings.max_new_tokens, **call,
                )
                new = generated[:, batch.input_ids.shape[1] :].tolist()
            del cached  # the batch's KV cache, before the next batch builds its own
            for ids in new:
                text, kept = _decode_row(model, ids, stops, settings.stop_strings)
                outputs.append(text)
                tokens.append(kept)


def _decode_dropping(
    model: HookedModel,
    batch: TokenBatch,
    cached: dict[str, object],
    max_new_tokens: int,
    call: dict[str, object],
    state: PositionState,
    rows: slice,
    stop_ids: set[int],
) -> list[list[int]]:
    """Greedy decoding of ``batch`` in calls of :data:`DROP_EVERY` new tokens; between two
    calls the rows that emitted a stop token leave the batch and its KV cache. Each call goes
    on from the cache the last one returned (its last token not yet in it, as ``generate``
    leaves it), the state's rows following the rows still going. Returns every row's new ids
    (stop id included, nothing after it)."""
    ids, mask = batch.input_ids, batch.attention_mask
    going = torch.arange(ids.shape[0])  # batch rows still going, in the order of ``ids``
    new: list[list[int]] = [[] for _ in range(ids.shape[0])]
    left = max_new_tokens
    while left > 0:
        output = model.hf.generate(
            input_ids=ids, attention_mask=mask, **cached, max_new_tokens=min(DROP_EVERY, left),
            return_dict_in_generate=True, **call,
        )
        fresh = output.sequences[:, ids.shape[1] :]
        if fresh.shape[1] == 0:
            break
        left -= fresh.shape[1]
        finished = torch.zeros(len(going), dtype=torch.bool)
        for position, (row, tokens) in enumerate(zip(going.tolist(), fresh.tolist(), strict=True)):
            for token in tokens:
                new[row].append(token)
                if token in stop_ids:
                    finished[position] = True
                    break
        if left <= 0 or bool(finished.all()):
            break
        cache = output.past_key_values
        ids, mask = output.sequences, torch.cat([mask, torch.ones_like(fresh)], dim=1)
        if bool(finished.any()):
            keep = torch.nonzero(~finished).flatten()
            cache.batch_select_indices(keep)  # a CPU index serves layers on any device
            going = going[keep]
            ids, mask = ids[keep.to(ids.device)], mask[keep.to(mask.device)]
            state.resume(torch.arange(rows.start, rows.stop)[going])
        cached = {"past_key_values": cache}
    return new


@torch.no_grad()
def _forward_logits(
    model: HookedModel, batch: TokenBatch, *, keep: int
) -> Float[Tensor, "batch keep vocab"]:
    device_batch = batch.to(model.device)
    output = model.hf(
        input_ids=device_batch.input_ids,
        attention_mask=device_batch.attention_mask,
        use_cache=False,
        logits_to_keep=keep,
    )
    return output.logits.float()


@torch.no_grad()
def _prefixed_logits(model: HookedModel, batch: TokenBatch, k: int, cache: object) -> Float[Tensor, "batch 1 vocab"]:
    """Last-position logits of ``batch`` whose first ``k`` positions are in ``cache``."""
    device_batch = batch.to(model.device)
    mask = device_batch.attention_mask
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    output = model.hf(
        input_ids=device_batch.input_ids[:, k:],
        attention_mask=mask,
        position_ids=positions[:, k:],
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return output.logits.float()


@torch.no_grad()
def next_token_logits(
    model: HookedModel,
    prompts: Sequence[str],
    *,
    interventions: Sequence[Intervention] = (),
    batch_size: int = 16,
    apply_chat_template: bool = True,
    progress: bool = False,
    reduce: Callable[[Tensor], Tensor] | None = None,
    share_prefix: bool = False,
) -> Float[Tensor, "prompts vocab"]:
    """Logits of the token that would follow each prompt (float32, on the CPU).

    The result holds prompts x vocabulary floats (1 MiB per prompt on a 262k vocabulary).
    ``reduce`` maps each batch's ``batch x vocab`` logits to what is kept (say, the columns of
    a few answer letters), so that memory stays bounded by one batch; the reduced batches are
    concatenated along the first dimension. ``share_prefix``: as
    :attr:`GenerationSettings.share_prefix` (equal up to float rounding).
    """
    chunks = iter_next_token_logits(
        model,
        prompts,
        interventions=interventions,
        batch_size=batch_size,
        apply_chat_template=apply_chat_template,
        progress=progress,
        share_prefix=share_prefix,
    )
    try:
        return torch.cat([logits if reduce is None else reduce(logits) for _, logits in chunks])
    finally:
        chunks.close()  # leaves the steer() scope now, also when reduce raised


def iter_next_token_logits(
    model: HookedModel,
    prompts: Sequence[str],
    *,
    interventions: Sequence[Intervention] = (),
    batch_size: int = 16,
    apply_chat_template: bool = True,
    progress: bool = False,
    share_prefix: bool = False,
) -> Generator[tuple[slice, Float[Tensor, "batch vocab"]], None, None]:
    """``(rows, logits)`` per batch of :func:`next_token_logits`.

    The interventions stay live on the model between the batches this yields: run nothing
    else through the model while iterating (or exhaust or close the iterator first).
    """
    _check_prompts(prompts)
    check_rows(interventions, len(prompts))
    texts = model.format_prompts(prompts) if apply_chat_template else list(prompts)
    with torch.no_grad(), steer(model, *interventions) as state:
        for rows in tqdm(_batches(len(texts), batch_size), disable=not progress, leave=False):
            state.start(rows)
            batch, k = split_prefix(model, texts[rows], share=share_prefix)
            if k == 0:
                logits = _forward_logits(model, batch, keep=1)
            else:
                cache = prefill_prefix(model, batch, k, interventions, state, rows, len(texts))
                logits = _prefixed_logits(model, batch, k, cache)
                del cache
            yield rows, logits[:, -1].cpu()


@torch.no_grad()
def continuation_logprobs(
    model: HookedModel,
    prompts: Sequence[str],
    continuations: Sequence[str],
    *,
    interventions: Sequence[Intervention] = (),
    batch_size: int = 16,
    progress: bool = False,
    apply_chat_template: bool = True,
    reduction: str = "sum",
) -> Float[Tensor, " prompts"]:
    """Log-probability of each continuation given its prompt (sum or mean over its tokens)."""
    _check_prompts(prompts)
    if len(prompts) != len(continuations):
        raise DataError(
            f"{len(prompts)} prompts but {len(continuations)} continuations: pass one each"
        )
    if reduction not in ("sum", "mean"):
        raise ConfigError(f"unknown reduction {reduction!r}: choose sum or mean")
    check_rows(interventions, len(prompts))
    texts = model.format_prompts(prompts) if apply_chat_template else list(prompts)
    results = []
    with steer(model, *interventions) as state:
        for rows in tqdm(_batches(len(texts), batch_size), disable=not progress, leave=False):
            state.start(rows)
            prompt_ids = [model._encode(text) for text in texts[rows]]
            cont_ids = [model.encode_text(text) for text in continuations[rows]]
            if any(len(ids) == 0 for ids in cont_ids):
                raise DataError("a continuation tokenized to zero tokens: remove empty ones")
            full = [p + c for p, c in zip(prompt_ids, cont_ids)]
            batch = TokenBatch(*pad_ids(full, model.pad_token_id))
            longest = max(len(ids) for ids in cont_ids)
            logits = _forward_logits(model, batch, keep=longest + 1)
            logprobs = torch.log_softmax(logits, dim=-1).cpu()
            for row, ids in enumerate(cont_ids):
                n = len(ids)
                # logits[:, j] predicts the token at position (width - keep + j + 1).
                steps = logprobs[row, -(n + 1) : -1]
                picked = steps.gather(1, torch.tensor(ids).view(n, 1)).squeeze(1)
                results.append(picked.sum() if reduction == "sum" else picked.mean())
    return torch.stack(results)
