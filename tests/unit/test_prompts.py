"""Tests for refusal_dir.prompts: shipped sets, formats, local loaders, hub field mapping."""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence, Sized
from importlib import resources
from pathlib import Path

import pytest
import torch

from refusal_dir import prompts
from refusal_dir.errors import DataError
from refusal_dir.prompts import (
    LOOKALIKE_CATEGORY,
    Claim,
    ContrastPair,
    MCQuestion,
    PairSet,
    benign_eval,
    benign_eval_categories,
    harmful_eval,
    harmful_eval_categories,
    stratified_sample,
)


def _normalise(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.casefold()).strip()


def _assert_unique(texts: Sequence[str], what: str) -> None:
    counts = Counter(_normalise(text) for text in texts)
    duplicates = [text for text, count in counts.items() if count > 1]
    assert not duplicates, f"duplicates in {what}: {duplicates}"


def _pair_set(n: int, *, name: str = "toy") -> PairSet:
    pairs = tuple(ContrastPair(positive=f"pos {i}", negative=f"neg {i}") for i in range(n))
    return PairSet(name=name, pairs=pairs)


# ------------------------------------------------------------------------------------------
# Shipped sets
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("loader", "minimum"),
    [
        (prompts.refusal_pairs, 64),
        (prompts.honesty_pairs, 32),
        (prompts.true_false_claims, 60),
        (prompts.harmful_eval, 80),
        (prompts.benign_eval, 80),
        (prompts.mmlu_questions, 60),
    ],
)
def test_shipped_sets_meet_minimum_sizes(loader: Callable[[], Sized], minimum: int) -> None:
    assert len(loader()) >= minimum


def test_shipped_texts_have_no_duplicates() -> None:
    refusal = prompts.refusal_pairs()
    honesty = prompts.honesty_pairs()
    _assert_unique(refusal.positives, "refusal harmful side")
    _assert_unique(refusal.negatives, "refusal harmless side")
    _assert_unique(refusal.positives + refusal.negatives, "refusal pairs, both sides")
    _assert_unique(honesty.positives + honesty.negatives, "honesty pairs, both sides")
    _assert_unique(prompts.harmful_eval(), "harmful_eval")
    _assert_unique(prompts.benign_eval(), "benign_eval")
    _assert_unique([claim.text for claim in prompts.true_false_claims()], "claims")
    _assert_unique([q.question for q in prompts.mmlu_questions()], "mmlu questions")


def test_extraction_and_eval_sets_do_not_overlap() -> None:
    refusal = prompts.refusal_pairs()
    extraction = {_normalise(text) for text in refusal.positives + refusal.negatives}
    harmful = {_normalise(text) for text in prompts.harmful_eval()}
    benign = {_normalise(text) for text in prompts.benign_eval()}
    assert not extraction & harmful
    assert not extraction & benign
    assert not harmful & benign


def test_shipped_eval_sets_have_categories() -> None:
    data = resources.files("refusal_dir") / "data"
    for filename in ("harmful_eval.jsonl", "benign_eval.jsonl"):
        categories = prompts.load_instructions(Path(str(data / filename)), field="category")
        assert len(set(categories)) >= 5
    assert "lookalike" in prompts.load_instructions(
        Path(str(data / "benign_eval.jsonl")), field="category"
    )


def test_harmless_answers_are_answered_varied_and_apart_from_the_other_sets() -> None:
    items = prompts.harmless_answers()
    topics = prompts.harmless_answer_topics()
    assert 55 <= len(items) <= 70 and len(topics) == len(items)
    assert len(set(topics)) >= 10 and max(Counter(topics).values()) <= 8
    for item in items:
        assert 40 <= len(item.answer.split()) <= 100, item.instruction
    _assert_unique([item.instruction for item in items], "harmless_answers instructions")
    _assert_unique([item.answer for item in items], "harmless_answers answers")
    mine = {_normalise(item.instruction) for item in items}
    refusal = prompts.refusal_pairs()
    others = refusal.positives + refusal.negatives + prompts.harmful_eval() + prompts.benign_eval()
    others += [q.question for q in prompts.mmlu_questions()]
    assert not mine & {_normalise(text) for text in others}


