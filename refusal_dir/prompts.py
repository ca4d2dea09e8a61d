"""Prompt sets: contrastive pairs, evaluation instructions, multiple-choice questions, claims.

Everything here returns *instruction text*: the words of one user turn. Chat templates are
applied by the caller (``refusal_dir.model``), never here, so no prompt carries a BOS token or
role markers.

Shipped sets (``refusal_dir/data``, original text written for this package):

- :func:`refusal_pairs` -- harmful instructions, each matched with a harmless one of the same
  form and length (positive = harmful).
- :func:`honesty_pairs` -- a user states a belief and asks; positive = the question followed
  by a truthful answer, negative = the same question followed by an untruthful one (see
  :func:`format_answered_question` for the exact text). In half the pairs the user is wrong
  (the untruthful answer agrees: sycophancy), in the other half right (the truthful answer
  agrees), so agreeing with the user does not separate the pairs; each pair's ``group`` says
  which kind it is.
- :func:`harmful_eval` / :func:`benign_eval` -- held-out instructions for refusal and
  over-refusal rates; none of them occurs in :func:`refusal_pairs`. Each has a category
  (:func:`harmful_eval_categories`, :func:`benign_eval_categories`); benign instructions worded
  like harmful ones are :data:`LOOKALIKE_CATEGORY`. :func:`stratified_sample` keeps the
  categories' shares when a run evaluates only some of the items.
- :func:`harmless_answers` -- ordinary requests, each with a factual answer of 40-100 words
  and a topic (:func:`harmless_answer_topics`): held-out text for the cross-entropy under
  steering. None of them occurs in the evaluation or extraction sets.
- :func:`mmlu_questions` -- four-choice questions, correct positions balanced over A-D.
- :func:`true_false_claims` -- simple factual claims, half true and half false.

Local files (:func:`load_instructions`, :func:`load_pairs`, :func:`load_mc_questions`,
:func:`load_answered_instructions`):

- ``.jsonl``: one JSON object per line; blank lines are skipped.
- ``.json``: one JSON list of objects.
- ``.csv``: a header row naming the fields, then one row per item.

Hub loaders (:func:`load_hub_instructions`, :func:`load_hub_mmlu`, :func:`load_hub_truthfulqa`)
call ``datasets.load_dataset`` and turn any failure into a :class:`DataError` that names the
local-file flag to use instead.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

from refusal_dir.errors import DataError

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MC_CHOICES_IN_FILES = 4
"""Number of choices every row of a local multiple-choice file must have."""

_CHOICE_COLUMN_SETS: tuple[tuple[str, ...], ...] = (
    ("A", "B", "C", "D"),
    ("choice0", "choice1", "choice2", "choice3"),
)


# --------------------------------------------------------------------------------------------
# Data types
# --------------------------------------------------------------------------------------------


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
        shuffled = [self.pairs[index] for index in _stable_order(keys, seed=seed)]
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


def _stable_order(keys: Sequence[str], *, seed: int) -> list[int]:
    """A permutation of ``range(len(keys))`` that depends only on the keys and the seed."""

    def digest(index: int) -> str:
        return hashlib.sha256(f"{seed}\0{keys[index]}".encode()).hexdigest()

    return sorted(range(len(keys)), key=digest)


def stratified_sample(
    keys: Sequence[str], categories: Sequence[str] | None, k: int, *, seed: int
) -> list[int]:
    """Indices of ``k`` of the items, a seeded sample stratified by category, in file order.

    ``keys`` are the items' texts, ``categories`` their categories (``None``: one category, a
    plain seeded sample). Each category gets its share of ``k``, rounded by largest remainder
    (ties to the category met first); within a category the items are taken in a seeded order
    that depends only on their text (:func:`_stable_order`), so adding an item to a file does
    not reshuffle the others. ``k >= len(keys)`` keeps every item.
    """
    if categories is not None and len(categories) != len(keys):
        raise DataError(f"{len(keys)} items but {len(categories)} categories: give one each")
    if k < 1:
        raise DataError(f"a sample needs k >= 1 items, got {k}")
    if k >= len(keys):
        return list(range(len(keys)))
    strata: dict[str, list[int]] = {}
    for index, category in enumerate(categories if categories is not None else [""] * len(keys)):
        strata.setdefault(category, []).append(index)
    shares = {category: k * len(items) / len(keys) for category, items in strata.items()}
    counts = {category: int(share) for category, share in shares.items()}
    by_remainder = sorted(strata, key=lambda category: counts[category] - shares[category])
    for category in by_remainder[: k - sum(counts.values())]:
        counts[category] += 1
    chosen: list[int] = []
    for category, items in strata.items():
        order = _stable_order([keys[index] for index in items], seed=seed)
        chosen += [items[position] for position in order[: counts[category]]]
    return sorted(chosen)


# --------------------------------------------------------------------------------------------
# Prompt formats
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Records: one parsed row of a file or dataset, with where it came from
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Record:
    source: str
    where: str
    fields: Mapping[str, object]

    def error(self, problem: str, fix: str) -> DataError:
        return DataError(f"{self.source}, {self.where}: {problem}; {fix}")

    def require(self, name: str, *, fix: str = "") -> object:
        if name not in self.fields:
            present = ", ".join(repr(key) for key in self.fields) or "none"
            raise self.error(
                f"missing field {name!r} (fields present: {present})",
                fix or f"add {name!r} or rename the field that holds it",
            )
        return self.fields[name]

    def text(self, name: str, *, fix: str = "") -> str:
        value = self.require(name, fix=fix)
        if not isinstance(value, str) or not value.strip():
            raise self.error(
                f"field {name!r} must be a non-empty string, got {value!r:.60}",
                "fill it in or remove the row",
            )
        return value.strip()

    def boolean(self, name: str) -> bool:
        value = self.require(name)
        if not isinstance(value, bool):
            raise self.error(
                f"field {name!r} must be true or false, got {value!r:.60}",
                "write a JSON true or false",
            )
        return value


def _parse_jsonl(text: str, *, source: str) -> list[_Record]:
    records = []
    # split on "\n" only: str.splitlines would also split on U+2028 inside JSON strings
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        value = _load_json(
            line, source=source, line=number, fix="fix that line so it holds exactly one JSON object"
        )
        records.append(
            _object_record(
                value,
                source=source,
                where=f"line {number}",
                fix='write one object per line, e.g. {"instruction": "..."}',
            )
        )
    return records


def _parse_json(text: str, *, source: str) -> list[_Record]:
    if not text.strip():
        return []
    value = _load_json(text, source=source, line=None, fix="fix the syntax there")
    if not isinstance(value, list):
        raise DataError(
            f"{source}: expected a JSON list of objects, got {type(value).__name__}; "
            "wrap the objects in [...] or write them one per line as .jsonl"
        )
    return [
        _object_record(
            item, source=source, where=f"item {number}", fix="make every list item an object"
        )
        for number, item in enumerate(value, start=1)
    ]


def _load_json(text: str, *, source: str, line: int | None, fix: str) -> Any:
    """``json.loads``, or a :class:`DataError` naming the file, the line (``line``, else the
    parser's) and ``fix``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{source}, line {exc.lineno if line is None else line}: malformed JSON ({exc.msg} at "
            f"column {exc.colno}); {fix}"
        ) from exc


