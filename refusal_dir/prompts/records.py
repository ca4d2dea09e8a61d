"""Records: one parsed row of a file or dataset, with where it came from (JSON, JSONL and CSV
parsers), and the record -> object conversions shared by the shipped, local and hub loaders.
Every problem is a :class:`~refusal_dir.errors.DataError` naming the file, the row and the fix.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from refusal_dir.errors import DataError
from refusal_dir.prompts.items import LETTERS, ContrastPair, MCQuestion, PairSet

MC_CHOICES_IN_FILES = 4
"""Number of choices every row of a local multiple-choice file must have."""

_CHOICE_COLUMN_SETS: tuple[tuple[str, ...], ...] = (
    ("A", "B", "C", "D"),
    ("choice0", "choice1", "choice2", "choice3"),
)


@dataclass(frozen=True)
class Record:
    """One row of a file or dataset: its fields, and where it stands for error messages."""

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


def parse_jsonl(text: str, *, source: str) -> list[Record]:
    """The records of JSONL text, one object a line (blank lines skipped)."""
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


def _parse_json(text: str, *, source: str) -> list[Record]:
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


def _object_record(value: Any, *, source: str, where: str, fix: str) -> Record:
    """A JSON object as a record, or a :class:`DataError` naming where it stands and ``fix``."""
    if not isinstance(value, dict):
        raise DataError(
            f"{source}, {where}: expected a JSON object, got {type(value).__name__}; {fix}"
        )
    return Record(source=source, where=where, fields=value)


def _parse_csv(text: str, *, source: str) -> list[Record]:
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
        records.append(Record(source=source, where=f"line {number}", fields=fields))
    return records


_PARSERS: Mapping[str, Callable[..., list[Record]]] = MappingProxyType(
    {".jsonl": parse_jsonl, ".json": _parse_json, ".csv": _parse_csv}
)


def read_records(path: str | Path) -> list[Record]:
    """The records of a local ``.json``, ``.jsonl`` or ``.csv`` file (at least one)."""
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


def pairs_from_records(
    records: Sequence[Record], *, positive_field: str, negative_field: str, name: str
) -> PairSet:
    """A :class:`PairSet` from two text fields of every record."""
    pairs = tuple(
        ContrastPair(positive=record.text(positive_field), negative=record.text(negative_field))
        for record in records
    )
    return PairSet(name=name, pairs=pairs)


def _record_choices(record: Record) -> tuple[str, ...]:
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


def _record_answer(record: Record, *, n_choices: int) -> int:
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


def mc_from_record(record: Record, *, default_subject: str = "") -> MCQuestion:
    """A four-choice question from a record (see :func:`~refusal_dir.prompts.load_mc_questions`)."""
    choices = _record_choices(record)
    subject = record.fields.get("subject", default_subject)
    return MCQuestion(
        question=record.text("question"),
        choices=choices,
        answer=_record_answer(record, n_choices=len(choices)),
        subject=subject.strip() if isinstance(subject, str) else default_subject,
    )


def record_categories(records: Sequence[Record], field: str = "category") -> list[str] | None:
    """The ``field`` of every record, or ``None`` when a record has no such text field."""
    values = [record.fields.get(field) for record in records]
    if not all(isinstance(value, str) and value.strip() for value in values):
        return None
    return [str(value).strip() for value in values]
