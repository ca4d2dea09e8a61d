"""Prompt sets from local ``.json``, ``.jsonl`` and ``.csv`` files."""

from __future__ import annotations

from pathlib import Path

from refusal_dir.prompts.items import AnsweredInstruction, MCQuestion, PairSet
from refusal_dir.prompts.records import (
    mc_from_record,
    pairs_from_records,
    read_records,
    record_categories,
)


def load_instructions(path: str | Path, *, field: str = "instruction") -> list[str]:
    """The ``field`` of every row of a ``.json``, ``.jsonl`` or ``.csv`` file."""
    fix = f"pass field='<name>' to read another field, or rename it to {field!r}"
    return [record.text(field, fix=fix) for record in read_records(path)]


def load_answered_instructions(
    path: str | Path, *, instruction_field: str = "instruction", answer_field: str = "answer"
) -> list[AnsweredInstruction]:
    """Instructions with their answers from a ``.json``, ``.jsonl`` or ``.csv`` file."""
    return [
        AnsweredInstruction(
            record.text(instruction_field, fix=f"rename the field that holds the request to {instruction_field!r}"),
            record.text(answer_field, fix=f"rename the field that holds the answer to {answer_field!r}"),
        )
        for record in read_records(path)
    ]


def load_categories(path: str | Path, *, field: str = "category") -> list[str] | None:
    """The ``field`` of every row of a file (as :func:`load_instructions` reads it), or ``None``
    when a row has no such text field: then the file has no categories."""
    return record_categories(read_records(path), field)


def load_pairs(
    path: str | Path,
    *,
    positive_field: str,
    negative_field: str,
    name: str | None = None,
) -> PairSet:
    """A :class:`PairSet` from two fields of every row; ``name`` defaults to the file stem."""
    return pairs_from_records(
        read_records(path),
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
    return [mc_from_record(record) for record in read_records(path)]
