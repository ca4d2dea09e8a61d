"""``tune --objective remove``: batched per-row measurement, seeded search, choice, held-out report."""

from __future__ import annotations

import pytest

from refusal_dir.abliteration import AblationPoint, Kernel
from refusal_dir.activations import collect_activations
from refusal_dir.directions import compute_directions
from refusal_dir.errors import ConfigError
from refusal_dir.generation import GenerationSettings
from refusal_dir.prompts import benign_eval, harmful_eval, mmlu_questions
from refusal_dir.tune import EvalSplit, split_half
from refusal_dir.tune_remove import (
    PointEvaluator,
    RemoveLimits,
    SearchSettings,
    SearchSpace,
    Trial,
    choose,
    pareto_front,
    search_trials,
    tune_remove,
)

SETTINGS = GenerationSettings(max_new_tokens=3, batch_size=64)
POINTS = [
    AblationPoint(Kernel(1.0, 1.0, 0.5, 2.0), Kernel(0.8, 2.0, 0.0, 1.0)),
    AblationPoint(Kernel(1.4, 0.0, 0.2, 1.5), Kernel(1.1, 3.0, 0.4, 2.5), direction_index=1.5),
    AblationPoint.zero(),
]


@pytest.fixture(scope="module")
def setup(tiny_model):
    positive = collect_activations(tiny_model, harmful_eval()[8:16], progress=False)
    negative = collect_activations(tiny_model, benign_eval()[8:16], progress=False)
    directions = compute_directions(positive, negative, site="resid_pre", model=tiny_model, position_rule="last")
    means = negative.mean("resid_pre").float()
    validation = EvalSplit(harmful_eval()[:3], benign_eval()[:3], mmlu_questions()[:3])
    return tiny_model, directions, means, validation


def _evaluator(setup, **kwargs) -> PointEvaluator:
    model, directions, means, _ = setup
    return PointEvaluator(model, directions, harmless_means=means, settings=SETTINGS, **kwargs)


def test_many_points_in_one_batch_equal_each_point_alone(setup) -> None:
    split = setup[3]
    evaluator = _evaluator(setup)
    together = evaluator.per_item(POINTS, split)
    for point, batched in zip(POINTS, together, strict=True):
        alone = evaluator.per_item([point], split)[0]
        assert batched.values.keys() == alone.values.keys() == {"refusal", "kl", "helpfulness", "mmlu"}
        for metric in ("refusal", "helpfulness", "mmlu"):
            assert batched.values[metric] == alone.values[metric], metric
        assert batched.values["kl"] == pytest.approx(alone.values["kl"], abs=1e-6)
    # The zero point is the unedited model (exactly alone; to float precision beside edited rows),
    # and the others do change it.
    assert alone.values["kl"] == [0.0, 0.0, 0.0]
    assert max(together[2].values["kl"]) < 1e-12
    assert min(together[0].values["kl"]) > 0 and min(together[1].values["kl"]) > 0


def test_a_shared_prefix_measures_what_whole_prompts_measure(setup) -> None:
    """Every point's prefix runs once for its rows; the values are those of whole prompts, and
    the zero point's KL stays 0 (its reference is computed the same way)."""
    from dataclasses import replace

    from refusal_dir.generation import split_prefix

    split = setup[3]
    model, directions, means, _ = setup
    assert split_prefix(model, model.format_prompts(split.benign))[1] > 0  # something is shared
    whole = _evaluator(setup).per_item(POINTS, split)
    shared = PointEvaluator(
        model, directions, harmless_means=means, settings=replace(SETTINGS, share_prefix=True)
    ).per_item(POINTS, split)
    for a, b in zip(whole, shared, strict=True):
        for metric in ("refusal", "helpfulness", "mmlu"):
            assert a.values[metric] == b.values[metric], metric
        assert b.values["kl"] == pytest.approx(a.values["kl"], rel=1e-3, abs=1e-9)
    assert max(shared[2].values["kl"]) < 1e-12 and min(shared[0].values["kl"]) > 1e-5


def test_same_seed_same_trials_and_another_seed_differs(setup) -> None:
    model, _, _, validation = setup

    def run(seed: int, batch: int) -> list[Trial]:
        return search_trials(
            _evaluator(setup, measure=()), model.n_layers, validation=validation,
            search=SearchSettings(trials=6, seed=seed, candidates_per_batch=batch, space=SearchSpace("wide")),
        )[1]

    first, again, other = run(3, 3), run(3, 3), run(4, 3)
    assert [t.point for t in first] == [t.point for t in again]
    assert [(t.refusal, t.kl) for t in first] == [(t.refusal, t.kl) for t in again]
    assert [t.point for t in first] != [t.point for t in other]
    assert len({t.point for t in first}) == 6


