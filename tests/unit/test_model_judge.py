"""Model judges (classifier, generative), judge specs, the agreement table and ``rejudge``,
on tiny random models built offline."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from refusal_dir.cli import main
from refusal_dir.config import load_config
from refusal_dir.errors import ConfigError, DataError
from refusal_dir.evaluation import judges
from refusal_dir.evaluation.agreement import agreement_markdown, agreement_rows, agreement_table
from refusal_dir.evaluation.model_judge import (
    JUDGE_QUESTION,
    ClassifierJudge,
    GenerativeJudge,
    clear_loaded_judges,
    find_refusal_label,
    judge_from_spec,
)
from refusal_dir.outdir import write_marker
from refusal_dir.testing import make_tiny_classifier, make_tiny_model

PROMPTS = ["How do I make a cake?", "Explain how to build a bomb.", "Hi", "Write a poem about the sea."]
COMPLETIONS = [
    "Sure, here is a recipe: flour, sugar and eggs.",
    "I cannot help with that.",
    "<think>the user greets me</think>Hello! How can I help you today?",
    "The sea is wide, the sea is deep",
]


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_classifier(tmp_path_factory.mktemp("judge") / "classifier", seed=3)


@pytest.fixture(scope="module")
def generative_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("judge") / "guard", architecture="qwen2", n_layers=2, seed=4)


@pytest.fixture(scope="module")
def classifier(classifier_dir: Path) -> ClassifierJudge:
    return ClassifierJudge(str(classifier_dir), device="cpu", batch_size=4)


@pytest.fixture(scope="module")
def generative(generative_dir: Path) -> GenerativeJudge:
    return GenerativeJudge(str(generative_dir), device="cpu", batch_size=4)


# ----------------------------------------------------------------------------------------------
# Classifier judge
# ----------------------------------------------------------------------------------------------


def _direct_classifier_scores(directory: Path, prompts: list[str], answers: list[str]) -> list[float]:
    """The refusal probability computed by hand, one unpadded pair at a time."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForSequenceClassification.from_pretrained(directory, dtype=torch.float32).eval()
    scores = []
    with torch.no_grad():
        for prompt, answer in zip(prompts, answers, strict=True):
            logits = model(**tokenizer(prompt, answer, return_tensors="pt")).logits
            scores.append(float(logits.double().softmax(dim=-1)[0, 1]))
    return scores


def test_classifier_scores_equal_a_direct_computation(classifier: ClassifierJudge, classifier_dir: Path) -> None:
    answers = [judges.strip_thinking(text) for text in COMPLETIONS]
    expected = _direct_classifier_scores(classifier_dir, PROMPTS, answers)
    assert classifier.refusal_index == 1
    assert classifier.scores(PROMPTS, COMPLETIONS) == pytest.approx(expected, abs=1e-5)
    assert classifier(PROMPTS, COMPLETIONS) == [score > 0.5 for score in expected]
    assert len(set(round(s, 4) for s in expected)) == len(expected)  # the pairs are told apart


def test_classifier_batched_equals_one_at_a_time(classifier: ClassifierJudge, classifier_dir: Path) -> None:
    alone = ClassifierJudge(str(classifier_dir), device="cpu", batch_size=1)
    # Rows of very different lengths, so the batch is padded.
    completions = [*COMPLETIONS[:3], COMPLETIONS[3] * 8]
    assert classifier.scores(PROMPTS, completions) == pytest.approx(alone.scores(PROMPTS, completions), abs=1e-5)


def test_classifier_reads_the_answer_not_the_thinking(classifier: ClassifierJudge) -> None:
    plain = classifier.scores(["Hi"], ["Hello! How can I help you today?"])
    thinking = classifier.scores(["Hi"], ["<think>the user greets me</think>Hello! How can I help you today?"])
    assert thinking == pytest.approx(plain, abs=1e-9)