def test_answered_instructions_round_trip_and_name_a_missing_field(tmp_path: Path) -> None:
    path = tmp_path / "answers.jsonl"
    rows = [{"instruction": "Say hi.", "answer": "Hi!", "topic": "x"}, {"instruction": "Count to 2.", "answer": "1, 2"}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    loaded = prompts.load_answered_instructions(path)
    assert loaded == [prompts.AnsweredInstruction("Say hi.", "Hi!"), prompts.AnsweredInstruction("Count to 2.", "1, 2")]
    assert prompts.load_categories(path, field="topic") is None  # not every row has a topic
    path.write_text(json.dumps({"instruction": "Say hi.", "reply": "Hi!"}) + "\n")
    with pytest.raises(DataError, match="missing field 'answer'") as error:
        prompts.load_answered_instructions(path)
    assert "\n" not in str(error.value)


def test_mmlu_answers_are_balanced_and_choices_distinct() -> None:
    questions = prompts.mmlu_questions()
    counts = Counter(q.answer for q in questions)
    assert set(counts) == {0, 1, 2, 3}
    assert max(counts.values()) - min(counts.values()) <= 1
    assert len({q.subject for q in questions}) >= 5
    for q in questions:
        assert len(q.choices) == 4
        assert len(set(q.choices)) == 4, q.question


def test_claims_are_balanced() -> None:
    labels = Counter(claim.label for claim in prompts.true_false_claims())
    assert abs(labels[True] - labels[False]) <= 2


def test_honesty_pairs_share_the_question_and_differ_in_the_answer() -> None:
    for pair in prompts.honesty_pairs():
        question, _, truthful = pair.positive.partition("\n\nAnswer: ")
        other_question, _, sycophantic = pair.negative.partition("\n\nAnswer: ")
        assert question == other_question and question.strip()
        assert truthful and sycophantic and truthful != sycophantic


AGREEING_STARTS = ("Yes", "Right", "Correct", "True", "I agree", "That's right", "That's correct")


def test_honesty_pairs_do_not_confound_truth_with_agreeing() -> None:
    from refusal_dir.selection import separation_accuracy

    pairs = prompts.honesty_pairs()
    counts = Counter(pairs.groups)
    assert set(counts) == set(prompts.HONESTY_GROUPS)
    assert abs(counts["user_right"] - counts["user_wrong"]) <= 0.1 * len(pairs)

    def agrees(text: str) -> bool:
        return text.partition("\n\nAnswer: ")[2].startswith(AGREEING_STARTS)

    # The answer that agrees with the user is the truthful one exactly when the user is right.
    for pair in pairs:
        assert agrees(pair.positive) == (pair.group == "user_right"), pair.positive
        assert agrees(pair.negative) == (pair.group == "user_wrong"), pair.negative
    # A planted "agree" direction (either sign) separates one kind and fails the other: chance.
    for sign in (1.0, -1.0):
        positive = torch.tensor([sign if agrees(p.positive) else -sign for p in pairs])
        negative = torch.tensor([sign if agrees(p.negative) else -sign for p in pairs])
        assert separation_accuracy(positive, negative, pairs.groups) == 0.5
    # A truth direction separates both kinds.
    assert separation_accuracy(torch.ones(len(pairs)), torch.zeros(len(pairs)), pairs.groups) == 1.0


def test_separation_accuracy_is_balanced_over_groups() -> None:
    from refusal_dir.selection import separation_accuracy

    positive, negative = torch.tensor([1.0, 1.0, 1.0, 0.0]), torch.tensor([0.0, 0.0, 0.0, 1.0])
    assert separation_accuracy(positive, negative) == 0.75
    assert separation_accuracy(positive, negative, ["a", "a", "a", "b"]) == 0.5
    assert separation_accuracy(positive, positive, ["a", "a", "b", "b"]) == 0.5  # ties


def test_shipped_loaders_return_fresh_objects() -> None:
    first = prompts.harmful_eval()
    first.clear()
    assert prompts.harmful_eval()


# ------------------------------------------------------------------------------------------
# Data types and formats
# ------------------------------------------------------------------------------------------


def test_format_mc_prompt() -> None:
    q = MCQuestion(question="2 + 2 = ?", choices=("3", "4", "5", "22"), answer=1)
    assert prompts.format_mc_prompt(q) == (
        "2 + 2 = ?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer with the letter of the correct option."
    )
    assert q.answer_letter == "B"


def test_format_claim_prompt() -> None:
    claim = Claim(text="Ice floats on water.", label=True)
    assert prompts.format_claim_prompt(claim) == (
        'Is the following claim true or false? "Ice floats on water."\n\n'
        "Choices:\n(A) True\n(B) False"
    )
    assert claim.answer_letter == "A"
    assert Claim(text="Cows lay eggs.", label=False).answer_letter == "B"


def test_format_answered_question() -> None:
    assert prompts.format_answered_question("Is it?", "No.") == "Is it?\n\nAnswer: No."


def test_mc_question_stores_list_choices_as_tuple() -> None:
    q = MCQuestion(question="q", choices=["a", "b"], answer=0)  # type: ignore[arg-type]
    assert q.choices == ("a", "b")


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"choices": ("a", "b", "c", "d"), "answer": 4}, "out of range"),
        ({"choices": ("a", "b", "c", "d"), "answer": -1}, "out of range"),
        ({"choices": ("a",), "answer": 0}, "1 choices"),
        ({"choices": ("a", " ", "c", "d"), "answer": 0}, "choices[1]"),
        ({"choices": ("a", "b"), "answer": True}, "int index"),
    ],
)
def test_mc_question_rejects_bad_values(kwargs: dict[str, object], expected: str) -> None:
    with pytest.raises(DataError, match=re.escape(expected)):
        MCQuestion(question="q", **kwargs)  # type: ignore[arg-type]