def _t(number, refusal, kl, feasible=True) -> Trial:
    return Trial(number, AblationPoint.zero(), refusal, kl, None, None, feasible)


def test_choice_and_front() -> None:
    baseline = _t(-1, 0.9, 0.0)
    cheap_enough = _t(0, 0.1, 0.05)
    cheaper_not_enough = _t(1, 0.3, 0.01)
    best_but_infeasible = _t(2, 0.0, 0.001, feasible=False)
    dominated = _t(3, 0.3, 0.2)
    expensive = _t(4, 0.0, 0.5)
    trials = [cheap_enough, cheaper_not_enough, best_but_infeasible, dominated, expensive]
    assert choose(trials, baseline, RemoveLimits(max_refusal=0.1)) == cheap_enough
    assert choose(trials, baseline, RemoveLimits(max_refusal=0.0)) == expensive
    assert choose(trials, baseline, RemoveLimits(max_refusal=0.5)) == cheaper_not_enough
    assert choose([best_but_infeasible], baseline, RemoveLimits()) == baseline
    assert pareto_front(trials) == [expensive, cheap_enough, cheaper_not_enough]
    with pytest.raises(ConfigError):
        RemoveLimits(max_refusal=-0.1)


def test_constraint_makes_a_damaging_point_infeasible(setup) -> None:
    model, directions, means, validation = setup
    result = search_trials(
        _evaluator(setup, measure=("mmlu",)), model.n_layers, validation=validation,
        search=SearchSettings(trials=4, candidates_per_batch=4, space=SearchSpace("wide"), limits=RemoveLimits(max_mmlu_drop=0.0)),
    )
    baseline, trials, base_items = result
    for trial in trials:
        assert trial.feasible == (trial.mmlu >= baseline.mmlu - 1e-12)


def test_heldout_report_measures_the_chosen_point_on_heldout_items_only(setup, record_tokenized) -> None:
    model, directions, means, _ = setup
    harmful_val, harmful_test = split_half(harmful_eval()[:6])
    benign_val, benign_test = split_half(benign_eval()[:6])
    mmlu_val, mmlu_test = split_half(mmlu_questions()[:6])
    seen = record_tokenized(model)
    at_choice: list[int] = []
    result = tune_remove(
        model, directions, validation=EvalSplit(harmful_val, benign_val, mmlu_val),
        heldout=EvalSplit(harmful_test, benign_test, mmlu_test),
        search=SearchSettings(3, 0, 3, SearchSpace("wide"), RemoveLimits(max_mmlu_drop=1.0, max_helpfulness_drop=1.0)),
        harmless_means=means, settings=SETTINGS, bootstrap_resamples=100,
        on_event=lambda event: at_choice.append(len(seen)) if event == "held-out check" else None,
    )
    heldout_texts = [*harmful_test, *benign_test, *(q.question for q in mmlu_test)]
    before = seen[: at_choice[0]]
    assert not [text for text in before if any(item in text for item in heldout_texts)]
    assert result.heldout["baseline"]["refusal"]["n"] == len(harmful_test)
    assert result.heldout["difference"]["kl"]["n"] == len(benign_test)
    assert result.heldout["baseline"]["kl"]["value"] == 0.0
    assert set(result.heldout["baseline"]) == {"refusal", "kl"}  # no limit below 1: not measured
    assert result.chosen in result.trials or result.chosen == result.baseline


def _cli(capsys, *arguments: str) -> tuple[int, str]:
    from refusal_dir.cli import main

    code = main(list(arguments))
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def extracted_dir(tiny_model_dir, tmp_path_factory):
    from refusal_dir.cli import main

    out = tmp_path_factory.mktemp("extract") / "dirs"
    assert main([
        "extract", "--model", str(tiny_model_dir), "--output-dir", str(out), "--directions-methods", "mean_diff",
        "--no-honesty", "--quiet",
    ]) == 0
    return out


REMOVE = ("--objective", "remove", "--trials", "4", "--candidates-per-batch", "2", "--max-new-tokens", "3",
          "--max-eval-prompts", "6", "--search-space", "wide", "--max-mmlu-drop", "1", "--quiet")