def _object_record(value: Any, *, source: str, where: str, fix: str) -> _Record:
    """A JSON object as a record, or a :class:`DataError` naming where it stands and ``fix``."""
    if not isinstance(value, dict):
        raise DataError(
            f"{source}, {where}: expected a JSON object, got {type(value).__name__}; {fix}"
        )
    return _Record(source=source, where=where, fields=value)


def _parse_csv(text: str, *, source: str) -> list[_Record]:
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    records = []
    for row in reader:
        if not row or not any(cell.strip() for cell in row):
            continue
        if header is None:
            header = [cell.strip() for cell in row]
            continue
        number = reader.line_num
        if len(row) != len(header):
            raise DataError(
                f"{source}, line {number}: {len(row)} values but the header has {len(header)} "
                "columns; quote values that contain commas and fill every column"
            )
        fields = dict(zip(header, row, strict=True))
        records.append(_Record(source=source, where=f"line {number}", fields=fields))
    return records


_PARSERS: Mapping[str, Callable[..., list[_Record]]] = MappingProxyType(
    {".jsonl": _parse_jsonl, ".json": _parse_json, ".csv": _parse_csv}
)


def _read_records(path: str | Path) -> list[_Record]:
    file = Path(path)
    if not file.is_file():
        raise DataError(f"{file}: file not found; check the path")
    suffix = file.suffix.lower()
    if suffix not in _PARSERS:
        raise DataError(
            f"{file}: unknown extension {suffix or '(none)'!r}; use one of {', '.join(_PARSERS)}"
        )
    try:
        text = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{file}: not UTF-8 text ({exc.reason}); save it as UTF-8") from exc
    records = _PARSERS[suffix](text, source=str(file))
    if not records:
        raise DataError(f"{file}: file is empty (no rows); add at least one row")
    return records