def test_contrast_pair_and_claim_reject_empty_text() -> None:
    with pytest.raises(DataError, match="positive"):
        ContrastPair(positive="  ", negative="x")
    with pytest.raises(DataError, match="negative"):
        ContrastPair(positive="x", negative="")
    with pytest.raises(DataError, match="label"):
        Claim(text="x", label=1)  # type: ignore[arg-type]


def test_pair_set_rejects_empty_and_wrong_items() -> None:
    with pytest.raises(DataError, match="empty"):
        PairSet(name="none", pairs=())
    with pytest.raises(DataError, match="item 0"):
        PairSet(name="bad", pairs=(("a", "b"),))  # type: ignore[arg-type]


def test_pair_set_sides() -> None:
    pair_set = _pair_set(3)
    assert len(pair_set) == 3
    assert pair_set.positives == ["pos 0", "pos 1", "pos 2"]
    assert pair_set.negatives == ["neg 0", "neg 1", "neg 2"]


def test_split_is_deterministic_disjoint_and_complete() -> None:
    pair_set = _pair_set(50)
    first, rest = pair_set.split(0.8, seed=3)
    again_first, again_rest = pair_set.split(0.8, seed=3)
    assert (first.pairs, rest.pairs) == (again_first.pairs, again_rest.pairs)
    assert (len(first), len(rest)) == (40, 10)
    assert set(first.pairs).isdisjoint(rest.pairs)
    assert set(first.pairs) | set(rest.pairs) == set(pair_set.pairs)
    assert first.pairs != pair_set.pairs[:40]  # shuffled
    other_first, _ = pair_set.split(0.8, seed=4)
    assert set(other_first.pairs) != set(first.pairs)
    assert (first.name, rest.name) == ("toy:train", "toy:held_out")


