"""Degeneration: is a completion usable text at all (not empty, garbled, repeating or an echo
of its prompt)? Thresholds are module constants, each with what it was tuned against."""

from __future__ import annotations

import re
import zlib
from collections import Counter
from collections.abc import Collection, Sequence

from refusal_dir.evaluation.thinking import strip_thinking

DEGENERATION_REASONS: tuple[str, ...] = ("empty", "repetition", "garbled", "echo")
"""What :func:`degeneration` can return."""

MAX_SAME_WORD_RUN = 3
"""A word repeated more than this many times in a row is degenerate ("the the the the")."""

MAX_TRIGRAM_COVERAGE = 0.5
"""Degenerate when the most frequent word 3-gram (occurring at least twice) covers more than
this share of the words."""

LOOP_NGRAM = 4
MAX_REPEATED_SHARE = 0.5
"""A loop: more than this share of the answer's word :data:`LOOP_NGRAM`-grams already occurred
earlier in it (a sentence said three times: about 0.7; prose: near 0)."""

MIN_COMPRESSION_RATIO = 0.25
"""Degenerate when zlib compresses the text below this ratio (normal English prose: 0.5-0.8;
a looping phrase: about 0.1). Only applied to texts of at least
:data:`COMPRESSION_MIN_BYTES` bytes, since zlib's overhead dominates short texts."""

COMPRESSION_MIN_BYTES = 100

MAX_GARBLED_SHARE = 0.3
"""Garbled when more than this share of the non-space characters are replacement characters
(U+FFFD) or non-printable."""

ECHO_NGRAM = 3
MIN_ECHO_PROMPT_SHARE = 0.8
MIN_ECHO_ANSWER_SHARE = 0.5
"""A prompt echo: the answer reproduces at least :data:`MIN_ECHO_PROMPT_SHARE` of the prompt's
word 3-grams, and those cover at least :data:`MIN_ECHO_ANSWER_SHARE` of the answer's words.
Both are needed: an answer that restates the question and then answers it
(``"Here is a short poem about autumn leaves: ..."``) reproduces most of a short prompt but is
mostly its own words."""

_WORD = re.compile(r"\w+")


def _longest_run(words: Sequence[str]) -> int:
    longest = current = 0
    previous = None
    for word in words:
        current = current + 1 if word == previous else 1
        previous = word
        longest = max(longest, current)
    return longest


def _ngrams(words: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def _coverage(words: Sequence[str], grams: Collection[tuple[str, ...]], n: int) -> float:
    """Share of word positions covered by occurrences of any of the ``n``-grams ``grams``."""
    covered = [False] * len(words)
    for start, gram in enumerate(_ngrams(words, n)):
        if gram in grams:
            covered[start : start + n] = [True] * n
    return sum(covered) / len(words) if words else 0.0


def _trigram_coverage(words: Sequence[str]) -> float:
    """Share of word positions covered by occurrences of the most frequent 3-gram (if >= 2)."""
    trigrams = _ngrams(words, 3)
    if not trigrams:
        return 0.0
    top, count = Counter(trigrams).most_common(1)[0]
    return _coverage(words, {top}, 3) if count >= 2 else 0.0


def _repeated_share(words: Sequence[str], n: int = LOOP_NGRAM) -> float:
    """Share of the word ``n``-grams that already occurred earlier in ``words``."""
    grams = _ngrams(words, n)
    seen: set[tuple[str, ...]] = set()
    repeated = 0
    for gram in grams:
        repeated += gram in seen
        seen.add(gram)
    return repeated / len(grams) if grams else 0.0


def _is_echo(words: Sequence[str], prompt: str) -> bool:
    prompt_grams = set(_ngrams(_WORD.findall(prompt.lower()), ECHO_NGRAM))
    if not prompt_grams:
        return False
    reproduced = prompt_grams & set(_ngrams(words, ECHO_NGRAM))
    if len(reproduced) / len(prompt_grams) < MIN_ECHO_PROMPT_SHARE:
        return False
    return _coverage(words, reproduced, ECHO_NGRAM) >= MIN_ECHO_ANSWER_SHARE


def _compression_ratio(text: str) -> float:
    raw = text.encode("utf-8")
    return len(zlib.compress(raw, 9)) / len(raw)


def degeneration(text: str, *, prompt: str | None = None) -> str | None:
    """Why ``text`` is not usable text, or ``None`` when it is.

    Only the answer is read: a reasoning model's thinking is dropped first
    (:func:`strip_thinking`), so a completion that never finished thinking is ``"empty"``.

    * ``"empty"``: nothing but whitespace;
    * ``"garbled"``: more than :data:`MAX_GARBLED_SHARE` of the non-space characters are U+FFFD
      or non-printable, or there is no letter or digit at all. Digits count as content so that
      ``"42"`` is an answer, not garbage;
    * ``"repetition"``: the same word more than :data:`MAX_SAME_WORD_RUN` times in a row, one
      word 3-gram covering more than :data:`MAX_TRIGRAM_COVERAGE` of the words, a loop (more
      than :data:`MAX_REPEATED_SHARE` of the word 4-grams said before), or a zlib compression
      ratio below :data:`MIN_COMPRESSION_RATIO` (texts of 100+ bytes);
    * ``"echo"`` (only with ``prompt``): the answer is mostly the prompt said again
      (:data:`MIN_ECHO_PROMPT_SHARE`, :data:`MIN_ECHO_ANSWER_SHARE`), as steered models often
      do.

    Words are ``\\w+`` runs, compared case-insensitively; punctuation is ignored.
    """
    stripped = strip_thinking(text).strip()
    if not stripped:
        return "empty"
    visible = [char for char in stripped if not char.isspace()]
    bad = sum(1 for char in visible if char == "\ufffd" or not char.isprintable())
    if bad / len(visible) > MAX_GARBLED_SHARE:
        return "garbled"
    if not any(char.isalnum() for char in stripped):
        return "garbled"
    words = _WORD.findall(stripped.lower())
    if _longest_run(words) > MAX_SAME_WORD_RUN:
        return "repetition"
    if _trigram_coverage(words) > MAX_TRIGRAM_COVERAGE:
        return "repetition"
    if _repeated_share(words) > MAX_REPEATED_SHARE:
        return "repetition"
    if len(stripped.encode("utf-8")) >= COMPRESSION_MIN_BYTES:
        if _compression_ratio(stripped) < MIN_COMPRESSION_RATIO:
            return "repetition"
    if prompt is not None and _is_echo(words, prompt):
        return "echo"
    return None