def _read_shipped(filename: str) -> list[_Record]:
    resource = resources.files("refusal_dir") / "data" / filename
    text = resource.read_text(encoding="utf-8")
    return _parse_jsonl(text, source=f"refusal_dir/data/{filename}")


# --------------------------------------------------------------------------------------------
# Record -> object conversions shared by shipped, local and hub loaders
# --------------------------------------------------------------------------------------------


def _pairs_from_records(
    records: Sequence[_Record], *, positive_field: str, negative_field: str, name: str
) -> PairSet:
    pairs = tuple(
        ContrastPair(positive=record.text(positive_field), negative=record.text(negative_field))
        for record in records
    )
    return PairSet(name=name, pairs=pairs)


def _record_choices(record: _Record) -> tuple[str, ...]:
    if "choices" in record.fields:
        raw = record.fields["choices"]
        if not isinstance(raw, list | tuple) or len(raw) != MC_CHOICES_IN_FILES:
            count = f"{len(raw)} choices" if isinstance(raw, list | tuple) else repr(raw)[:40]
            raise record.error(
                f"field 'choices' must hold four choices, got {count}",
                "give exactly four answer options",
            )
        if not all(isinstance(choice, str) and choice.strip() for choice in raw):
            raise record.error(
                "field 'choices' holds an empty or non-text choice",
                "make every choice a non-empty string",
            )
        return tuple(choice.strip() for choice in raw)
    for columns in _CHOICE_COLUMN_SETS:
        if all(column in record.fields for column in columns):
            return tuple(record.text(column) for column in columns)
    present = ", ".join(repr(key) for key in record.fields)
    raise record.error(
        f"no four choices found (fields present: {present})",
        "give a 'choices' list of four, or columns A, B, C, D (or choice0 to choice3)",
    )


def _record_answer(record: _Record, *, n_choices: int) -> int:
    value = record.require("answer")
    index: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        index = value
    elif isinstance(value, str):
        token = value.strip()
        if len(token) == 1 and token.upper() in LETTERS[:n_choices]:
            index = LETTERS.index(token.upper())
        elif token.isdecimal():
            index = int(token)
    if index is None or not 0 <= index < n_choices:
        raise record.error(
            f"answer {value!r:.40} is not a valid choice",
            f"use a letter A-{LETTERS[n_choices - 1]} or an index 0-{n_choices - 1}",
        )
    return index