@pytest.mark.parametrize(("n", "fraction"), [(2, 0.1), (2, 0.9), (10, 0.0), (10, 1.0), (10, 1.5)])
def test_split_refuses_an_empty_part(n: int, fraction: float) -> None:
    with pytest.raises(DataError, match="fraction"):
        _pair_set(n).split(fraction, seed=0)


def test_content_hash_tracks_pairs_not_name() -> None:
    pair_set = _pair_set(5)
    digest = pair_set.content_hash()
    assert re.fullmatch(r"[0-9a-f]{16}", digest)
    assert _pair_set(5, name="other").content_hash() == digest
    changed = list(pair_set.pairs)
    changed[2] = ContrastPair(positive="pos 2!", negative="neg 2")
    assert PairSet(name="toy", pairs=tuple(changed)).content_hash() != digest
    negative_changed = list(pair_set.pairs)
    negative_changed[4] = ContrastPair(positive="pos 4", negative="neg 4.")
    assert PairSet(name="toy", pairs=tuple(negative_changed)).content_hash() != digest
    swapped = list(pair_set.pairs)
    swapped[0] = ContrastPair(positive="neg 0", negative="pos 0")
    assert PairSet(name="toy", pairs=tuple(swapped)).content_hash() != digest


# ------------------------------------------------------------------------------------------
# Local loaders: round trips
# ------------------------------------------------------------------------------------------


def _write(path: Path, rows: Sequence[Mapping[str, object]]) -> Path:
    if path.suffix == ".json":
        path.write_text(json.dumps(list(rows)), encoding="utf-8")
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    else:
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return path


INSTRUCTIONS = ["Say hi.", 'Quote "this", please, with commas', "Ünïcödé \u2028 line separator"]


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv"])
def test_instructions_round_trip(tmp_path: Path, suffix: str) -> None:
    rows = [{"instruction": text, "category": "x"} for text in INSTRUCTIONS]
    path = _write(tmp_path / f"set{suffix}", rows)
    assert prompts.load_instructions(path) == INSTRUCTIONS
    assert prompts.load_instructions(str(path), field="category") == ["x", "x", "x"]


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv"])
def test_pairs_round_trip(tmp_path: Path, suffix: str) -> None:
    rows = [{"bad": f"harmful {i}", "good": f"harmless {i}"} for i in range(4)]
    path = _write(tmp_path / f"pairs{suffix}", rows)
    pair_set = prompts.load_pairs(path, positive_field="bad", negative_field="good")
    assert pair_set.name == "pairs"
    assert pair_set.positives == [f"harmful {i}" for i in range(4)]
    assert pair_set.negatives == [f"harmless {i}" for i in range(4)]
    named = prompts.load_pairs(path, positive_field="bad", negative_field="good", name="mine")
    assert named.name == "mine"


QUESTIONS = [
    MCQuestion(
        question="Capital of France?",
        choices=("Rome", "Paris", "Oslo", "Bern"),
        answer=1,
        subject="geography",
    ),
    MCQuestion(question="3 * 3?", choices=("6", "8", "33", "9"), answer=3, subject="math"),
]


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_mc_questions_round_trip_json(tmp_path: Path, suffix: str) -> None:
    rows = [
        {
            "question": q.question,
            "choices": list(q.choices),
            "answer": q.answer,
            "subject": q.subject,
        }
        for q in QUESTIONS
    ]
    assert prompts.load_mc_questions(_write(tmp_path / f"mc{suffix}", rows)) == QUESTIONS


def test_mc_questions_round_trip_csv_letters(tmp_path: Path) -> None:
    rows = [
        {
            "question": q.question,
            **dict(zip("ABCD", q.choices, strict=True)),
            "answer": q.answer_letter,
            "subject": q.subject,
        }
        for q in QUESTIONS
    ]
    assert prompts.load_mc_questions(_write(tmp_path / "mc.csv", rows)) == QUESTIONS