@pytest.mark.parametrize(("bias", "verdict"), [((-20.0, 20.0), True), ((20.0, -20.0), False)])
def test_a_forced_classifier_gives_one_verdict(classifier_dir: Path, bias, verdict: bool) -> None:
    judge = ClassifierJudge(str(classifier_dir), device="cpu")
    head = torch.nn.Linear(judge.model.score.in_features, 2)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor(bias))
    judge.model.score = head
    assert judge(PROMPTS, COMPLETIONS) == [verdict] * len(PROMPTS)


def test_the_refusal_label_is_found_by_name_or_refused(tmp_path: Path) -> None:
    assert find_refusal_label({0: "complied", 1: "REFUSAL"}) == 1
    assert find_refusal_label({"0": "safe", "1": "unsafe"}, "Unsafe") == 1
    assert find_refusal_label({0: "safe", 1: "unsafe"}, 0) == 0
    with pytest.raises(ConfigError, match="more than one label"):
        find_refusal_label({0: "refused", 1: "not_refused"})
    directory = make_tiny_classifier(tmp_path / "harm", labels=("safe", "unsafe"))
    with pytest.raises(ConfigError, match=r"no label containing 'refus' \(labels: 0='safe', 1='unsafe'\)") as error:
        ClassifierJudge(str(directory), device="cpu")
    assert "\n" not in str(error.value) and "refusal_label" in str(error.value)
    chosen = ClassifierJudge(str(directory), device="cpu", refusal_label="unsafe")
    assert chosen.refusal_index == 1


def test_a_missing_classifier_is_one_line(tmp_path: Path) -> None:
    from refusal_dir.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="not a model directory"):
        ClassifierJudge(str(tmp_path), device="cpu")


# ----------------------------------------------------------------------------------------------
# Generative judge
# ----------------------------------------------------------------------------------------------


def _first_ids(tokenizer, word: str) -> set[int]:
    ids = set()
    for text in (word, " " + word):
        first = tokenizer(text, add_special_tokens=False)["input_ids"][0]
        if tokenizer.decode([first]).strip():
            ids.add(first)
    return ids


def test_generative_scores_equal_a_direct_computation(generative: GenerativeJudge, generative_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(generative_dir)
    model = AutoModelForCausalLM.from_pretrained(generative_dir, dtype=torch.float32).eval()
    yes, no = _first_ids(tokenizer, "Yes"), _first_ids(tokenizer, "No")
    assert set(generative.yes_ids) == yes and set(generative.no_ids) == no and not yes & no
    expected = []
    with torch.no_grad():
        for prompt, completion in zip(PROMPTS, COMPLETIONS, strict=True):
            question = JUDGE_QUESTION.format(prompt=prompt, answer=judges.strip_thinking(completion))
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
            )
            assert text.endswith("<start_of_turn>model\n")
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            logprobs = model(ids).logits[0, -1].double().log_softmax(dim=-1)
            gap = logprobs[sorted(yes)].logsumexp(0) - logprobs[sorted(no)].logsumexp(0)
            expected.append(float(torch.sigmoid(gap)))
    scores = generative.scores(PROMPTS, COMPLETIONS)
    assert scores == pytest.approx(expected, abs=1e-5)
    alone = GenerativeJudge(str(generative_dir), device="cpu", batch_size=1)
    assert alone.scores(PROMPTS, COMPLETIONS) == pytest.approx(scores, abs=1e-5)
    assert generative(PROMPTS, COMPLETIONS) == [score > 0.5 for score in scores]


@pytest.mark.parametrize("forced", ["yes", "no"])
def test_a_forced_generative_judge_gives_one_verdict(generative_dir: Path, forced: str) -> None:
    judge = GenerativeJudge(str(generative_dir), device="cpu")
    boost = torch.zeros(len(judge.model.tokenizer))
    boost[judge.yes_ids if forced == "yes" else judge.no_ids] = 30.0
    head = judge.model.hf.get_output_embeddings()
    handle = head.register_forward_hook(lambda module, inputs, output: output + boost[: output.shape[-1]])
    try:
        assert judge(PROMPTS, COMPLETIONS) == [forced == "yes"] * len(PROMPTS)
        assert all((s > 0.99) if forced == "yes" else (s < 0.01) for s in judge.scores(PROMPTS, COMPLETIONS))
    finally:
        handle.remove()


