"""How far steering moves the model from its unsteered self: KL of the next-token
distribution (after the prompt, or over the first answer tokens) and the cross-entropy of
given answers, teacher forced."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from refusal_dir.errors import ConfigError, DataError
from refusal_dir.evaluation.metrics.forcing import answer_logits, forced_batch, split_chat
from refusal_dir.evaluation.metrics.results import CrossEntropyResult, KLResult, check_items
from refusal_dir.generation import (
    GenerationSettings,
    _batches,
    generate_tokens,
    iter_next_token_logits,
    next_token_logits,
)
from refusal_dir.interventions import Intervention, check_rows
from refusal_dir.model import HookedModel


@torch.no_grad()
def kl_divergence(
    model: HookedModel,
    prompts: Sequence[str],
    *,
    interventions: Sequence[Intervention] = (),
    reference_logits: Float[Tensor, "reference vocab"] | None = None,
    batch_size: int = 16,
    progress: bool = False,
    apply_chat_template: bool = True,
    share_prefix: bool = False,
) -> KLResult:
    """KL(P_unsteered || P_steered) of the next-token distribution after each prompt.

    Computed from float64 log-softmaxes at the last prompt position (the first answer token),
    the capability check of Arditi et al. and heretic. ``reference_logits`` (from
    :func:`next_token_logits` without interventions) saves recomputing the unsteered pass in a
    sweep; it has one row per prompt, or one row per distinct prompt when ``prompts`` is that
    list repeated block-wise (a sweep's layout: all prompts at the first coefficient, then all
    at the second, ...), so row ``i`` is compared with ``reference_logits[i % len]``. Identical
    logits give exactly 0; with no interventions and no reference the result is 0 without a
    second forward pass. With a reference given, memory stays bounded by one batch of steered
    logits, however many prompts. ``share_prefix``: the steered (and a computed reference)
    pass prefill the prompts' shared first tokens once per group of alike rows
    (:attr:`refusal_dir.generation.GenerationSettings.share_prefix`); pass a reference computed
    the same way.
    """
    check_items(prompts, "prompts")
    reference: Tensor | None = None
    if reference_logits is not None:
        reference = torch.as_tensor(reference_logits).detach().cpu()
        n_ref = reference.shape[0] if reference.ndim == 2 else 0
        if n_ref == 0 or len(prompts) % n_ref != 0 or not _is_tiled(prompts, n_ref):
            raise DataError(
                f"reference_logits has shape {tuple(reference.shape)} but there are "
                f"{len(prompts)} prompts: pass next_token_logits() of the same prompts (or of "
                "the distinct prompts, when the list repeats them block-wise)"
            )
    elif not interventions:
        return KLResult(value=0.0, n=len(prompts), per_prompt=[0.0] * len(prompts))
    else:
        # Before the steered pass: its hooks stay live between the batches it yields.
        reference = next_token_logits(
            model, prompts, batch_size=batch_size, progress=progress, apply_chat_template=apply_chat_template,
            share_prefix=share_prefix,
        )
    values: list[float] = []
    steered_chunks = iter_next_token_logits(
        model, prompts, interventions=interventions, batch_size=batch_size, progress=progress,
        apply_chat_template=apply_chat_template, share_prefix=share_prefix,
    )
    try:
        for rows, steered in steered_chunks:
            base = reference[torch.arange(rows.start, rows.stop) % reference.shape[0]]
            if base.shape[-1] != steered.shape[-1]:
                raise DataError(
                    f"reference_logits have {base.shape[-1]} logits per row but the model gives "
                    f"{steered.shape[-1]}: pass next_token_logits() of this model"
                )
            values += [float(value) for value in kl_from_logits(base, steered)]
    finally:
        steered_chunks.close()  # leaves the steer() scope now, also after an error
    return KLResult(value=sum(values) / len(values), n=len(values), per_prompt=values)


@torch.no_grad()
def answer_kl(
    model: HookedModel,
    prompts: Sequence[str],
    *,
    interventions: Sequence[Intervention] = (),
    n_tokens: int = 8,
    batch_size: int = 16,
    progress: bool = False,
) -> KLResult:
    """KL(P_unsteered || P_steered) over the first ``n_tokens`` answer positions, teacher forced.

    The unsteered model's greedy answer (up to ``n_tokens`` tokens, cut at its end of turn) is
    fed after each prompt, with and without the interventions, and the KL of every answer
    position's next-token distribution is averaged per prompt. ``n_tokens=1`` is
    :func:`kl_divergence`. Unlike the first-token KL, it sees what steering does once the answer
    is under way (a ``positions="generated"`` addition moves only these positions). The
    answer tokens count as generated positions for the position rules.
    """
    check_items(prompts, "prompts")
    check_rows(interventions, len(prompts))
    if n_tokens < 1:
        raise ConfigError(f"n_tokens must be >= 1, got {n_tokens}")
    settings = GenerationSettings(max_new_tokens=n_tokens, batch_size=batch_size)
    # The unsteered answer of each distinct prompt, once (a sweep repeats prompts per alpha).
    distinct = list(dict.fromkeys(prompts))
    _, distinct_answers = generate_tokens(model, distinct, settings=settings, progress=progress)
    answer_of = dict(zip(distinct, distinct_answers, strict=True))
    answers = [answer_of[prompt] for prompt in prompts]
    texts = model.format_prompts(prompts)
    values: list[float] = []
    for start in range(0, len(prompts), batch_size):
        rows = slice(start, min(start + batch_size, len(prompts)))
        forced = [ids[:n_tokens] for ids in answers[rows]]
        batch, width = forced_batch(
            model, [model._encode(text) for text in texts[rows]], forced, answer_width=n_tokens
        )
        lengths = [len(ids) for ids in forced]
        base = answer_logits(model, batch, (), rows=rows, prompt_width=width, n_tokens=n_tokens)
        steered = answer_logits(model, batch, interventions, rows=rows, prompt_width=width, n_tokens=n_tokens)
        for row, length in enumerate(lengths):
            scored = max(1, length)  # an empty answer still has its first position
            values.append(float(kl_from_logits(base[row, :scored], steered[row, :scored]).mean()))
    return KLResult(value=sum(values) / len(values), n=len(values), per_prompt=values)


@torch.no_grad()
def answer_cross_entropy(
    model: HookedModel,
    instructions: Sequence[str],
    answers: Sequence[str],
    *,
    interventions: Sequence[Intervention] = (),
    batch_size: int = 8,
    progress: bool = False,
) -> CrossEntropyResult:
    """Cross-entropy (nats per token) of each given answer after its instruction, teacher forced.

    Each item is formatted with the chat template as a user turn followed by the start of the
    assistant's reply (:meth:`~refusal_dir.model.HookedModel.format_chat`, after the template's
    :attr:`~refusal_dir.model.HookedModel.reply_prefix`), and the mean of ``-log p`` over the
    answer's tokens is taken under the interventions: Arditi et al.'s capability check on
    held-out text. Lower is better; the unsteered value is the baseline, and a steering that
    breaks fluency raises it. As in :func:`answer_kl`, the answer tokens count as generated
    positions for the position rules. Prompts are left padded and answers right padded, so a
    batch gives the values of one item at a time. ``batch_size`` is small by default: the
    logits of every answer position are unembedded (``batch x answer tokens x vocabulary``).
    """
    check_items(instructions, "instructions")
    if isinstance(answers, str) or len(answers) != len(instructions):
        raise DataError(
            f"{len(instructions)} instructions but {0 if isinstance(answers, str) else len(answers)} "
            "answers: pass one answer per instruction"
        )
    for index, (instruction, answer) in enumerate(zip(instructions, answers, strict=True)):
        if not isinstance(instruction, str) or not instruction.strip():
            raise DataError(f"instruction {index} is empty or not a string: remove the item")
        if not isinstance(answer, str) or not answer.strip():
            raise DataError(f"answer {index} is empty or not a string: remove the item")
    check_rows(interventions, len(instructions))
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    prompt_ids, answer_ids = [], []
    for instruction, answer in zip(instructions, answers, strict=True):
        prompt, ids = split_chat(model, instruction, answer)
        prompt_ids.append(prompt)
        answer_ids.append(ids)
    per_item: list[float] = []
    for rows in tqdm(_batches(len(instructions), batch_size), desc="cross-entropy", disable=not progress, leave=False):
        longest = max(len(ids) for ids in answer_ids[rows])
        batch, width = forced_batch(model, prompt_ids[rows], answer_ids[rows], answer_width=longest)
        targets = batch.input_ids[:, width:]

        def token_logprobs(logits: Tensor, targets: Tensor = targets) -> Tensor:
            logits = logits.float()
            picked = logits.gather(-1, targets.to(logits.device).unsqueeze(-1)).squeeze(-1)
            return picked - torch.logsumexp(logits, dim=-1)

        logprobs = answer_logits(
            model, batch, interventions, rows=rows, prompt_width=width, n_tokens=longest,
            reduce=token_logprobs,
        ).double()
        for row, ids in enumerate(answer_ids[rows]):
            per_item.append(float(-logprobs[row, : len(ids)].mean()))
    counts = [len(ids) for ids in answer_ids]
    return CrossEntropyResult(
        value=sum(per_item) / len(per_item),
        n=len(per_item),
        per_item=per_item,
        n_tokens=counts,
        token_mean=sum(v * c for v, c in zip(per_item, counts, strict=True)) / sum(counts),
    )


def _is_tiled(prompts: Sequence[str], n: int) -> bool:
    return all(prompts[i] == prompts[i % n] for i in range(n, len(prompts)))


def kl_from_logits(
    reference: Float[Tensor, "n vocab"], other: Float[Tensor, "n vocab"], *, chunk: int = 32
) -> Float[Tensor, " n"]:
    """Row-wise KL(softmax(reference) || softmax(other)) in float64; exactly 0 for equal rows.

    Rows are reduced ``chunk`` at a time, so the float64 temporaries stay bounded.
    """
    out = []
    for start in range(0, reference.shape[0], chunk):
        log_p = torch.log_softmax(reference[start : start + chunk].double(), dim=-1)
        log_q = torch.log_softmax(other[start : start + chunk].double(), dim=-1)
        p = log_p.exp()
        terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
        out.append(terms.sum(dim=-1).clamp_min(0.0))
    return torch.cat(out) if out else reference.new_zeros(0, dtype=torch.float64)