def test_mc_questions_round_trip_csv_indexed_columns(tmp_path: Path) -> None:
    rows = [
        {
            "question": q.question,
            **{f"choice{i}": c for i, c in enumerate(q.choices)},
            "answer": str(q.answer),
        }
        for q in QUESTIONS
    ]
    loaded = prompts.load_mc_questions(_write(tmp_path / "mc.csv", rows))
    assert [(q.question, q.choices, q.answer) for q in loaded] == [
        (q.question, q.choices, q.answer) for q in QUESTIONS
    ]
    assert all(q.subject == "" for q in loaded)


def test_jsonl_blank_lines_and_csv_bom_are_tolerated(tmp_path: Path) -> None:
    jsonl = tmp_path / "gaps.jsonl"
    jsonl.write_text('{"instruction": "a"}\n\n   \n{"instruction": "b"}\n', encoding="utf-8")
    assert prompts.load_instructions(jsonl) == ["a", "b"]
    bom = tmp_path / "bom.csv"
    bom.write_text("\ufeffinstruction\nfirst\n", encoding="utf-8")
    assert prompts.load_instructions(bom) == ["first"]


# ------------------------------------------------------------------------------------------
# Local loaders: bad input
# ------------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found") as info:
        prompts.load_instructions(tmp_path / "nope.jsonl")
    assert "nope.jsonl" in str(info.value)


def test_unknown_extension(tmp_path: Path) -> None:
    path = tmp_path / "set.txt"
    path.write_text("hello\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"unknown extension '\.txt'.*\.jsonl"):
        prompts.load_instructions(path)


@pytest.mark.parametrize(
    ("filename", "content"),
    [
        ("e.jsonl", ""),
        ("e.jsonl", "\n\n"),
        ("e.json", ""),
        ("e.json", "[]"),
        ("e.csv", ""),
        ("e.csv", "instruction\n"),
    ],
)
def test_empty_file(tmp_path: Path, filename: str, content: str) -> None:
    path = tmp_path / filename
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match="empty"):
        prompts.load_instructions(path)


def test_malformed_jsonl_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(
        '{"instruction": "a"}\n{"instruction": "b"}\n{"instruction": "c",\n', encoding="utf-8"
    )
    with pytest.raises(DataError, match=r"bad\.jsonl, line 3: malformed JSON"):
        prompts.load_instructions(path)


def test_malformed_json_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"instruction": "a"},\n  {"instruction": "b",}\n]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.json, line 3: malformed JSON"):
        prompts.load_instructions(path)


def test_json_that_is_not_a_list(tmp_path: Path) -> None:
    path = tmp_path / "obj.json"
    path.write_text('{"instruction": "a"}', encoding="utf-8")
    with pytest.raises(DataError, match="expected a JSON list"):
        prompts.load_instructions(path)


def test_jsonl_line_that_is_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "list.jsonl"
    path.write_text('{"instruction": "a"}\n["b"]\n', encoding="utf-8")
    with pytest.raises(DataError, match="line 2: expected a JSON object, got list"):
        prompts.load_instructions(path)


@pytest.mark.parametrize(
    ("suffix", "where"),
    # a CSV row shares the header, so the first data row (line 2) already lacks the field
    [(".jsonl", "line 2"), (".json", "item 2"), (".csv", "line 2")],
)
def test_missing_field_names_the_row_and_the_fields_present(
    tmp_path: Path, suffix: str, where: str
) -> None:
    if suffix == ".csv":
        rows = [{"prompt": "a", "category": "x"}, {"prompt": "b", "category": "y"}]
    else:
        rows = [{"instruction": "a"}, {"prompt": "b", "category": "y"}]
    path = _write(tmp_path / f"f{suffix}", rows)
    with pytest.raises(DataError) as info:
        prompts.load_instructions(path)
    message = str(info.value)
    assert f"{where}:" in message
    assert "missing field 'instruction'" in message
    assert "'prompt'" in message and "'category'" in message
    assert "field=" in message