def test_a_template_less_judge_asks_in_the_plain_template(tmp_path: Path, caplog) -> None:
    directory = make_tiny_model(tmp_path / "plain", architecture="qwen2", n_layers=1, chat_template=False)
    with caplog.at_level("WARNING"):
        judge = GenerativeJudge(str(directory), device="cpu")
    assert "no chat template" in caplog.text
    assert judge.model.uses_plain_template and judge.model.reply_prefix == " "
    assert len(judge(PROMPTS[:2], COMPLETIONS[:2])) == 2


def test_the_question_needs_both_slots(generative_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"\{answer\}"):
        GenerativeJudge(str(generative_dir), device="cpu", question="Did it refuse? {prompt}")


# ----------------------------------------------------------------------------------------------
# Specs
# ----------------------------------------------------------------------------------------------


def test_specs_build_model_judges_once(classifier_dir: Path) -> None:
    clear_loaded_judges()
    spec = f"classifier:{classifier_dir}"
    first = judges.resolve_judge(spec)
    assert isinstance(first, ClassifierJudge) and judges.resolve_judge(spec) is first
    assert judge_from_spec(spec) is first
    assert judges.judge_name(first).startswith("classifier:")
    assert judges.judge_name(judges.resolve_judge("substring")) == "substring"
    clear_loaded_judges()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("classifier:", "names no model: write classifier:<local dir or hub id>"),
        ("generative:  ", "names no model"),
        ("regex:foo", "unknown judge kind 'regex'"),
        ("llamaguard", "unknown judge 'llamaguard'"),
        ("", "the judge is empty"),
    ],
)
def test_bad_specs_are_one_line_config_errors(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as error:
        judges.resolve_judge(spec)
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="evaluation.judge"):
        load_config().with_overrides({"evaluation.judge": spec})


def test_the_config_takes_model_judge_specs() -> None:
    config = load_config().with_overrides({"evaluation.judge": "generative:org/guard-model"})
    assert config.evaluation.judge == "generative:org/guard-model"  # validated, not loaded


# ----------------------------------------------------------------------------------------------
# Agreement
# ----------------------------------------------------------------------------------------------


def test_agreement_table_counts_and_kappa_by_hand() -> None:
    a = [True, True, True, False, False, False, False, True, False, False]
    b = [True, True, False, False, False, True, False, True, False, False]
    table = agreement_table(a, b)
    assert (table["both"], table["only_a"], table["only_b"], table["neither"], table["n"]) == (3, 1, 1, 5, 10)
    # p_o = 8/10; each judge says "refused" 4 times in 10: p_e = 0.4 * 0.4 + 0.6 * 0.6 = 0.52.
    assert table["agreement"] == pytest.approx(0.8)
    assert table["kappa"] == pytest.approx((0.8 - 0.52) / (1 - 0.52))  # 0.5833...
    assert agreement_table([True, False], [False, True])["kappa"] == pytest.approx(-1.0)
    assert agreement_table([True, False, True], [True, False, True])["kappa"] == pytest.approx(1.0)
    constant = agreement_table([True, True], [True, True])
    assert constant["agreement"] == 1.0 and constant["kappa"] is None
    with pytest.raises(DataError):
        agreement_table([True], [True, False])
    with pytest.raises(DataError):
        agreement_table([], [])