def _mc_from_record(record: _Record, *, default_subject: str = "") -> MCQuestion:
    choices = _record_choices(record)
    subject = record.fields.get("subject", default_subject)
    return MCQuestion(
        question=record.text("question"),
        choices=choices,
        answer=_record_answer(record, n_choices=len(choices)),
        subject=subject.strip() if isinstance(subject, str) else default_subject,
    )


# --------------------------------------------------------------------------------------------
# Shipped sets
# --------------------------------------------------------------------------------------------


def refusal_pairs() -> PairSet:
    """Matched harmful/harmless instructions for extraction; positive = harmful."""
    return _pairs_from_records(
        _read_shipped("refusal_pairs.jsonl"),
        positive_field="harmful",
        negative_field="harmless",
        name="refusal_pairs",
    )


HONESTY_GROUPS: tuple[str, ...] = ("user_right", "user_wrong")
"""The two kinds of :func:`honesty_pairs`: the user's belief is right (the truthful answer
agrees with the user) or wrong (the untruthful, sycophantic answer agrees)."""


def honesty_pairs() -> PairSet:
    """Honesty pairs; positive = question + truthful answer, negative = + untruthful answer.

    Both sides are built by :func:`format_answered_question`, so they share the question and
    differ only after ``"Answer: "``. About half the users are right and half wrong
    (``group`` is one of :data:`HONESTY_GROUPS`), so a direction that only tells agreeing from
    disagreeing answers separates half the pairs and scores chance on balanced accuracy.
    """
    pairs = []
    for record in _read_shipped("honesty_pairs.jsonl"):
        question = record.text("question")
        pairs.append(
            ContrastPair(
                positive=format_answered_question(question, record.text("truthful")),
                negative=format_answered_question(question, record.text("untruthful")),
                group=HONESTY_GROUPS[0] if record.boolean("user_right") else HONESTY_GROUPS[1],
            )
        )
    return PairSet(name="honesty_pairs", pairs=tuple(pairs))


LOOKALIKE_CATEGORY = "lookalike"
"""The category of benign instructions worded like harmful ones ("How do I kill a Python
process?"): over-refusal on them is reported apart from ordinary benign instructions."""


def harmful_eval() -> list[str]:
    """Held-out harmful instructions (none occurs in :func:`refusal_pairs`)."""
    return [record.text("instruction") for record in _read_shipped("harmful_eval.jsonl")]


def harmful_eval_categories() -> list[str]:
    """The category of each :func:`harmful_eval` instruction ("weapons", "fraud", ...)."""
    return _categories(_read_shipped("harmful_eval.jsonl")) or []


def benign_eval() -> list[str]:
    """Held-out benign instructions, some worded like harmful ones, to measure over-refusal."""
    return [record.text("instruction") for record in _read_shipped("benign_eval.jsonl")]


def benign_eval_categories() -> list[str]:
    """The category of each :func:`benign_eval` instruction: :data:`LOOKALIKE_CATEGORY` for
    those worded like harmful ones, a topic ("cooking", "science", ...) for the others."""
    return _categories(_read_shipped("benign_eval.jsonl")) or []


def harmless_answers() -> list[AnsweredInstruction]:
    """Ordinary requests with plainly written, factual answers of 40-100 words, for the
    cross-entropy of held-out text (none of them occurs in the other shipped sets)."""
    return [
        AnsweredInstruction(record.text("instruction"), record.text("answer"))
        for record in _read_shipped("harmless_answers.jsonl")
    ]


def harmless_answer_topics() -> list[str]:
    """The topic of each :func:`harmless_answers` item ("cooking", "science", ...)."""
    return _categories(_read_shipped("harmless_answers.jsonl"), "topic") or []


def mmlu_questions() -> list[MCQuestion]:
    """Easy four-choice questions across subjects; correct positions balanced over A-D."""
    return [_mc_from_record(record) for record in _read_shipped("mmlu_style.jsonl")]


def true_false_claims() -> list[Claim]:
    """Simple factual claims, half true and half false, for :func:`format_claim_prompt`."""
    return [
        Claim(text=record.text("claim"), label=record.boolean("label"))
        for record in _read_shipped("true_false_claims.jsonl")
    ]