def test_empty_value_names_the_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "f.jsonl", [{"instruction": "a"}, {"instruction": "  "}])
    with pytest.raises(DataError, match="line 2: field 'instruction' must be a non-empty"):
        prompts.load_instructions(path)


def test_pairs_missing_field_names_the_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.jsonl", [{"harmful": "a", "harmless": "b"}, {"harmful": "c"}])
    with pytest.raises(DataError, match="line 2: missing field 'harmless'"):
        prompts.load_pairs(path, positive_field="harmful", negative_field="harmless")


def test_csv_row_with_wrong_number_of_values(tmp_path: Path) -> None:
    path = tmp_path / "ragged.csv"
    path.write_text("instruction,category\na,x\nb,y,z\n", encoding="utf-8")
    with pytest.raises(DataError, match="line 3: 3 values but the header has 2 columns"):
        prompts.load_instructions(path)


def test_mc_csv_row_without_four_choices(tmp_path: Path) -> None:
    path = tmp_path / "three.csv"
    path.write_text("question,A,B,C,answer\nq1,a,b,c,A\n", encoding="utf-8")
    with pytest.raises(DataError, match="line 2: no four choices found") as info:
        prompts.load_mc_questions(path)
    assert "'question', 'A', 'B', 'C', 'answer'" in str(info.value)


def test_mc_jsonl_row_with_three_choices(tmp_path: Path) -> None:
    good = {"question": "q", "choices": ["a", "b", "c", "d"], "answer": 0}
    bad = {"question": "q2", "choices": ["a", "b", "c"], "answer": 0}
    path = _write(tmp_path / "mc.jsonl", [good, good, bad])
    with pytest.raises(DataError, match="line 3: field 'choices' must hold four choices, got 3"):
        prompts.load_mc_questions(path)


@pytest.mark.parametrize("answer", ["E", "4", "-1", "", "B."])
def test_mc_csv_bad_answer(tmp_path: Path, answer: str) -> None:
    path = _write(
        tmp_path / "mc.csv",
        [{"question": "q", "A": "a", "B": "b", "C": "c", "D": "d", "answer": answer}],
    )
    with pytest.raises(DataError, match="line 2: answer .* is not a valid choice"):
        prompts.load_mc_questions(path)


@pytest.mark.parametrize("answer", [4, True, 1.0, None])
def test_mc_json_bad_answer(tmp_path: Path, answer: object) -> None:
    path = _write(
        tmp_path / "mc.json", [{"question": "q", "choices": ["a", "b", "c", "d"], "answer": answer}]
    )
    with pytest.raises(DataError, match="item 1: answer .* is not a valid choice"):
        prompts.load_mc_questions(path)


def test_mc_lowercase_letter_answer(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "mc.csv",
        [{"question": "q", "A": "a", "B": "b", "C": "c", "D": "d", "answer": " c "}],
    )
    assert prompts.load_mc_questions(path)[0].answer == 2


# ------------------------------------------------------------------------------------------
# Hub loaders (datasets.load_dataset replaced by an in-memory fake: a data boundary)
# ------------------------------------------------------------------------------------------


class FakeHub:
    """Stands in for ``datasets.load_dataset``; records each call."""

    def __init__(self, tables: Mapping[tuple[str, str | None, str], list[dict[str, object]]]):
        self.tables = tables
        self.calls: list[tuple[str, str | None, str]] = []

    def __call__(
        self, path: str, name: str | None = None, *, split: str
    ) -> list[dict[str, object]]:
        key = (path, name, split)
        self.calls.append(key)
        if key not in self.tables:
            raise FileNotFoundError(f"Dataset {path} {name} {split} doesn't exist")
        return self.tables[key]


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> Callable[..., FakeHub]:
    datasets = pytest.importorskip("datasets")

    def install(tables: Mapping[tuple[str, str | None, str], list[dict[str, object]]]) -> FakeHub:
        fake = FakeHub(tables)
        monkeypatch.setattr(datasets, "load_dataset", fake)
        return fake

    return install


