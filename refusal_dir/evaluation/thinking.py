"""A reasoning model's thinking (Qwen3, DeepSeek-R1): the tags around it, and the answer left
when it is dropped. Judges and the degeneration check read only the answer."""

from __future__ import annotations

import re

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
"""The tags around a reasoning model's thinking (Qwen3, DeepSeek-R1)."""

_THINK_BLOCK = re.compile(re.escape(THINK_OPEN) + ".*?" + re.escape(THINK_CLOSE), re.DOTALL)


def strip_thinking(text: str) -> str:
    """The answer part of a completion: ``text`` without its thinking.

    * ``"<think>plan</think>Sure, ..."`` -> ``"Sure, ..."`` (every closed block is dropped);
    * ``"plan</think>Sure, ..."`` -> ``"Sure, ..."``: a ``</think>`` before any ``<think>``
      closes a block the template opened in the prompt;
    * ``"<think>plan, cut off by the token limit"`` -> ``""``: an unterminated block runs to
      the end, so the model gave no answer.

    Text without the tags is returned unchanged.
    """
    if THINK_CLOSE not in text and THINK_OPEN not in text:
        return text
    close = text.find(THINK_CLOSE)
    opened = text.find(THINK_OPEN)
    if close != -1 and (opened == -1 or close < opened):
        text = text[close + len(THINK_CLOSE) :]
    text = _THINK_BLOCK.sub("", text)
    opened = text.find(THINK_OPEN)
    return text if opened == -1 else text[:opened]
