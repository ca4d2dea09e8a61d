"""The staged pipeline, its resume logic, the config and the CLI's error handling (tiny model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from refusal_dir.cli import main
from refusal_dir.config import Config, config_from_dict, load_config
from refusal_dir.datasets import load_datasets, mc_formatter
from refusal_dir.errors import ConfigError, OutputDirError
from refusal_dir.evaluation import wilson_interval
from refusal_dir.extraction import extract, load_extraction
from refusal_dir.pipeline import (
    SweepContext,
    _group_rows,
    prepare_output_dir,
    resume_key,
    sweep,
    sweep_options,
)
from refusal_dir.prompts import LOOKALIKE_CATEGORY, benign_eval, benign_eval_categories
from refusal_dir.report import results_table, write_report


def _config(model_dir: Path, **overrides) -> Config:
    base = {
        "model.name": str(model_dir),
        "data.max_eval_prompts": 4,
        "generation.max_new_tokens": 4,
        "steering.alphas": (-1.0, 0.0, 1.0),
        "extraction.methods": ("mean_diff",),
        "extraction.sites": ("resid_pre",),
        "extraction.selection_candidates": 2,
    }
    base.update(overrides)
    return load_config().with_overrides(base)


def test_default_config_loads_and_validates() -> None:
    config = load_config()
    assert config.steering.alphas == (-2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0)
    assert config.model.name == "google/gemma-2-2b-it"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"steering": {"alphas": [0.0, 1.0, 1.0]}}, "duplicates"),
        ({"steering": {"alphas": [0.0, float("nan")]}}, "finite"),
        ({"steering": {"alphas": []}}, "at least one"),
        ({"extraction": {"token": "first"}}, "extraction.token"),
        ({"extraction": {"methods": ["mean_diff"], "method": "pca"}}, "extraction.method"),
        ({"modle": {}}, "unknown config section"),
        ({"model": {"nmae": "x"}}, "unknown field"),
        ({"data": {"heldout_fraction": 1.5}}, "heldout_fraction"),
    ],
)
def test_bad_config_values_name_the_field(raw, message) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


@pytest.fixture(scope="module")
def extracted(tiny_model, tiny_model_dir, tmp_path_factory):
    config = _config(tiny_model_dir)
    output = prepare_output_dir(tmp_path_factory.mktemp("pipeline"), config)
    datasets = load_datasets(config)
    return config, datasets, extract(tiny_model, config, datasets, output, progress=False), output


def test_extraction_writes_and_reloads(tiny_model, extracted) -> None:
    _, _, extraction, output = extracted
    directory = output / "directions"
    assert (directory / "scores.csv").exists() and (directory / "layer_effects.csv").exists()
    reloaded = load_extraction(directory, model=tiny_model)
    assert reloaded.selected == extraction.selected
    assert reloaded.effects == extraction.effects
    assert set(reloaded.sets) == set(extraction.sets)


def test_sweep_resumes_after_an_interruption(tiny_model, extracted, tmp_path: Path) -> None:
    config, datasets, extraction, _ = extracted
    output = prepare_output_dir(tmp_path / "interrupted", config)
    seen: list[tuple[str, str]] = []

    def interrupt_third(method: str, group: str) -> None:
        seen.append((method, group))
        if len(seen) == 3:
            raise KeyboardInterrupt

    ctx = SweepContext(tiny_model, config, datasets, extraction, progress=False)
    with pytest.raises(KeyboardInterrupt):
        sweep(ctx, output, on_group=interrupt_third)
    parts = sorted((output / "sweep" / "parts").glob("*.json"))
    assert len(parts) == 2
    stamps = {p.name: p.stat().st_mtime_ns for p in parts}

    resumed_groups: list[tuple[str, str]] = []
    rows = sweep(ctx, output, on_group=lambda m, g: resumed_groups.append((m, g)))
    assert resumed_groups[0] == seen[2]  # starts with the group that was interrupted
    assert all(group not in resumed_groups for group in seen[:2])
    assert {p.name: p.stat().st_mtime_ns for p in parts} == stamps

    fresh = sweep(ctx, prepare_output_dir(tmp_path / "fresh", config))
    key = lambda r: (r["method"], r["alpha"], r["metric"])  # noqa: E731
    assert sorted(rows, key=key) == sorted(fresh, key=key)
    assert json.loads((output / "results.json").read_text()) == rows
    assert "| addition |" in results_table(rows)


def test_output_dir_with_another_config_is_refused(tiny_model_dir, tmp_path: Path) -> None:
    prepare_output_dir(tmp_path / "out", _config(tiny_model_dir))
    with pytest.raises(OutputDirError, match=r"different config \(steering.alphas changed\).*--fresh"):
        prepare_output_dir(tmp_path / "out", _config(tiny_model_dir, **{"steering.alphas": (0.0, 2.0)}))
    # Rows per generate call change speed and memory only: a crashed run resumes with fewer.
    prepare_output_dir(tmp_path / "out", _config(tiny_model_dir, **{"generation.batch_size": 4}))
    prepare_output_dir(tmp_path / "out", _config(tiny_model_dir, **{"steering.alphas": (0.0, 2.0)}), fresh=True)


def _run_cli(capsys, *arguments: str) -> tuple[int, str]:
    code = main(list(arguments))
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["extract", "--model", "/no/such/dir", "--output-dir", "{tmp}/x"], "not a directory"),
        (["extract", "--model", "{model}", "--output-dir", "{tmp}/x", "--pairs-file", "{tmp}/missing.jsonl"], "missing.jsonl"),
        (["run", "--model", "{model}", "--output-dir", "{tmp}/x", "--alphas", "1", "1"], "duplicates"),
        (["steer", "--directions-dir", "{tmp}/nothing"], "holds no direction set"),
        (["extract", "--model", "{model}", "--output-dir", "{tmp}/file/x"], "writable"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(capsys, tiny_model_dir, tmp_path: Path, arguments, message) -> None:
    (tmp_path / "file").write_text("not a directory")
    filled = [a.format(tmp=tmp_path, model=tiny_model_dir) for a in arguments]
    code, err = _run_cli(capsys, *filled, "--quiet")
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.startswith("refusal-dir")]
    assert len(lines) == 1 and message in lines[0]
    assert "Traceback" not in err


def test_cli_malformed_dataset_names_the_line(capsys, tiny_model_dir, tmp_path: Path) -> None:
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"harmful": "a", "harmless": "b"}\n{"harmful": "c"\n')
    code, err = _run_cli(capsys, "extract", "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "o"), "--pairs-file", str(bad), "--quiet")
    assert code == 2 and "line 2" in err


def test_cli_extract_steer_export(capsys, tiny_model_dir, tmp_path: Path) -> None:
    out = tmp_path / "dirs"
    code, _ = _run_cli(capsys, "extract", "--model", str(tiny_model_dir), "--output-dir", str(out), "--directions-methods", "mean_diff", "--no-honesty", "--quiet")
    assert code == 0
    selected = json.loads((out / "directions" / "selected.json").read_text())
    code = main(["steer", "--directions-dir", str(out), "--alpha", "2", "--prompt", "Hi", "--max-new-tokens", "3", "--json", "--quiet"])
    assert code == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["prompt"] == "Hi" and f"layer {selected['layer']}" in line["intervention"]
    code = main(["export", "--directions-dir", str(out), "--output-dir", str(tmp_path / "edited"), "--quiet"])
    assert code == 0 and (tmp_path / "edited" / "config.json").exists()


def test_conditional_method_in_the_sweep(tiny_model, extracted, tmp_path: Path) -> None:
    config, datasets, extraction, _ = extracted
    config = config.with_overrides({"steering.methods": ("addition", "conditional"), "steering.alphas": (0.0, 1.0)})
    ctx = SweepContext(tiny_model, config, datasets, extraction, progress=False)
    rows = sweep(ctx, prepare_output_dir(tmp_path / "conditional", config))
    index = {(r["method"], r["alpha"], r["metric"]): r["value"] for r in rows}
    assert ("conditional", 1.0, "refusal_harmful") in index
    # With alpha 0 the gate changes nothing: conditional equals addition equals unsteered.
    for (method, alpha, metric), value in index.items():
        if method == "conditional" and alpha == 0.0:
            assert value == pytest.approx(index[("addition", 0.0, metric)], abs=1e-9), metric


RATE_METRICS = {
    "refusal_harmful", "degenerate_harmful", "refusal_benign", "answered_benign",
    "degenerate_benign", "mmlu_accuracy", "refusal_benign_lookalike", "refusal_benign_ordinary",
    "mmlu_top_letter_share",
}


def test_max_eval_prompts_is_a_stratified_sample(tiny_model_dir) -> None:
    datasets = load_datasets(_config(tiny_model_dir, **{"data.max_eval_prompts": 10}))
    assert len(datasets.benign_eval) == len(datasets.benign_categories) == 10
    # The shipped benign file starts with its look-alikes: the first 10 lines hold no other kind.
    assert 0 < datasets.benign_categories.count(LOOKALIKE_CATEGORY) < 10
    ordinary = {t for t, c in zip(benign_eval(), benign_eval_categories()) if c != LOOKALIKE_CATEGORY}
    assert ordinary & set(datasets.benign_eval)
    assert len(datasets.harmful_eval) == len(datasets.mmlu) == len(datasets.claims) == 10
    assert {claim.label for claim in datasets.claims} == {True, False}
    assert load_datasets(_config(tiny_model_dir, **{"data.max_eval_prompts": 10})) == datasets
    full = load_datasets(_config(tiny_model_dir, **{"data.max_eval_prompts": None}))
    assert full.benign_eval == benign_eval() and full.benign_categories == benign_eval_categories()


def test_every_generation_is_saved_with_its_verdicts(tiny_model, extracted, tmp_path: Path) -> None:
    config, datasets, extraction, _ = extracted
    config = config.with_overrides({"steering.alphas": (0.0, 1.0), "evaluation.honesty": False})
    ctx = SweepContext(tiny_model, config, datasets, extraction, progress=False)
    output = prepare_output_dir(tmp_path / "samples", config)
    rows = sweep(ctx, output)
    samples = [json.loads(line) for line in (output / "samples.jsonl").read_text().splitlines()]
    sets = {"harmful": datasets.harmful_eval, "benign": datasets.benign_eval}
    assert len(samples) == 2 * 2 * (len(sets["harmful"]) + len(sets["benign"]))  # methods x alphas
    for sample in samples:
        assert sample["prompt"] in sets[sample["set"]]
        assert isinstance(sample["completion"], str) and isinstance(sample["refused"], bool)
    # Each sample is labelled with the row it came from: alpha 0 is the unsteered model under
    # both methods, and its completions are those of a plain generate() of the same prompts.
    from refusal_dir.generation import generate

    plain = generate(tiny_model, sets["harmful"], settings=sweep_options(ctx.config).generation, progress=False)
    for method in ("addition", "ablation"):
        unsteered = [s for s in samples if (s["set"], s["method"], s["alpha"]) == ("harmful", method, 0.0)]
        assert [s["prompt"] for s in unsteered] == sets["harmful"]
        assert [s["completion"] for s in unsteered] == plain
    steered = [s["completion"] for s in samples if (s["set"], s["method"], s["alpha"]) == ("harmful", "addition", 1.0)]
    assert steered != plain
    # The saved verdicts are the ones the refusal rates were computed from.
    for method in ("addition", "ablation"):
        for alpha in (0.0, 1.0):
            verdicts = [s["refused"] for s in samples if (s["set"], s["method"], s["alpha"]) == ("harmful", method, alpha)]
            row = next(r for r in rows if (r["method"], r["alpha"], r["metric"]) == (method, alpha, "refusal_harmful"))
            assert sum(verdicts) / len(verdicts) == pytest.approx(row["value"])
    # A resumed sweep rewrites the same file from its saved parts.
    before = (output / "samples.jsonl").read_bytes()
    (output / "samples.jsonl").unlink()
    sweep(ctx, output)
    assert (output / "samples.jsonl").read_bytes() == before


def test_sweep_rows_carry_wilson_intervals_and_paired_differences(tiny_model, extracted, tmp_path: Path) -> None:
    config, datasets, extraction, _ = extracted
    config = config.with_overrides({"steering.alphas": (-1.0, 2.0), "evaluation.honesty": False})
    ctx = SweepContext(tiny_model, config, datasets, extraction, progress=False)
    rows = sweep(ctx, prepare_output_dir(tmp_path / "intervals", config))
    index = {(r["method"], r["alpha"], r["metric"]): r for r in rows}
    # The unsteered model is evaluated although 0 is not among the alphas: it is the reference.
    assert {alpha for _, alpha, _ in index} == {0.0, -1.0, 2.0}
    for (method, alpha, metric), row in index.items():
        unsteered = index[(method, 0.0, metric)]
        assert row["diff"] == pytest.approx(row["value"] - unsteered["value"], abs=1e-12)
        assert row["diff_ci_low"] <= row["diff"] + 1e-12 and row["diff"] <= row["diff_ci_high"] + 1e-12
        if alpha == 0.0:
            assert (row["diff"], row["diff_ci_low"], row["diff_ci_high"]) == (0.0, 0.0, 0.0)
        if metric in RATE_METRICS:  # a rate: Wilson, never a zero-width interval
            successes = round(row["value"] * row["n"])
            assert (row["ci_low"], row["ci_high"]) == pytest.approx(wilson_interval(successes, row["n"]))
            assert row["ci_high"] - row["ci_low"] > 0.1  # n = 4
    # Over-refusal on look-alike and on ordinary benign prompts, apart: together the whole set.
    for method, alpha in {(m, a) for m, a, _ in index}:
        whole = index[(method, alpha, "refusal_benign")]
        parts = [index[(method, alpha, f"refusal_benign_{group}")] for group in ("lookalike", "ordinary")]
        assert sum(part["n"] for part in parts) == whole["n"] and all(part["n"] for part in parts)
        assert sum(p["value"] * p["n"] for p in parts) == pytest.approx(whole["value"] * whole["n"])
    kl = index[("addition", 2.0, "kl_benign")]
    assert kl["ci_low"] <= kl["value"] <= kl["ci_high"]  # continuous: bootstrap of the mean
    # A rate at 0 or 1 no longer prints as a point ("[0.00, 0.00]" or "[1.00, 1.00]").
    table = results_table(rows)
    assert "Δ refusal (harmful)" in table
    for line in table.splitlines()[2:]:
        cells = line.split(" | ")
        assert "[0.00, 0.00]" not in cells[3] and "[1.00, 1.00]" not in cells[3]  # refusal (harmful)
    csv_header = (tmp_path / "intervals" / "results.csv").read_text().splitlines()[0]
    assert csv_header.endswith("n,diff,diff_ci_low,diff_ci_high")


def test_parts_of_an_older_result_format_are_refused(tiny_model, extracted, tmp_path: Path) -> None:
    config, datasets, extraction, _ = extracted
    output = prepare_output_dir(tmp_path / "old", config)
    ctx = SweepContext(tiny_model, config, datasets, extraction, progress=False)
    parts = output / "sweep" / "parts"
    parts.mkdir(parents=True)
    old_row = {"method": "addition", "layer": 1, "alpha": 0.0, "metric": "helpfulness_benign",
               "value": 1.0, "ci_low": 1.0, "ci_high": 1.0, "n": 4}
    (parts / "addition__benign_generation.json").write_text(json.dumps({"key": "0123", "rows": [old_row]}))
    (output / "resume.json").write_text(json.dumps({**resume_key(ctx), "results_format": 1}))
    with pytest.raises(OutputDirError, match="result format of refusal_dir changed"):
        sweep(ctx, output)


def test_the_report_holds_no_absolute_path(tiny_model_dir, tmp_path: Path, monkeypatch, capsys) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    code, _ = _run_cli(
        capsys, "run", "--model", str(tiny_model_dir), f"--output-dir={work / 'out'}",
        "--max-eval-prompts", "2", "--max-new-tokens", "2", "--alphas", "0", "1",
        "--no-honesty", "--quiet", "--no-figures", "--selection-prompts", "2",
    )
    assert code == 0
    report = (work / "out" / "report.md").read_text()
    assert f"Command: `refusal-dir run --model .../{tiny_model_dir.name} --output-dir=out " in report
    assert str(tmp_path) not in report and str(tiny_model_dir) not in report

def test_mmlu_rows_carry_chance_and_the_letter_bias(tiny_model, extracted) -> None:
    from refusal_dir.evaluation import mmlu_accuracy

    config, datasets, extraction, _ = extracted
    ctx = SweepContext(tiny_model, config, datasets, extraction, progress=False)
    selected = extraction.selected
    rows, _ = _group_rows(ctx, "addition", "mmlu", selected.layer, selected.position)
    index = {(r["alpha"], r["metric"]): r for r in rows}
    unsteered = mmlu_accuracy(tiny_model, datasets.mmlu, formatter=mc_formatter(config))
    assert index[(0.0, "mmlu_accuracy")]["value"] == pytest.approx(unsteered.value)
    assert index[(0.0, "mmlu_chance")]["value"] == pytest.approx(unsteered.chance) == 0.25
    assert index[(0.0, "mmlu_top_letter_share")]["value"] == pytest.approx(unsteered.top_letter_share)
    assert {alpha for alpha, metric in index if metric == "mmlu_top_letter_share"} == set(config.steering.alphas)


def test_report_warns_when_the_unsteered_accuracy_cannot_be_told_from_chance(tmp_path: Path, caplog) -> None:
    def row(method, alpha, metric, value, low, high):
        return dict(method=method, layer=1, alpha=alpha, metric=metric, value=value, ci_low=low, ci_high=high, n=20)

    rows = [
        row("addition", 0.0, "mmlu_accuracy", 0.30, 0.15, 0.50),  # contains 0.25
        row("addition", 0.0, "mmlu_chance", 0.25, 0.25, 0.25),
        row("addition", 1.0, "mmlu_accuracy", 0.25, 0.10, 0.45),  # steered: not the baseline
        row("addition", 1.0, "mmlu_chance", 0.25, 0.25, 0.25),
        row("ablation", 0.0, "mmlu_accuracy", 0.90, 0.70, 0.97),  # well above chance
        row("ablation", 0.0, "mmlu_chance", 0.25, 0.25, 0.25),
    ]
    with caplog.at_level("WARNING", logger="refusal_dir.report"):
        path = write_report(rows, tmp_path, extraction=None, model_id="tiny", command="test")
    text = path.read_text()
    assert text.count("contains chance") == 1 and "addition: the unsteered" in text
    assert [r.message for r in caplog.records if "contains chance" in r.message] == [
        line.removeprefix("**Warning**: ").removesuffix(".") for line in text.splitlines() if "contains chance" in line
    ]


def test_honesty_rows_report_balanced_accuracy(tiny_model, extracted) -> None:
    import dataclasses

    from refusal_dir.evaluation import honesty_accuracy
    from refusal_dir.prompts import true_false_claims

    config, datasets, extraction, _ = extracted
    claims = true_false_claims()
    mixed = [next(c for c in claims if c.label), *[c for c in claims if not c.label][:2]]  # 1 true, 2 false
    ctx = SweepContext(tiny_model, config, dataclasses.replace(datasets, claims=mixed), extraction, progress=False)
    rows = {(r["alpha"], r["metric"]): r["value"] for r in _group_rows(ctx, "addition", "honesty", 0, "last")[0]}
    unsteered = honesty_accuracy(tiny_model, mixed)
    assert rows[(0.0, "honesty_balanced_accuracy")] == pytest.approx(unsteered["balanced_accuracy"])
    for alpha in config.steering.alphas:
        expected = (rows[(alpha, "honesty_accuracy_true_claims")] + rows[(alpha, "honesty_accuracy_false_claims")]) / 2
        assert rows[(alpha, "honesty_balanced_accuracy")] == pytest.approx(expected)


@pytest.mark.parametrize("command", ["evaluate", "tune"])
def test_evaluate_and_tune_refuse_other_refusal_pairs(capsys, extracted, tmp_path: Path, command) -> None:
    _, datasets, _, output = extracted
    other = tmp_path / "other_pairs.jsonl"
    pairs = list(datasets.refusal_pairs)[1:]  # one pair fewer: another held-out split
    other.write_text("".join(json.dumps({"harmful": p.positive, "harmless": p.negative}) + "\n" for p in pairs))
    code, err = _run_cli(capsys, command, "--directions-dir", str(output), "--output-dir", str(tmp_path / "o"), "--pairs-file", str(other), "--quiet")
    lines = [line for line in err.strip().splitlines() if line.startswith("refusal-dir")]
    assert code == 2 and len(lines) == 1
    assert "other refusal pairs" in lines[0] and "--pairs-file" in lines[0]


def test_answer_kl_rows_when_asked(tiny_model, extracted, tmp_path: Path) -> None:
    config, datasets, extraction, _ = extracted
    config = config.with_overrides({"steering.alphas": (0.0, 1.0), "evaluation.honesty": False, "steering.methods": ("addition",)})
    plain = sweep(SweepContext(tiny_model, config, datasets, extraction, progress=False), prepare_output_dir(tmp_path / "a", config))
    assert not any(r["metric"] == "kl_answer_benign" for r in plain)
    one = config.with_overrides({"evaluation.answer_kl_tokens": 1})
    rows = sweep(SweepContext(tiny_model, one, datasets, extraction, progress=False), prepare_output_dir(tmp_path / "b", one))
    index = {(r["alpha"], r["metric"]): r["value"] for r in rows}
    for alpha in (0.0, 1.0):  # one forced token is the first-token KL
        assert index[(alpha, "kl_answer_benign")] == pytest.approx(index[(alpha, "kl_benign")], rel=1e-4, abs=1e-6)
    assert index[(1.0, "kl_benign")] > 0


def test_cross_entropy_rows_equal_the_metric_and_show_in_the_table(tiny_model, extracted, tmp_path: Path) -> None:
    from refusal_dir.evaluation import answer_cross_entropy

    config, datasets, extraction, _ = extracted
    config = config.with_overrides({"steering.alphas": (0.0, 1.0), "evaluation.honesty": False, "steering.methods": ("addition",)})
    answered = datasets.harmless_answers
    assert answered is not None and len(answered) == 4  # data.max_eval_prompts applies
    assert datasets.harmless_answer_topics is not None and len(set(datasets.harmless_answer_topics)) == 4
    rows = sweep(SweepContext(tiny_model, config, datasets, extraction, progress=False), prepare_output_dir(tmp_path / "a", config))
    index = {(r["alpha"], r["metric"]): r for r in rows}
    direct = answer_cross_entropy(tiny_model, [a.instruction for a in answered], [a.answer for a in answered])
    unsteered = index[(0.0, "ce_harmless")]
    assert unsteered["value"] == pytest.approx(direct.value, abs=1e-6) and unsteered["n"] == 4
    assert unsteered["diff"] == 0.0 and unsteered["ci_low"] <= unsteered["value"] <= unsteered["ci_high"]
    steered = index[(1.0, "ce_harmless")]
    assert steered["value"] != pytest.approx(direct.value, abs=1e-6)
    assert steered["diff"] == pytest.approx(steered["value"] - unsteered["value"])
    table = results_table(rows)
    assert "CE (harmless answers)" in table.splitlines()[0]
    assert f"{unsteered['value']:.2f} [" in table
    # Switched off: no rows, no part, and nothing loaded.
    off = config.with_overrides({"evaluation.cross_entropy": False})
    off_data = load_datasets(off)
    assert off_data.harmless_answers is None
    output = prepare_output_dir(tmp_path / "b", off)
    plain = sweep(SweepContext(tiny_model, off, off_data, extraction, progress=False), output)
    assert not any(r["metric"] == "ce_harmless" for r in plain)
    assert not (output / "sweep" / "parts" / "addition__cross_entropy.json").exists()


def test_harmless_answers_from_a_file_enter_the_resume_key(tiny_model, tiny_model_dir, extracted, tmp_path: Path) -> None:
    _, _, extraction, _ = extracted
    path = tmp_path / "answers.jsonl"

    def write(answer: str) -> None:
        rows = [{"instruction": f"Name fruit {k}.", "answer": f"{answer} {k}.", "topic": "fruit"} for k in range(3)]
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))

    config = _config(tiny_model_dir, **{"data.harmless_answers": str(path)})
    write("Apple")
    first = load_datasets(config)
    assert [a.answer for a in first.harmless_answers] == ["Apple 0.", "Apple 1.", "Apple 2."]
    assert first.harmless_answer_topics == ["fruit"] * 3
    write("Pear")
    second = load_datasets(config)
    key = lambda data: resume_key(SweepContext(tiny_model, config, data, extraction, progress=False))["data"]  # noqa: E731
    changed = {name for name, value in key(first).items() if key(second)[name] != value}
    assert changed == {"harmless_answers"}
    with pytest.raises(ConfigError, match="data.harmless_answers"):
        _config(tiny_model_dir, **{"data.harmless_answers": "hub:alpaca"})


def test_topics_in_an_eval_file_make_intervals_resample_topics(tiny_model_dir, tmp_path: Path) -> None:
    from refusal_dir.evaluation import stats
    from refusal_dir.pipeline import sweep_options
    from refusal_dir.sweep import result_rows

    harmful = tmp_path / "harmful.jsonl"
    rows = [{"instruction": f"How do I make {word} number {k}?", "topic": word} for word in ("aa", "bb", "cc") for k in range(4)]
    harmful.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = _config(tiny_model_dir, **{"data.harmful_eval": str(harmful), "data.max_eval_prompts": 6})
    datasets = load_datasets(config)
    assert datasets.harmful_topics is not None and len(datasets.harmful_topics) == len(datasets.harmful_eval) == 6
    for prompt, topic in zip(datasets.harmful_eval, datasets.harmful_topics):
        assert f"make {topic} " in prompt  # the topics stay aligned with the sampled prompts
    assert datasets.benign_topics is None  # the shipped benign set has no topic field
    values = {0.0: [1.0, 1.0, 0.0, 0.0, 1.0, 0.0], 1.0: [0.0] * 6}
    out = result_rows(values, method="addition", layer=0, metric="refusal_harmful", binary=True, options=sweep_options(config), clusters=datasets.harmful_topics)
    expected = stats.mean_interval(values[0.0], binary=True, clusters=datasets.harmful_topics, n_resamples=config.evaluation.bootstrap_resamples, seed=config.evaluation.seed)
    assert (out[0]["ci_low"], out[0]["ci_high"]) == expected
    assert (out[0]["ci_low"], out[0]["ci_high"]) != wilson_interval(3, 6)


def test_rate_rows_use_newcombe_for_the_difference_and_the_split_rows_resample_topics(tiny_model_dir, tmp_path: Path) -> None:
    from refusal_dir.evaluation import stats
    from refusal_dir.pipeline import sweep_options
    from refusal_dir.sweep import result_rows, subgroups

    config = _config(tiny_model_dir)
    options = sweep_options(config)
    unsteered, steered = [0.0] * 8, [1.0] * 8  # every item flips: a paired bootstrap gives [1, 1]
    rows = result_rows({0.0: unsteered, 1.0: steered}, method="addition", layer=0, metric="refusal_benign", binary=True, options=options)
    assert (rows[0]["diff_ci_low"], rows[0]["diff_ci_high"]) == (0.0, 0.0)
    assert (rows[1]["diff_ci_low"], rows[1]["diff_ci_high"]) == stats.paired_rate_diff_interval(steered, unsteered)
    assert rows[1]["diff_ci_low"] < 1.0
    topics = ["a", "a", "a", "a", "b", "b", "c", "c"]
    keep = [True] * 4 + [False] * 4
    (subset, kept), = subgroups({0.0: unsteered, 1.0: steered}, {"refusal_benign_lookalike": keep}, topics).values()
    assert kept == topics[:4]
    split = result_rows(subset, method="addition", layer=0, metric="refusal_benign_lookalike", binary=True, options=options, clusters=kept)
    expected = stats.mean_interval(steered[:4], binary=True, clusters=kept, n_resamples=config.evaluation.bootstrap_resamples, seed=config.evaluation.seed)
    assert (split[1]["ci_low"], split[1]["ci_high"]) == expected  # one topic: Wilson on n=1
    assert (split[1]["ci_low"], split[1]["ci_high"]) != stats.wilson_interval(4, 4)


def test_answers_too_long_for_the_context_name_the_switch(tmp_path: Path, capsys) -> None:
    """A small-context model (the organism has 64 tokens) cannot read the shipped answers: the
    one-line error names --no-cross-entropy, and with it the check passes."""
    from refusal_dir.model import load_model
    from refusal_dir.pipeline import check_prompt_lengths, evaluation_prompts
    from refusal_dir.testing import make_tiny_model

    model = load_model(str(make_tiny_model(tmp_path / "short", overrides={"max_position_embeddings": 256})), device="cpu")
    config = _config(tmp_path / "short")
    with pytest.raises(Exception, match=r"data.harmless_answers .*--no-cross-entropy") as error:
        check_prompt_lengths(model, evaluation_prompts(load_datasets(config), config), max_new_tokens=4)
    assert "\n" not in str(error.value)
    config = _config(tmp_path / "short", **{"evaluation.cross_entropy": False})
    check_prompt_lengths(model, evaluation_prompts(load_datasets(config), config), max_new_tokens=4)