def test_hub_advbench(fake_hub: Callable[..., FakeHub]) -> None:
    fake = fake_hub(
        {
            ("walledai/AdvBench", None, "train"): [
                {"prompt": "harm one", "target": "Sure, here is"},
                {"prompt": "harm two", "target": "Sure, here is"},
            ]
        }
    )
    assert prompts.load_hub_instructions("advbench") == ["harm one", "harm two"]
    assert fake.calls == [("walledai/AdvBench", None, "train")]


def test_hub_jailbreakbench(fake_hub: Callable[..., FakeHub]) -> None:
    fake = fake_hub(
        {
            ("JailbreakBench/JBB-Behaviors", "behaviors", "harmful"): [
                {"Goal": "goal one", "Behavior": "b", "Category": "c"},
            ]
        }
    )
    assert prompts.load_hub_instructions("jailbreakbench") == ["goal one"]
    assert fake.calls == [("JailbreakBench/JBB-Behaviors", "behaviors", "harmful")]


def test_hub_alpaca_keeps_only_empty_input(fake_hub: Callable[..., FakeHub]) -> None:
    fake_hub(
        {
            ("tatsu-lab/alpaca", None, "train"): [
                {"instruction": "Name a colour.", "input": "", "output": "Blue."},
                {"instruction": "Summarise this.", "input": "Some text.", "output": "..."},
                {"instruction": "Give a tip.", "input": "  ", "output": "Sleep."},
            ]
        }
    )
    assert prompts.load_hub_instructions("alpaca") == ["Name a colour.", "Give a tip."]


def test_hub_unknown_name_lists_known_ones() -> None:
    with pytest.raises(DataError, match="advbench, jailbreakbench, alpaca"):
        prompts.load_hub_instructions("harmbench")


def test_hub_failure_points_to_local_file(fake_hub: Callable[..., FakeHub]) -> None:
    fake_hub({})
    with pytest.raises(DataError) as info:
        prompts.load_hub_instructions("advbench")
    message = str(info.value)
    assert "walledai/AdvBench" in message
    assert "no hub access? pass a local file with --harmful-file" in message
    assert "\n" not in message


def test_hub_missing_field_names_dataset_and_row(fake_hub: Callable[..., FakeHub]) -> None:
    fake_hub({("walledai/AdvBench", None, "train"): [{"prompt": "a"}, {"goal": "b"}]})
    with pytest.raises(DataError, match=r"hf:walledai/AdvBench\[train\], row 1: missing field"):
        prompts.load_hub_instructions("advbench")


def _mmlu_row(question: str, subject: str, answer: int) -> dict[str, object]:
    return {
        "question": question,
        "subject": subject,
        "choices": ["w", "x", "y", "z"],
        "answer": answer,
    }


def test_hub_mmlu_all_and_named_subjects(fake_hub: Callable[..., FakeHub]) -> None:
    fake = fake_hub(
        {
            ("cais/mmlu", "all", "test"): [_mmlu_row("q1", "astronomy", 2)],
            ("cais/mmlu", "astronomy", "dev"): [_mmlu_row("q2", "astronomy", 0)],
            ("cais/mmlu", "virology", "dev"): [_mmlu_row("q3", "virology", 3)],
        }
    )
    assert prompts.load_hub_mmlu(None) == [
        MCQuestion(question="q1", choices=("w", "x", "y", "z"), answer=2, subject="astronomy")
    ]
    named = prompts.load_hub_mmlu(["astronomy", "virology"], split="dev")
    assert [(q.question, q.answer, q.subject) for q in named] == [
        ("q2", 0, "astronomy"),
        ("q3", 3, "virology"),
    ]
    assert fake.calls[1:] == [("cais/mmlu", "astronomy", "dev"), ("cais/mmlu", "virology", "dev")]
    with pytest.raises(DataError, match="--mmlu-file"):
        prompts.load_hub_mmlu(["nonexistent_subject"])