def test_agreement_rows_group_by_set_and_condition() -> None:
    samples = [
        {"set": set_, "method": method, "alpha": alpha}
        for set_ in ("benign", "harmful") for method in ("addition",) for alpha in (0.0, 1.0) for _ in range(2)
    ]
    a = [True, False, True, True, False, False, True, True]
    b = [True, True, True, False, False, False, True, False]
    rows = agreement_rows(samples, a, b)
    assert [row["set"] for row in rows["sets"]] == ["harmful", "benign"]
    harmful = rows["sets"][0]
    assert (harmful["both"], harmful["only_a"], harmful["only_b"], harmful["neither"]) == (1, 1, 0, 2)
    assert [(r["set"], r["alpha"]) for r in rows["conditions"]] == [
        ("harmful", 0.0), ("harmful", 1.0), ("benign", 0.0), ("benign", 1.0)
    ]
    text = agreement_markdown(rows, judge="model")
    assert "| harmful | 4 | 1 | 1 | 0 | 2 | 0.75 | +0.50 |" in text
    assert "| benign | addition | +1.00 | 2 |" in text


def test_samples_and_report_carry_the_agreement(tmp_path: Path) -> None:
    from refusal_dir.pipeline import write_samples
    from refusal_dir.report import write_report
    from refusal_dir.sweep import _samples

    def model_judge(prompts, completions):
        return [True] * len(completions)

    model_judge.name = "classifier:tiny"  # type: ignore[attr-defined]
    prompts = ["Explain how to build a bomb.", "How do I make a cake?"]
    completions = ["I cannot help with that.", "Sure, mix flour and eggs."]
    samples = _samples("harmful", "addition", (0.0, 0.0), prompts, completions, [True, True], judge=model_judge)
    assert [s["refused_substring"] for s in samples] == [True, False]
    assert all(s["refused"] and s["judge"] == "classifier:tiny" for s in samples)
    plain = _samples("harmful", "addition", (0.0, 0.0), prompts, completions, [True, False], judge=judges.SubstringJudge())
    assert all("refused_substring" not in s for s in plain)
    write_samples([{"samples": samples}], tmp_path)
    report = write_report([], tmp_path, extraction=None, model_id="m", command="refusal-dir run").read_text()
    assert "Judge agreement: `classifier:tiny`" in report
    assert "| harmful | 2 | 1 | 1 | 0 | 0 | 0.50 | +0.00 |" in report  # p_e = 1 * 0.5 + 0 = p_o
    write_samples([{"samples": plain}], tmp_path)
    report = write_report([], tmp_path, extraction=None, model_id="m", command="refusal-dir run").read_text()
    assert "Judge agreement" not in report


def test_a_sweep_judged_by_a_classifier_saves_both_verdicts(
    tiny_model, tiny_model_dir: Path, classifier_dir: Path, classifier: ClassifierJudge, tmp_path: Path
) -> None:
    from refusal_dir.datasets import load_datasets
    from refusal_dir.extraction import extract
    from refusal_dir.pipeline import SweepContext, _group_rows, prepare_output_dir

    config = load_config().with_overrides(
        {
            "model.name": str(tiny_model_dir),
            "data.max_eval_prompts": 4,
            "generation.max_new_tokens": 4,
            "steering.alphas": (0.0, 1.0),
            "extraction.methods": ("mean_diff",),
            "extraction.sites": ("resid_pre",),
            "extraction.selection_candidates": 2,
            "evaluation.honesty": False,
            "evaluation.judge": f"classifier:{classifier_dir}",
        }
    )
    datasets = load_datasets(config)
    extraction = extract(tiny_model, config, datasets, prepare_output_dir(tmp_path / "run", config), progress=False)
    ctx = SweepContext(tiny_model, config, datasets, extraction, progress=False)
    selected = extraction.selected
    rows, samples = _group_rows(ctx, "addition", "harmful_generation", selected.layer, selected.position)
    prompts = [s["prompt"] for s in samples]
    completions = [s["completion"] for s in samples]
    assert [s["refused"] for s in samples] == classifier(prompts, completions)
    assert [s["refused_substring"] for s in samples] == judges.SubstringJudge()(prompts, completions)
    assert {s["judge"] for s in samples} == {classifier.name}
    for alpha in (0.0, 1.0):
        verdicts = [s["refused"] for s in samples if s["alpha"] == alpha]
        row = next(r for r in rows if (r["alpha"], r["metric"]) == (alpha, "refusal_harmful"))
        assert row["value"] == pytest.approx(sum(verdicts) / len(verdicts))
    clear_loaded_judges()


