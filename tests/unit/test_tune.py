from __future__ import annotations

import pytest
import torch

from refusal_dir.activations import collect_activations
from refusal_dir.directions import compute_directions
from refusal_dir.errors import ConfigError
from refusal_dir.evaluation import wilson_interval
from refusal_dir.generation import GenerationSettings
from refusal_dir.prompts import benign_eval, harmful_eval, mmlu_questions
from refusal_dir.tune import EvalSplit, Limits, Point, choose, pareto_front, split_half, tune


def _p(method, refusal, helpfulness, mmlu, kl, alpha=1.0) -> Point:
    return Point(method, 1, alpha, refusal, helpfulness, mmlu, kl)


def test_pareto_front_and_choice_under_limits() -> None:
    baseline = _p("none", 0.2, 0.9, 0.60, 0.0, alpha=0.0)
    strong = _p("addition", 0.9, 0.5, 0.40, 0.8)      # breaks the limits
    gentle = _p("conditional", 0.7, 0.9, 0.60, 0.05)  # within them
    dominated = _p("ablation", 0.6, 0.8, 0.55, 0.09)  # gentle beats it on every axis
    points = [strong, gentle, dominated]
    assert set(pareto_front(points)) == {strong, gentle}
    assert choose(points, baseline, Limits(max_mmlu_drop=0.01, max_kl=0.1)) == gentle
    assert choose(points, baseline, Limits(max_mmlu_drop=1.0, max_kl=1.0)) == strong
    assert choose(points, baseline, Limits(max_mmlu_drop=0.0, max_kl=0.01)) == baseline
    with pytest.raises(ConfigError):
        Limits(max_kl=-1.0)


def test_selection_never_looks_at_the_heldout_split(tiny_model, record_tokenized) -> None:
    harmful_val, harmful_test = split_half(harmful_eval()[:8])
    benign_val, benign_test = split_half(benign_eval()[:8])
    mmlu_val, mmlu_test = split_half(mmlu_questions()[:8])
    positive = collect_activations(tiny_model, harmful_eval()[8:16], progress=False)
    negative = collect_activations(tiny_model, benign_eval()[8:16], progress=False)
    directions = compute_directions(positive, negative, site="resid_pre", model=tiny_model, position_rule="last")
    heldout_texts = [*harmful_test, *benign_test, *(q.question for q in mmlu_test)]
    # Every text the tokenizer sees, and how many it had seen when the point was selected.
    seen = record_tokenized(tiny_model)
    selected_at: list[int] = []

    def event(name: str) -> None:
        if name == "selected":
            selected_at.append(len(seen))

    result = tune(
        tiny_model, directions, layers=[1], alphas=[0.0, 2.0], methods=("addition", "ablation", "conditional"),
        validation=EvalSplit(harmful_val, benign_val, mmlu_val),
        heldout=EvalSplit(harmful_test, benign_test, mmlu_test),
        condition_positive=harmful_eval()[16:20], condition_negative=benign_eval()[16:20],
        settings=GenerationSettings(max_new_tokens=3), on_event=event, bootstrap_resamples=200,
    )
    assert len(selected_at) == 1

    def heldout_in(texts: list[str]) -> list[str]:
        return [text for text in texts if any(item in text for item in heldout_texts)]

    assert not heldout_in(seen[: selected_at[0]]), "a held-out prompt reached the model before selection"
    assert heldout_in(seen[selected_at[0] :]), "the held-out split is used for the report"
    assert len(result.points) == 6 and result.chosen in [*result.points, result.baseline]
    assert set(result.heldout) == {"baseline", "chosen", "difference"}
    for label in ("baseline", "chosen"):  # rates get Wilson intervals, KL a bootstrap one
        for metric in ("refusal", "helpfulness", "mmlu"):
            cell = result.heldout[label][metric]
            assert cell["ci"] == wilson_interval(round(cell["value"] * cell["n"]), cell["n"])
        assert result.heldout[label]["kl"]["ci"][0] <= result.heldout[label]["kl"]["value"]
    for metric, cell in result.heldout["difference"].items():  # paired: chosen - baseline
        expected = result.heldout["chosen"][metric]["value"] - result.heldout["baseline"][metric]["value"]
        assert cell["value"] == pytest.approx(expected, abs=1e-12)
        assert cell["ci"][0] <= cell["value"] + 1e-12 and cell["value"] <= cell["ci"][1] + 1e-12
    # alpha 0 addition equals the baseline on validation.
    zero = next(p for p in result.points if p.method == "addition" and p.alpha == 0.0)
    assert (zero.refusal, zero.helpfulness, zero.mmlu) == (result.baseline.refusal, result.baseline.helpfulness, result.baseline.mmlu)
    assert zero.kl == pytest.approx(0.0, abs=1e-9)
    assert torch.isfinite(torch.tensor([p.kl for p in result.points])).all()
    # Every point carries the bounds of its paired drops; on 4 MMLU questions even an unchanged
    # point's bound exceeds a zero limit, so checked on bounds nothing qualifies.
    assert all(p.mmlu_drop_high is not None and p.kl_high is not None for p in result.points)
    assert zero.mmlu_drop_high is not None and zero.mmlu_drop_high > 0
    bound = Limits(max_mmlu_drop=0.0, max_kl=100.0, max_helpfulness_drop=1.0, check="bound")
    assert choose(result.points, result.baseline, bound) == result.baseline
    assert choose(result.points, result.baseline, Limits(max_mmlu_drop=0.0, max_kl=100.0, max_helpfulness_drop=1.0)) != result.baseline


