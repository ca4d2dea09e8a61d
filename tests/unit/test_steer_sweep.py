"""The ``Steer`` spec and the public ``sweep()`` (issue #16): one factory, one sweep engine."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from refusal_dir import PromptInstructions, Steer, SweepOptions, sweep
from refusal_dir.activations import collect_activations
from refusal_dir.conditional import fit_condition
from refusal_dir.directions import compute_directions
from refusal_dir.errors import ConfigError
from refusal_dir.generation import GenerationSettings, generate
from refusal_dir.interventions import ablation, addition
from refusal_dir.prompts import benign_eval, harmful_eval, mmlu_questions


@pytest.fixture(scope="module")
def directions(tiny_model):
    positive = collect_activations(tiny_model, harmful_eval()[8:16], progress=False)
    negative = collect_activations(tiny_model, benign_eval()[8:16], progress=False)
    return compute_directions(positive, negative, site="resid_pre", model=tiny_model, position_rule="last")


def _same(a, b) -> None:
    assert type(a) is type(b)
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        assert torch.equal(torch.as_tensor(x), torch.as_tensor(y)) if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor) else x == y, f.name


def test_steer_at_builds_the_factories_interventions(tiny_model, directions) -> None:
    (add,) = Steer("addition", directions, layer=1, apply_to="prompt", unit="unit").at([0.0, 2.0])
    _same(add, addition(directions, layer=1, alpha=[0.0, 2.0], apply_to="prompt", unit="unit"))
    (where,) = Steer("addition", directions, layer=1, at_layers=(0, 2)).at(1.0)
    assert where.at_layers == (0, 2)
    torch.testing.assert_close(where.vector, directions.vector(1, None).float())
    (abl,) = Steer("ablation", directions, layer=2).at(0.5)
    _same(abl, ablation(directions, layer=2, alpha=0.5))
    assert Steer("prompt").at([-1.0, 0.0, 1.0]) == []


def test_conditional_steer_gates_each_row(tiny_model, directions) -> None:
    condition = fit_condition(tiny_model, directions, layer=1, positive=harmful_eval()[:4], negative=benign_eval()[:4])
    spec = Steer("conditional", directions, layer=1, condition=condition)
    with pytest.raises(ConfigError, match="model= and prompts="):
        spec.at(1.0)
    prompts = [condition_prompt for condition_prompt in (harmful_eval()[0], benign_eval()[0])]
    (gated,) = spec.at(3.0, model=tiny_model, prompts=prompts)
    from refusal_dir.conditional import gate

    fires = gate(tiny_model, prompts, condition).float()
    assert torch.equal(gated.alpha, 3.0 * fires)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "steer"}, "unknown steering method"),
        ({"method": "addition"}, "needs directions"),
        ({"method": "prompt", "directions": torch.ones(4)}, "no directions"),
        ({"method": "conditional", "directions": torch.ones(4)}, "condition="),
    ],
)
def test_bad_steer_specs_are_one_line(kwargs, message) -> None:
    with pytest.raises(ConfigError, match=message):
        Steer(**kwargs)


def test_steer_needs_a_layer_with_a_direction_set(directions) -> None:
    with pytest.raises(ConfigError, match="layer="):
        Steer("ablation", directions)
    with pytest.raises(ConfigError, match="-1, 0 and 1"):
        Steer("prompt").at(0.5)
    with pytest.raises(ConfigError, match="non-empty"):
        PromptInstructions(induce=" ")


def test_prompted_rows_carry_their_instruction(tiny_model) -> None:
    spec = Steer("prompt", instructions=PromptInstructions(induce="REFUSE.", remove="ANSWER."))
    texts = spec.prompted(tiny_model, ["Hi", "Hi", "Hi"], [-1.0, 0.0, 1.0])
    assert texts[0] == tiny_model.format_prompts(["ANSWER.\n\nHi"])[0]
    assert texts[1] == tiny_model.format_prompts(["Hi"])[0]
    assert texts[2] == tiny_model.format_prompts(["REFUSE.\n\nHi"])[0]


def test_public_sweep_adds_the_unsteered_row_and_matches_a_direct_computation(tiny_model, directions) -> None:
    harmful, benign, questions = harmful_eval()[:3], benign_eval()[:3], mmlu_questions()[:4]
    settings = GenerationSettings(max_new_tokens=5)
    spec = Steer("addition", directions, layer=1)
    result = sweep(
        tiny_model, spec, [2.0], harmful=harmful, benign=benign, mmlu=questions,
        options=SweepOptions(generation=settings, bootstrap_resamples=100),
    )
    assert {row["alpha"] for row in result.rows} == {0.0, 2.0}  # alpha 0 is always measured
    assert {row["metric"] for row in result.rows} >= {"refusal_harmful", "answered_benign", "refusal_score_harmful", "mmlu_accuracy", "kl_benign"}
    assert not any(row["metric"].startswith(("honesty", "ce_")) for row in result.rows)  # no claims, no answers given
    # The steered completions are those of a direct generate() under spec.at(2.0).
    direct = generate(tiny_model, harmful, interventions=spec.at(2.0), settings=settings, progress=False)
    steered = [s["completion"] for s in result.samples if s["set"] == "harmful" and s["alpha"] == 2.0]
    assert steered == direct
    # values, rows and value() agree.
    refused = result.values["refusal_harmful"][2.0]
    assert result.value("refusal_harmful", 2.0) == pytest.approx(sum(refused) / len(refused))
    for row in result.rows:
        values = result.values[row["metric"]][row["alpha"]]
        assert row["value"] == pytest.approx(sum(values) / len(values))
        assert row["diff"] == pytest.approx(row["value"] - result.value(row["metric"], 0.0))
    frame = result.to_pandas()
    assert list(frame.columns)[:4] == ["method", "layer", "alpha", "metric"] and len(frame) == len(result.rows)
    table = result.table()
    assert "addition" in table and "+2.00" in table
    with pytest.raises(ConfigError, match="needs claims="):
        sweep(tiny_model, spec, [1.0], metrics=["honesty"])
    with pytest.raises(ConfigError, match="unknown metric group"):
        sweep(tiny_model, spec, [1.0], harmful=harmful, metrics=["refusal"])


def test_honesty_rows_need_a_direction_and_results_do_not_merge_values(tiny_model, directions) -> None:
    from refusal_dir.prompts import true_false_claims
    from refusal_dir.sweep import SweepResult

    claims = true_false_claims()[:2]
    # claims= with the prompting baseline: no honesty group by default, refused when asked for.
    result = sweep(tiny_model, Steer("prompt"), [1.0], claims=claims, harmful=harmful_eval()[:1], metrics=None,
                   options=SweepOptions(generation=GenerationSettings(max_new_tokens=2), bootstrap_resamples=50))
    assert not any(row["metric"].startswith("honesty") for row in result.rows)
    with pytest.raises(ConfigError, match="addition or ablation"):
        sweep(tiny_model, Steer("prompt"), [1.0], claims=claims, metrics=["honesty"])
    first = SweepResult(values={"kl_benign": {0.0: [0.0], 1.0: [0.5]}})
    with pytest.raises(ConfigError, match="one SweepResult per method"):
        first.extend(SweepResult(values={"kl_benign": {0.0: [0.0], 2.0: [0.9]}}))
    first.extend(SweepResult(values={"ce_harmless": {0.0: [3.0]}}))
    assert set(first.values) == {"kl_benign", "ce_harmless"}


def test_the_runs_steer_carries_the_configured_site_unit_and_apply_to(tiny_model_dir, tmp_path) -> None:
    """A setting dropped between the config and the Steer would pass the golden table (which
    runs the defaults): check each one reaches the interventions."""
    from refusal_dir.config import load_config
    from refusal_dir.datasets import load_datasets
    from refusal_dir.extraction import extract
    from refusal_dir.model import load_model
    from refusal_dir.pipeline import SweepContext, prepare_output_dir

    config = load_config().with_overrides({
        "model.name": str(tiny_model_dir), "data.max_eval_prompts": 4, "extraction.methods": ("mean_diff",),
        "extraction.sites": ("resid_pre", "resid_post"), "extraction.site": "resid_post",
        "extraction.selection_candidates": 2, "steering.unit": "unit", "steering.apply_to": "generated",
    })
    model = load_model(str(tiny_model_dir), device="cpu")
    datasets = load_datasets(config)
    extraction = extract(model, config, datasets, prepare_output_dir(tmp_path / "run", config), progress=False)
    ctx = SweepContext(model, config, datasets, extraction, progress=False)
    layer, token = extraction.selected.layer, extraction.selected.position
    (added,) = ctx.steer("addition", layer, token).at(2.0)
    expected = addition(extraction.steering_set, layer=layer, token=token, alpha=2.0, site="resid_post", unit="unit", apply_to="generated")
    assert (added.site, added.apply_to, added.at_layers) == ("resid_post", "generated", (layer,))
    torch.testing.assert_close(added.vector, expected.vector)
    assert abs(float(added.vector.norm()) - 1.0) < 1e-5  # unit, not raw
    (ablated,) = ctx.steer("ablation", layer, token).at(1.0)
    assert ablated.apply_to == "all"  # an ablation acts everywhere, as before