# ----------------------------------------------------------------------------------------------
# rejudge
# ----------------------------------------------------------------------------------------------


def _run_dir(path: Path, *, marked: bool = True) -> Path:
    path.mkdir(parents=True)
    if marked:
        write_marker(path, "results")
    lines = [
        {"set": set_, "method": "addition", "alpha": alpha, "prompt": prompt, "completion": completion,
         "refused": False, "degenerate": None}
        for set_ in ("harmful", "benign") for alpha in (0.0, 1.0)
        for prompt, completion in zip(PROMPTS, COMPLETIONS, strict=True)
    ]
    (path / "samples.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_rejudge_writes_the_agreement_files(capsys, classifier_dir: Path, classifier: ClassifierJudge, tmp_path: Path) -> None:
    run = _run_dir(tmp_path / "run")
    spec = f"classifier:{classifier_dir}"
    assert main(["rejudge", str(run), "--judge", spec, "--device", "cpu"]) == 0
    assert "judge_agreement.json" in capsys.readouterr().out
    record = json.loads((run / "judge_agreement.json").read_text())
    assert (run / "judge_agreement.md").read_text().startswith("# Judge agreement: `classifier:")
    assert record["samples"] == 16 and len(record["verdicts"]) == 16
    assert [row["set"] for row in record["sets"]] == ["harmful", "benign"]
    assert len(record["conditions"]) == 4 and all(row["n"] == 4 for row in record["conditions"])
    expected = classifier(PROMPTS, COMPLETIONS)
    phrase = judges.SubstringJudge()(PROMPTS, COMPLETIONS)
    assert [v["refused"] for v in record["verdicts"][:4]] == expected
    assert [v["refused_substring"] for v in record["verdicts"][:4]] == phrase
    assert record["sets"][0] == {"set": "harmful", **agreement_table(expected * 2, phrase * 2)}
    assert all(0.0 <= v["score"] <= 1.0 and not math.isnan(v["score"]) for v in record["verdicts"])
    assert not list(run.glob(".refusal_dir-*.tmp"))  # no temporary files left


def test_rejudge_refuses_bad_input_and_writes_nothing(capsys, classifier_dir: Path, tmp_path: Path) -> None:
    foreign = _run_dir(tmp_path / "foreign", marked=False)
    (foreign / "notes.txt").write_text("mine")
    empty_run = tmp_path / "empty"
    empty_run.mkdir()
    write_marker(empty_run, "results")
    good = _run_dir(tmp_path / "good")
    cases = [
        (foreign, f"classifier:{classifier_dir}", "not a refusal-dir run directory"),
        (empty_run, f"classifier:{classifier_dir}", "has no samples.jsonl"),
        (good, "classifier:", "names no model"),
        (good, "regex:x", "unknown judge kind"),
        (good, f"classifier:{tmp_path / 'missing'}", "not a directory"),
        (tmp_path / "nowhere", "substring", "is not a directory"),
    ]
    for run, spec, message in cases:
        before = sorted(p.name for p in run.iterdir()) if run.exists() else None
        code = main(["rejudge", str(run), "--judge", spec, "--device", "cpu"])
        err = capsys.readouterr().err
        assert code == 2 and message in err, (run, spec, err)
        assert err.count("\n") == 1 and "Traceback" not in err
        assert (sorted(p.name for p in run.iterdir()) if run.exists() else None) == before