def test_cli_tune_remove_writes_a_reproducible_point(capsys, extracted_dir, tmp_path) -> None:
    import json

    from refusal_dir.tuned import read_tuned

    outputs = []
    for name in ("first", "again"):
        code, err = _cli(capsys, "tune", "--directions-dir", str(extracted_dir), "--output-dir", str(tmp_path / name), *REMOVE)
        assert code == 0, err
        outputs.append(tmp_path / name)
    first, again = (json.loads((out / "tune.json").read_text()) for out in outputs)
    assert first["objective"] == "remove" and len(first["trials"]) == 4
    assert first["share_prefix"] is True  # the CLI's default: prefixes prefilled once per candidate
    assert first["trials"] == again["trials"] and first["chosen_point"] == again["chosen_point"]
    for name in ("trials.csv", "pareto.csv", "tune.md", "figures/pareto.html"):
        assert (outputs[0] / name).is_file(), name
    tuned = read_tuned(outputs[0])
    assert tuned.point.to_dict() == first["chosen_point"]
    assert tuned.options.projected and tuned.options.norm_preserving and tuned.harmless_means is not None
    # Layer L's writes lose layer L's output direction (resid_post, heretic's); the anchor is the
    # selected (resid_pre) direction, found one layer earlier among them.
    assert first["direction_site"] == "resid_post" and tuned.directions.meta.site == "resid_post"
    selected = json.loads((extracted_dir / "directions" / "selected.json").read_text())["layer"]
    assert first["anchor_layer"] == selected - 1 and first["trials"][0]["direction_index"] == selected - 1
    code, err = _cli(capsys, "tune", "--directions-dir", str(extracted_dir), "--output-dir", str(tmp_path / "free"), *REMOVE, "--no-anchor")
    free = json.loads((tmp_path / "free" / "tune.json").read_text())
    assert code == 0 and free["anchor_layer"] is None and free["trials"][0] != first["trials"][0]


def test_cli_direction_site_sets_the_directions_the_means_and_the_anchor(capsys, extracted_dir, tiny_model_dir, tmp_path) -> None:
    """The harmless means that project the directions are taken at the directions' own site
    (resid_post by default), not the config's steering site; --direction-site resid_pre gives
    the behaviour of earlier versions (the selected layer's input direction as the anchor)."""
    import json

    import torch

    from refusal_dir.abliteration import harmless_means
    from refusal_dir.config import load_config
    from refusal_dir.datasets import load_datasets, split_pairs
    from refusal_dir.model import load_model
    from refusal_dir.tuned import read_tuned

    selected = json.loads((extracted_dir / "directions" / "selected.json").read_text())["layer"]
    model = load_model(str(tiny_model_dir), device="cpu", dtype="float32", with_bridge=False)
    config = load_config(None)
    negatives = split_pairs(load_datasets(config).refusal_pairs, config)[0].negatives
    for site, anchor in (("resid_post", selected - 1), ("resid_pre", selected)):
        out = tmp_path / site
        code, err = _cli(capsys, "tune", "--directions-dir", str(extracted_dir), "--output-dir", str(out), *REMOVE,
                         "--trials", "1", "--direction-site", site)
        assert code == 0, err
        record, tuned = json.loads((out / "tune.json").read_text()), read_tuned(out)
        assert record["direction_site"] == site == tuned.directions.meta.site and record["anchor_layer"] == anchor
        expected = harmless_means(model, negatives, site=site, token=config.extraction.token)
        other = harmless_means(model, negatives, site="resid_pre" if site == "resid_post" else "resid_post", token=config.extraction.token)
        assert torch.allclose(tuned.harmless_means, expected, atol=1e-5)
        assert not torch.allclose(tuned.harmless_means, other, atol=1e-3)


def test_ablation_directions_are_each_layers_output_and_the_anchor_is_the_selected_direction(extracted_dir) -> None:
    import dataclasses

    import torch

    from refusal_dir.extraction import load_extraction
    from refusal_dir.tune_remove import ablation_directions

    extraction = load_extraction(extracted_dir / "directions")
    steering, layer = extraction.steering_set, extraction.selected.layer
    assert steering.meta.site == "resid_pre" and layer >= 1
    post, anchor = ablation_directions(extraction)
    assert post.meta.site == "resid_post" and post is extraction.sets["mean_diff_resid_post"]
    # resid_pre of layer L is resid_post of layer L-1: the anchor ablates the selected direction.
    assert anchor == layer - 1
    assert torch.allclose(post.unit(anchor), steering.unit(layer), atol=1e-6)
    assert ablation_directions(extraction, "resid_pre") == (steering, layer)
    # An extraction without resid_post: auto falls back to the steering set; asking for it is refused.
    pre_only = dataclasses.replace(extraction, sets={k: v for k, v in extraction.sets.items() if k.endswith("resid_pre")})
    assert ablation_directions(pre_only) == (steering, layer)
    with pytest.raises(ConfigError, match="extraction.sites"):
        ablation_directions(pre_only, "resid_post")
    with pytest.raises(ConfigError, match="choose one of"):
        ablation_directions(extraction, "resid_mid")