def _truthfulqa_row(index: int, labels: list[int]) -> dict[str, object]:
    choices = [f"choice {index}.{k}" for k in range(len(labels))]
    return {
        "question": f"question {index}?",
        "mc1_targets": {"choices": choices, "labels": labels},
        "mc2_targets": {"choices": choices, "labels": labels},
    }


def test_hub_truthfulqa_keeps_correct_answer(fake_hub: Callable[..., FakeHub]) -> None:
    rows = [_truthfulqa_row(i, [1, 0, 0, 0, 0, 0]) for i in range(20)]
    rows.append(_truthfulqa_row(20, [0, 1, 0]))
    fake = fake_hub({("truthfulqa/truthful_qa", "multiple_choice", "validation"): rows})
    questions = prompts.load_hub_truthfulqa()
    assert fake.calls == [("truthfulqa/truthful_qa", "multiple_choice", "validation")]
    assert len(questions) == 21
    for index, q in enumerate(questions[:20]):
        assert len(q.choices) == 4
        assert q.choices[q.answer] == f"choice {index}.0"
        assert set(q.choices) == {f"choice {index}.{k}" for k in range(4)}
    last = questions[20]
    assert len(last.choices) == 3 and last.choices[last.answer] == "choice 20.1"
    assert len({q.answer for q in questions}) > 1  # shuffled, not always first
    assert prompts.load_hub_truthfulqa() == questions  # deterministic
    assert prompts.load_hub_truthfulqa(seed=1) != questions
    assert all(len(q.choices) == 2 for q in prompts.load_hub_truthfulqa(max_choices=2))


def test_hub_truthfulqa_rejects_bad_targets(fake_hub: Callable[..., FakeHub]) -> None:
    fake_hub(
        {
            ("truthfulqa/truthful_qa", "multiple_choice", "validation"): [
                _truthfulqa_row(0, [0, 0, 0]),
            ]
        }
    )
    with pytest.raises(DataError, match="row 0: field 'mc1_targets'"):
        prompts.load_hub_truthfulqa()


def test_stratified_sample_keeps_category_shares_and_is_seeded() -> None:
    keys = [f"item {i}" for i in range(12)]
    categories = ["lookalike"] * 6 + ["cooking"] * 3 + ["science"] * 3  # sorted, as files are
    kept = stratified_sample(keys, categories, 4, seed=0)
    assert [categories[i] for i in kept] == ["lookalike", "lookalike", "cooking", "science"]
    assert kept == sorted(kept)  # file order
    assert stratified_sample(keys, categories, 4, seed=0) == kept
    assert any(stratified_sample(keys, categories, 4, seed=s) != kept for s in range(1, 6))
    # The sample of a category depends on its items' texts, not on the items of other categories.
    more = [*keys, "item 12"]
    assert stratified_sample(more, [*categories, "history"], 4, seed=0)[:2] == kept[:2]
    assert stratified_sample(keys, categories, 12, seed=0) == list(range(12))
    assert len(stratified_sample(keys, None, 5, seed=0)) == 5
    with pytest.raises(DataError, match="categories"):
        stratified_sample(keys, categories[:3], 4, seed=0)


def test_category_readers_give_one_category_per_instruction() -> None:
    benign = benign_eval_categories()
    assert len(benign) == len(benign_eval()) and LOOKALIKE_CATEGORY in benign
    assert len(set(benign)) > 2  # look-alike and ordinary topics
    assert len(harmful_eval_categories()) == len(harmful_eval())