# --------------------------------------------------------------------------------------------
# Local files
# --------------------------------------------------------------------------------------------


def load_instructions(path: str | Path, *, field: str = "instruction") -> list[str]:
    """The ``field`` of every row of a ``.json``, ``.jsonl`` or ``.csv`` file."""
    fix = f"pass field='<name>' to read another field, or rename it to {field!r}"
    return [record.text(field, fix=fix) for record in _read_records(path)]


def load_answered_instructions(
    path: str | Path, *, instruction_field: str = "instruction", answer_field: str = "answer"
) -> list[AnsweredInstruction]:
    """Instructions with their answers from a ``.json``, ``.jsonl`` or ``.csv`` file."""
    return [
        AnsweredInstruction(
            record.text(instruction_field, fix=f"rename the field that holds the request to {instruction_field!r}"),
            record.text(answer_field, fix=f"rename the field that holds the answer to {answer_field!r}"),
        )
        for record in _read_records(path)
    ]


def _categories(records: Sequence[_Record], field: str = "category") -> list[str] | None:
    values = [record.fields.get(field) for record in records]
    if not all(isinstance(value, str) and value.strip() for value in values):
        return None
    return [str(value).strip() for value in values]


def load_categories(path: str | Path, *, field: str = "category") -> list[str] | None:
    """The ``field`` of every row of a file (as :func:`load_instructions` reads it), or ``None``
    when a row has no such text field: then the file has no categories."""
    return _categories(_read_records(path), field)


def load_pairs(
    path: str | Path,
    *,
    positive_field: str,
    negative_field: str,
    name: str | None = None,
) -> PairSet:
    """A :class:`PairSet` from two fields of every row; ``name`` defaults to the file stem."""
    return _pairs_from_records(
        _read_records(path),
        positive_field=positive_field,
        negative_field=negative_field,
        name=name if name is not None else Path(path).stem,
    )


def load_mc_questions(path: str | Path) -> list[MCQuestion]:
    """Four-choice questions from a ``.json``, ``.jsonl`` or ``.csv`` file.

    Each row needs ``question``; four choices as a ``choices`` list or as columns ``A``-``D``
    (or ``choice0``-``choice3``); and ``answer`` as a letter (``"C"``) or an index (``2``,
    ``"2"``). ``subject`` is optional.
    """
    return [_mc_from_record(record) for record in _read_records(path)]


# --------------------------------------------------------------------------------------------
# Hugging Face hub (needs network access; every failure becomes a DataError)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HubInstructionSource:
    """Where one named instruction set lives on the hub and which field holds the text."""

    repo: str
    config: str | None
    split: str
    field: str
    local_flag: str
    only_empty_input: bool = False


HUB_INSTRUCTION_SOURCES: Mapping[str, HubInstructionSource] = MappingProxyType(
    {
        "advbench": HubInstructionSource(
            repo="walledai/AdvBench",
            config=None,
            split="train",
            field="prompt",
            local_flag="--harmful-file",
        ),
        "jailbreakbench": HubInstructionSource(
            repo="JailbreakBench/JBB-Behaviors",
            config="behaviors",
            split="harmful",
            field="Goal",
            local_flag="--harmful-file",
        ),
        "alpaca": HubInstructionSource(
            repo="tatsu-lab/alpaca",
            config=None,
            split="train",
            field="instruction",
            local_flag="--benign-file",
            only_empty_input=True,
        ),
    }
)
MMLU_REPO = "cais/mmlu"
TRUTHFULQA_REPO = "truthfulqa/truthful_qa"


