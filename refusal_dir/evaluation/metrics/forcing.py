"""Teacher forcing: a prompt and a given answer in one batch, and the logits at the answer's
positions under interventions (used by the answer KL, the answer cross-entropy and the
lm-eval adapter)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from refusal_dir.errors import DataError
from refusal_dir.generation import _forward_logits
from refusal_dir.interventions import Intervention, steer
from refusal_dir.model import HookedModel, TokenBatch, pad_ids


def split_chat(model: HookedModel, instruction: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids of the formatted user turn and of the answer that follows it.

    The whole text is tokenized at once, as the model would read it; the answer is every token
    past the longest prefix shared with the user turn alone (so a token that merges the
    template's last characters with the answer's first is scored as part of the answer).
    """
    full = model._encode(model.format_chat(instruction, model.reply_prefix + answer))
    prompt = model._encode(model.chat.format(instruction))
    shared = 0
    while shared < min(len(prompt), len(full)) and prompt[shared] == full[shared]:
        shared += 1
    if shared == 0 or shared == len(full):
        raise DataError(
            f"the answer to {instruction[:60]!r} adds no tokens after the chat template: give "
            "a non-empty answer"
        )
    return full[:shared], full[shared:]


def forced_batch(
    model: HookedModel,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]],
    *,
    answer_width: int,
) -> tuple[TokenBatch, int]:
    """Left-padded prompt ids, then answer ids right-padded to ``answer_width``; and the
    padded prompt width, where every row's answer starts. Padded answer positions are masked
    and must never be scored (they follow the real tokens, so no real position sees them)."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    prompt_ids, prompt_mask = pad_ids(prompts, model.pad_token_id)
    answer_ids, answer_mask = pad_ids(answers, model.pad_token_id, width=answer_width, side="right")
    batch = TokenBatch(torch.cat([prompt_ids, answer_ids], 1), torch.cat([prompt_mask, answer_mask], 1))
    return batch, prompt_ids.shape[1]


def answer_logits(
    model: HookedModel,
    batch: TokenBatch,
    interventions: Sequence[Intervention],
    *,
    rows: slice,
    prompt_width: int,
    n_tokens: int,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Logits of the ``n_tokens`` answer positions of ``batch`` (prompt, then forced answer).

    ``reduce`` maps them (``batch x n_tokens x vocab``, on the model's device) to what is kept
    on the CPU, so a long answer over a large vocabulary is never copied whole.
    """
    with steer(model, *interventions) as state:
        state.start(rows, prompt_length=prompt_width)
        # The distribution of answer token k is read at the position before it: the last
        # n_tokens + 1 positions but the very last (no unembedding over the prompt).
        logits = _forward_logits(model, batch, keep=n_tokens + 1)[:, :n_tokens]
    return (logits if reduce is None else reduce(logits)).cpu()
