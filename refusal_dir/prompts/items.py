"""The prompt types (contrastive pairs and pair sets, multiple-choice questions, claims,
answered instructions) and the text formats that turn them into instructions."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass

from refusal_dir.errors import DataError
from refusal_dir.prompts.sampling import stable_order

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _check_text(value: object, *, what: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{what} must be a non-empty string, got {value!r:.60}; fill it in")


@dataclass(frozen=True)
class ContrastPair:
    """Two prompts that differ in one behaviour; ``positive`` has it (harmful, truthful...).

    ``group`` names the kind of pair where a set mixes kinds that a confound could tell apart
    (honesty pairs: ``"user_right"`` / ``"user_wrong"``); layer scores are then balanced over
    the groups (:func:`refusal_dir.selection.separation_accuracy`). It is not part of the
    content hash.
    """

    positive: str
    negative: str
    group: str = ""

    def __post_init__(self) -> None:
        _check_text(self.positive, what="ContrastPair.positive")
        _check_text(self.negative, what="ContrastPair.negative")
        if not isinstance(self.group, str):
            raise DataError(f"ContrastPair.group must be a string, got {self.group!r:.60}")


@dataclass(frozen=True)
class MCQuestion:
    """A multiple-choice question; ``answer`` indexes ``choices`` (0 = A).

    Lists passed as ``choices`` are stored as tuples.
    """

    question: str
    choices: tuple[str, ...]
    answer: int
    subject: str = ""

    def __post_init__(self) -> None:
        _check_text(self.question, what="MCQuestion.question")
        if not isinstance(self.choices, tuple | list):
            raise DataError(
                f"MCQuestion.choices must be a tuple of strings, got {type(self.choices).__name__}; "
                "pass e.g. ('Paris', 'Rome', 'Madrid', 'Berlin')"
            )
        object.__setattr__(self, "choices", tuple(self.choices))
        if not 2 <= len(self.choices) <= len(LETTERS):
            raise DataError(
                f"MCQuestion has {len(self.choices)} choices; give between 2 and {len(LETTERS)}"
            )
        for index, choice in enumerate(self.choices):
            _check_text(choice, what=f"MCQuestion.choices[{index}]")
        if isinstance(self.answer, bool) or not isinstance(self.answer, int):
            raise DataError(
                f"MCQuestion.answer must be an int index, got {self.answer!r}; use 0 for A, 1 for B..."
            )
        if not 0 <= self.answer < len(self.choices):
            raise DataError(
                f"MCQuestion.answer {self.answer} is out of range for {len(self.choices)} choices; "
                f"use an index from 0 to {len(self.choices) - 1}"
            )
        if not isinstance(self.subject, str):
            raise DataError(f"MCQuestion.subject must be a string, got {self.subject!r}")

    @property
    def answer_letter(self) -> str:
        """The letter of the correct choice as shown by :func:`format_mc_prompt`."""
        return LETTERS[self.answer]


@dataclass(frozen=True)
class Claim:
    """A factual statement and whether it is true."""

    text: str
    label: bool

    def __post_init__(self) -> None:
        _check_text(self.text, what="Claim.text")
        if not isinstance(self.label, bool):
            raise DataError(f"Claim.label must be True or False, got {self.label!r}")

    @property
    def answer_letter(self) -> str:
        """The correct letter under :func:`format_claim_prompt`: ``A`` (true) or ``B`` (false)."""
        return "A" if self.label else "B"


@dataclass(frozen=True)
class AnsweredInstruction:
    """An instruction with a good answer to it: held-out text whose cross-entropy under
    steering shows what steering costs in fluency
    (:func:`refusal_dir.evaluation.metrics.answer_cross_entropy`)."""

    instruction: str
    answer: str

    def __post_init__(self) -> None:
        _check_text(self.instruction, what="AnsweredInstruction.instruction")
        _check_text(self.answer, what="AnsweredInstruction.answer")


@dataclass(frozen=True)
class PairSet:
    """A named, non-empty collection of :class:`ContrastPair` (lists are stored as tuples)."""

    name: str
    pairs: tuple[ContrastPair, ...]

    def __post_init__(self) -> None:
        _check_text(self.name, what="PairSet.name")
        if not isinstance(self.pairs, tuple | list):
            raise DataError(
                f"PairSet {self.name!r}: pairs must be a tuple of ContrastPair, "
                f"got {type(self.pairs).__name__}"
            )
        object.__setattr__(self, "pairs", tuple(self.pairs))
        if not self.pairs:
            raise DataError(f"PairSet {self.name!r} is empty; give at least one ContrastPair")
        for index, pair in enumerate(self.pairs):
            if not isinstance(pair, ContrastPair):
                raise DataError(
                    f"PairSet {self.name!r}: item {index} is a {type(pair).__name__}, "
                    "not a ContrastPair; wrap it as ContrastPair(positive=..., negative=...)"
                )

    def __len__(self) -> int:
        return len(self.pairs)

    def __iter__(self) -> Iterator[ContrastPair]:
        return iter(self.pairs)

    @property
    def positives(self) -> list[str]:
        return [pair.positive for pair in self.pairs]

    @property
    def negatives(self) -> list[str]:
        return [pair.negative for pair in self.pairs]

    @property
    def groups(self) -> list[str]:
        """Each pair's :attr:`ContrastPair.group` (``""`` where none was given)."""
        return [pair.group for pair in self.pairs]

    def split(self, fraction: float, *, seed: int) -> tuple[PairSet, PairSet]:
        """Shuffle deterministically and cut into ``(first, rest)``.

        ``first`` holds ``round(fraction * len(self))`` pairs and is named ``"<name>:train"``;
        ``rest`` holds the others and is named ``"<name>:held_out"``. The order depends only on
        the pairs' text and ``seed`` (sha256, stable across Python versions and machines).
        """
        if isinstance(fraction, bool) or not isinstance(fraction, int | float):
            raise DataError(f"split fraction must be a number, got {fraction!r}; use e.g. 0.8")
        if not 0 < fraction < 1:
            raise DataError(f"split fraction must lie strictly between 0 and 1, got {fraction}")
        n_first = round(fraction * len(self))
        if not 0 < n_first < len(self):
            raise DataError(
                f"splitting {len(self)} pairs of {self.name!r} at fraction {fraction} leaves one "
                f"part empty; use a fraction between {1 / len(self):.3g} and "
                f"{1 - 1 / len(self):.3g}, or add pairs"
            )
        keys = [_canonical_json([_pair_as_dict(pair)]) for pair in self.pairs]
        shuffled = [self.pairs[index] for index in stable_order(keys, seed=seed)]
        return (
            PairSet(name=f"{self.name}:train", pairs=tuple(shuffled[:n_first])),
            PairSet(name=f"{self.name}:held_out", pairs=tuple(shuffled[n_first:])),
        )

    def content_hash(self) -> str:
        """First 16 hex digits of the sha256 of the pairs' canonical JSON (the name is ignored)."""
        text = _canonical_json([_pair_as_dict(pair) for pair in self.pairs])
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _pair_as_dict(pair: ContrastPair) -> dict[str, str]:
    return {"positive": pair.positive, "negative": pair.negative}


def _canonical_json(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def format_mc_prompt(q: MCQuestion) -> str:
    """``question``, one ``"X. choice"`` line per choice, then the instruction to answer."""
    options = "\n".join(f"{LETTERS[index]}. {choice}" for index, choice in enumerate(q.choices))
    return f"{q.question}\n{options}\nAnswer with the letter of the correct option."


def format_claim_prompt(c: Claim) -> str:
    """The true/false question; the correct letter is :attr:`Claim.answer_letter`."""
    return f'Is the following claim true or false? "{c.text}"\n\nChoices:\n(A) True\n(B) False'


def format_answered_question(question: str, answer: str) -> str:
    """The instruction text of one honesty prompt: ``"{question}\\n\\nAnswer: {answer}"``."""
    _check_text(question, what="question")
    _check_text(answer, what="answer")
    return f"{question}\n\nAnswer: {answer}"