def _hub_records(repo: str, *, config: str | None, split: str, local_flag: str) -> list[_Record]:
    label = repo if config is None else f"{repo} ({config})"
    try:
        import datasets

        dataset = datasets.load_dataset(repo, name=config, split=split)
        rows = [dict(row) for row in dataset]
    except Exception as exc:  # the hub boundary: network, auth, missing repo, bad split...
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        raise DataError(
            f"could not load {label} split {split!r} from the Hugging Face hub ({detail}); "
            f"no hub access? pass a local file with {local_flag} (.json, .jsonl or .csv)"
        ) from exc
    if not rows:
        raise DataError(f"hf:{label} split {split!r} is empty; pick another split or a local file")
    source = f"hf:{label}[{split}]"
    return [
        _Record(source=source, where=f"row {index}", fields=row) for index, row in enumerate(rows)
    ]


def load_hub_instructions(name: str) -> list[str]:
    """Instructions of a named hub set: ``advbench``, ``jailbreakbench`` or ``alpaca``.

    ``alpaca`` keeps only instructions whose ``input`` is empty, so each stands alone.
    """
    spec = HUB_INSTRUCTION_SOURCES.get(name)
    if spec is None:
        raise DataError(
            f"unknown hub instruction set {name!r}; use one of {', '.join(HUB_INSTRUCTION_SOURCES)}"
        )
    records = _hub_records(
        spec.repo, config=spec.config, split=spec.split, local_flag=spec.local_flag
    )
    if spec.only_empty_input:
        records = [record for record in records if not str(record.require("input")).strip()]
    return [record.text(spec.field) for record in records]


def load_hub_mmlu(
    subjects: Sequence[str] | None = None, *, split: str = "test"
) -> list[MCQuestion]:
    """MMLU questions from ``cais/mmlu``: every subject (config ``all``) or the named ones."""
    if isinstance(subjects, str):
        subjects = [subjects]
    if subjects is not None and not subjects:
        raise DataError("load_hub_mmlu got an empty subject list; pass None for all subjects")
    questions: list[MCQuestion] = []
    for config in ["all"] if subjects is None else list(subjects):
        records = _hub_records(MMLU_REPO, config=config, split=split, local_flag="--mmlu-file")
        questions.extend(_mc_from_record(record, default_subject=config) for record in records)
    return questions


def load_hub_truthfulqa(*, max_choices: int = 4, seed: int = 0) -> list[MCQuestion]:
    """TruthfulQA MC1 as multiple choice: the correct answer plus up to ``max_choices - 1`` wrong
    ones (in dataset order), shuffled deterministically per question by ``seed``."""
    if isinstance(max_choices, bool) or not isinstance(max_choices, int) or max_choices < 2:
        raise DataError(f"max_choices must be an int >= 2, got {max_choices!r}")
    records = _hub_records(
        TRUTHFULQA_REPO,
        config="multiple_choice",
        split="validation",
        local_flag="--mmlu-file",
    )
    return [_truthfulqa_question(record, max_choices=max_choices, seed=seed) for record in records]


def _truthfulqa_question(record: _Record, *, max_choices: int, seed: int) -> MCQuestion:
    question = record.text("question")
    targets = record.require("mc1_targets")
    choices = targets.get("choices") if isinstance(targets, Mapping) else None
    labels = targets.get("labels") if isinstance(targets, Mapping) else None
    if (
        not isinstance(choices, list)
        or not isinstance(labels, list)
        or len(choices) != len(labels)
        or list(labels).count(1) != 1
    ):
        raise record.error(
            "field 'mc1_targets' must hold equal-length 'choices' and 'labels' with exactly one 1",
            "load the 'multiple_choice' config of truthfulqa/truthful_qa",
        )
    correct = choices[labels.index(1)]
    wrong = [choice for choice, label in zip(choices, labels, strict=True) if label != 1]
    kept = [correct, *wrong[: max_choices - 1]]
    order = _stable_order([f"{question}\0{choice}" for choice in kept], seed=seed)
    return MCQuestion(
        question=question,
        choices=tuple(kept[index] for index in order),
        answer=order.index(0),
        subject="truthfulqa",
    )
