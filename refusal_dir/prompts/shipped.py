"""The prompt sets shipped in ``refusal_dir/data`` (original text written for this package)."""

from __future__ import annotations

from importlib import resources

from refusal_dir.prompts.items import (
    AnsweredInstruction,
    Claim,
    ContrastPair,
    MCQuestion,
    PairSet,
    format_answered_question,
)
from refusal_dir.prompts.records import (
    Record,
    mc_from_record,
    pairs_from_records,
    parse_jsonl,
    record_categories,
)


def read_shipped(filename: str) -> list[Record]:
    """The records of ``refusal_dir/data/<filename>`` (JSONL)."""
    resource = resources.files("refusal_dir") / "data" / filename
    text = resource.read_text(encoding="utf-8")
    return parse_jsonl(text, source=f"refusal_dir/data/{filename}")


def refusal_pairs() -> PairSet:
    """Matched harmful/harmless instructions for extraction; positive = harmful."""
    return pairs_from_records(
        read_shipped("refusal_pairs.jsonl"),
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
    for record in read_shipped("honesty_pairs.jsonl"):
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
    return [record.text("instruction") for record in read_shipped("harmful_eval.jsonl")]


def harmful_eval_categories() -> list[str]:
    """The category of each :func:`harmful_eval` instruction ("weapons", "fraud", ...)."""
    return record_categories(read_shipped("harmful_eval.jsonl")) or []


def benign_eval() -> list[str]:
    """Held-out benign instructions, some worded like harmful ones, to measure over-refusal."""
    return [record.text("instruction") for record in read_shipped("benign_eval.jsonl")]


def benign_eval_categories() -> list[str]:
    """The category of each :func:`benign_eval` instruction: :data:`LOOKALIKE_CATEGORY` for
    those worded like harmful ones, a topic ("cooking", "science", ...) for the others."""
    return record_categories(read_shipped("benign_eval.jsonl")) or []


def harmless_answers() -> list[AnsweredInstruction]:
    """Ordinary requests with plainly written, factual answers of 40-100 words, for the
    cross-entropy of held-out text (none of them occurs in the other shipped sets)."""
    return [
        AnsweredInstruction(record.text("instruction"), record.text("answer"))
        for record in read_shipped("harmless_answers.jsonl")
    ]


def harmless_answer_topics() -> list[str]:
    """The topic of each :func:`harmless_answers` item ("cooking", "science", ...)."""
    return record_categories(read_shipped("harmless_answers.jsonl"), "topic") or []


def mmlu_questions() -> list[MCQuestion]:
    """Easy four-choice questions across subjects; correct positions balanced over A-D."""
    return [mc_from_record(record) for record in read_shipped("mmlu_style.jsonl")]


def true_false_claims() -> list[Claim]:
    """Simple factual claims, half true and half false, for :func:`format_claim_prompt`."""
    return [
        Claim(text=record.text("claim"), label=record.boolean("label"))
        for record in read_shipped("true_false_claims.jsonl")
    ]