def test_limits_on_bounds_reject_a_point_whose_drop_is_uncertain() -> None:
    baseline = _p("none", 0.2, 0.9, 0.60, 0.0, alpha=0.0)
    # No mean MMLU drop, but on a few questions the upper bound of the paired drop is large.
    uncertain = Point("addition", 1, 1.0, 0.8, 0.9, 0.60, 0.02, mmlu_drop_high=0.15, helpfulness_drop_high=0.1, kl_high=0.03)
    sure = Point("ablation", 1, 1.0, 0.5, 0.9, 0.60, 0.02, mmlu_drop_high=0.005, helpfulness_drop_high=0.1, kl_high=0.03)
    limits = dict(max_mmlu_drop=0.01, max_kl=0.1, max_helpfulness_drop=0.2)
    assert choose([uncertain, sure], baseline, Limits(**limits)) == uncertain
    assert choose([uncertain, sure], baseline, Limits(**limits, check="bound")) == sure
    kl_unsure = Point("ablation", 1, 1.0, 0.5, 0.9, 0.60, 0.02, mmlu_drop_high=0.005, helpfulness_drop_high=0.1, kl_high=0.3)
    assert choose([kl_unsure], baseline, Limits(**limits, check="bound")) == baseline
    with pytest.raises(ConfigError, match="limits-on"):
        Limits(check="median")
    with pytest.raises(ConfigError, match="baseline"):
        choose([_p("addition", 0.8, 0.9, 0.6, 0.0)], baseline, Limits(check="bound"))


def test_tune_steers_at_the_configured_site_and_unit(tiny_model) -> None:
    """tune searches the alpha run applies: same site and unit (they were dropped before)."""
    from refusal_dir.tune import Evaluator

    positive = collect_activations(tiny_model, harmful_eval()[:4], progress=False)
    negative = collect_activations(tiny_model, benign_eval()[:4], progress=False)
    directions = compute_directions(positive, negative, site="resid_post", model=tiny_model)
    evaluator = Evaluator(tiny_model, directions, settings=GenerationSettings(max_new_tokens=2), site="resid_post", unit="unit", apply_to="prompt")
    (added,) = evaluator.steer("addition", 1).at(3.0)
    assert (added.site, added.apply_to) == ("resid_post", "prompt")
    assert abs(float(added.vector.norm()) - 1.0) < 1e-5
