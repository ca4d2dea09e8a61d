"""The token ids metrics read logits at: refusal starts, answer letters, special tokens."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from refusal_dir.errors import ConfigError
from refusal_dir.model import HookedModel

logger = logging.getLogger(__name__)

DEFAULT_REFUSAL_STARTS: tuple[str, ...] = ("I", "Sorry", "I cannot", "I'm", "As", "Unfortunately")
"""Phrases a refusal typically starts with; :func:`refusal_token_ids` keeps the first token of
each (deduplicated). For Gemma "I" is the usual refusal start (Arditi et al. use the single
token "I" for Gemma, "I" and "As" for Llama-3 and Qwen). Each phrase is tokenized where the
reply starts (:meth:`~refusal_dir.model.HookedModel.reply_token_ids`): "I" after Gemma's
``"<start_of_turn>model\n"``, " I" after the plain template's ``"Assistant:"``."""

LETTER_VARIANTS: tuple[str, ...] = ("{}", " {}", "({}", " ({}")
"""Spellings of an answer letter that count as "answering X" when they are one token; the
letter's logit is the maximum over those present in the vocabulary, and over the token the
letter gets where the reply starts (" A" after the plain template's ``"Assistant:"``)."""


def _encode(model: HookedModel, text: str) -> list[int]:
    return list(model.tokenizer(text, add_special_tokens=False)["input_ids"])


def _single_token(model: HookedModel, text: str) -> int | None:
    ids = _encode(model, text)
    return ids[0] if len(ids) == 1 else None


def letter_token_ids(model: HookedModel, letters: str) -> list[list[int]]:
    """For each letter, the ids of its one-token spellings: first the letter as it starts the
    reply after the chat template (when one token), then :data:`LETTER_VARIANTS`."""
    result = []
    for letter in letters:
        reply = model.reply_token_ids(letter)
        ids: list[int] = list(reply) if len(reply) == 1 else []
        for variant in LETTER_VARIANTS:
            token = _single_token(model, variant.format(letter))
            if token is not None and token not in ids:
                ids.append(token)
        if not ids:
            raise ConfigError(
                f"the tokenizer has no single token for the answer letter {letter!r}: "
                "use scoring='option'"
            )
        result.append(ids)
    return result


def letter_logits(logits: Tensor, letter_ids: Sequence[Sequence[int]]) -> Tensor:
    """``prompts x letters``: per letter the max logit over its spellings (float64)."""
    columns = [logits[:, list(ids)].double().max(dim=1).values for ids in letter_ids]
    return torch.stack(columns, dim=1)


def refusal_token_ids(
    model: HookedModel,
    starts: Sequence[str] = DEFAULT_REFUSAL_STARTS,
    *,
    after_template: bool = True,
) -> list[int]:
    """The first token id of each refusal start phrase, deduplicated, in order.

    ``after_template``: each phrase is tokenized where it starts the reply after the chat
    template (with the template's :attr:`~refusal_dir.model.HookedModel.reply_prefix`);
    otherwise on its own, as written.

    Special ids (``<unk>``, pad, BOS, EOS and the tokenizer's other special tokens) are never
    refusal tokens: a phrase whose first token is one (a word the vocabulary lacks becomes
    ``<unk>``) is skipped, since its probability says nothing about refusing.
    """
    special = special_token_ids(model.tokenizer)
    ids: list[int] = []
    for phrase in starts:
        encoded = model.reply_token_ids(phrase) if after_template else _encode(model, phrase)
        if not encoded:
            continue
        if encoded[0] in special:
            logger.debug("refusal start %r begins with a special token: skipped", phrase)
        elif encoded[0] not in ids:
            ids.append(encoded[0])
    if not ids:
        raise ConfigError(
            "no refusal start phrase begins with an ordinary token (each is empty or starts "
            "with <unk>, pad, BOS, EOS or another special token): pass refusal_tokens"
        )
    return ids


def special_token_ids(tokenizer: Any) -> set[int]:
    """Ids of the tokenizer's special tokens: unk, pad, BOS, EOS and any additional ones."""
    ids = {int(i) for i in getattr(tokenizer, "all_special_ids", ()) or ()}
    for name in ("unk_token_id", "pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            ids.add(value)
    return ids