def test_tuned_point_names_a_local_model_by_its_absolute_path(capsys, extracted_dir, tiny_model_dir, tmp_path, monkeypatch) -> None:
    """A relative --model is recorded absolute: export --from-tune from another folder loads the
    model the point was tuned on (before: the relative name, resolved against the new folder)."""
    import dataclasses

    from refusal_dir.tuned import read_tuned, write_tuned

    monkeypatch.chdir(tiny_model_dir.parent)
    relative = f"./{tiny_model_dir.name}"
    code, err = _cli(capsys, "tune", "--directions-dir", str(extracted_dir), "--model", relative,
                     "--output-dir", str(tmp_path / "tuned"), *REMOVE, "--trials", "2")
    assert code == 0, err
    assert read_tuned(tmp_path / "tuned").model == str(tiny_model_dir.resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, err = _cli(capsys, "export", "--from-tune", str(tmp_path / "tuned"), "--output-dir", str(tmp_path / "model"), "--quiet")
    assert code == 0, err
    assert (tmp_path / "model" / "config.json").is_file()
    # A point written before the fix (relative name): refused in one line unless --model is given.
    old = tmp_path / "old"
    write_tuned(old, dataclasses.replace(read_tuned(tmp_path / "tuned"), model=relative))
    code, err = _cli(capsys, "export", "--from-tune", str(old), "--output-dir", str(tmp_path / "m2"), "--quiet")
    assert code == 2 and "relative path" in err and "--model" in err and "Traceback" not in err
    assert not (tmp_path / "m2").exists()


def test_cli_a_missing_direction_site_is_one_line_before_the_model_loads(capsys, extracted_dir, tmp_path, monkeypatch) -> None:
    import shutil

    import refusal_dir.cli as cli

    copy = tmp_path / "extracted"
    shutil.copytree(extracted_dir, copy)
    for folder in (copy / "directions").glob("*_resid_post"):
        shutil.rmtree(folder)
    scores = copy / "directions" / "scores.csv"
    scores.write_text("".join(line for line in scores.read_text().splitlines(keepends=True) if "_resid_post," not in line))

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad flag was refused")

    monkeypatch.setattr(cli, "_load", no_model)
    code, err = _cli(capsys, "tune", "--directions-dir", str(copy), "--output-dir", str(tmp_path / "o"), *REMOVE,
                     "--direction-site", "resid_post")
    assert code == 2 and "resid_post" in err and "--direction-site resid_pre" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [(("--trials", "0"), "--trials"), (("--max-refusal", "-1"), "max_refusal"), (("--candidates-per-batch", "0"), "--candidates-per-batch")],
)
def test_cli_tune_remove_bad_input_is_one_line(capsys, extracted_dir, tmp_path, flags, message) -> None:
    code, err = _cli(capsys, "tune", "--directions-dir", str(extracted_dir), "--output-dir", str(tmp_path / "o"), *REMOVE, *flags)
    lines = [line for line in err.strip().splitlines() if line.startswith("refusal-dir")]
    assert code == 2 and len(lines) == 1 and message in lines[0] and "Traceback" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("space", ["heretic", "wide"])
def test_anchor_starts_the_search_at_the_full_ablation_of_the_layer(setup, space) -> None:
    model, _, _, validation = setup
    layer = model.n_layers // 2
    evaluator = _evaluator(setup, measure=())

    def run(anchor_layer):
        return search_trials(
            evaluator, model.n_layers, validation=validation,
            search=SearchSettings(trials=3, candidates_per_batch=3, space=SearchSpace(space), anchor_layer=anchor_layer),
        )[1]

    anchored, free = run(layer), run(None)
    first = anchored[0].point
    assert first.direction_index == layer
    assert first.layer_weights(model.n_layers).eq(1.0).all()  # every write of every layer, fully
    assert not free[0].point.layer_weights(model.n_layers).eq(1.0).all()
    # Measured like any other point, in the same batch as the sampler's.
    alone = evaluator.per_item([first], validation)[0]
    assert (anchored[0].refusal, anchored[0].kl) == pytest.approx((alone.mean("refusal"), alone.mean("kl")), abs=1e-6)


def test_anchor_layer_must_be_a_layer_of_the_model(setup) -> None:
    model, _, _, validation = setup
    with pytest.raises(ConfigError, match="anchor layer"):
        search_trials(
            _evaluator(setup, measure=()), model.n_layers, validation=validation,
            search=SearchSettings(trials=1, anchor_layer=model.n_layers),
        )


def test_anchor_outside_the_space_is_clamped_into_it() -> None:
    space = SearchSpace("heretic")
    params = space.anchor(24, 0)
    low, high = space.ranges(24)["direction_index"]
    assert params["direction_index"] == low and low > 0
    assert space.anchor(24, 23)["direction_index"] == high < 23
