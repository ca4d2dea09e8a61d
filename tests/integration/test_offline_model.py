"""Integration tests on the real Gemma 3 270M weights (the offline default model).

The model is a base model: it does not refuse, so these tests check what it does have: a
direction that separates harmful from harmless held-out prompts, and a causal, directional
effect of adding or ablating that direction on the model's later representations, compared with
the opposite direction and with random directions of the same norm. (The log-probability of a
refusal phrase does not follow the direction on this base model: measured -27.22 unsteered vs
-27.46 with +1 x direction at layer 13, so no test claims it.)
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from refusal_dir import prompts as prompt_sets
from refusal_dir.activations import collect_activations
from refusal_dir.cli import main
from refusal_dir.config import load_config
from refusal_dir.datasets import load_datasets
from refusal_dir.extraction import extract
from refusal_dir.interventions import ablation, addition, steer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def extraction(offline_model, tmp_path_factory: pytest.TempPathFactory):
    config = load_config().with_overrides(
        {
            "model.name": "gemma-3-270m-offline",
            "extraction.methods": ("mean_diff",),
            "extraction.sites": ("resid_pre",),
            "extraction.selection": "separation",
            "evaluation.honesty": False,
        }
    )
    output = tmp_path_factory.mktemp("offline-extract")
    result = extract(offline_model, config, load_datasets(config), output, progress=False)
    return result, output


def test_held_out_separation_is_well_above_chance(extraction) -> None:
    result, output = extraction
    best = result.selected
    print(
        f"\nGemma 3 270M: best layer {best.layer}, held-out separation accuracy "
        f"{best.separation_accuracy:.3f}, AUROC {best.auroc:.3f}"
    )
    assert best.separation_accuracy >= 0.75
    assert best.auroc >= 0.7
    # The early layers at the shared last template token cannot separate anything.
    layer0 = next(s for s in result.scores[result.selected_key] if s.layer == 0)
    assert layer0.separation_accuracy == 0.5
    assert (output / "directions" / "mean_diff_resid_pre" / "directions.safetensors").exists()


def _later_projection(model, prompts, unit_later, later, interventions=()):
    with steer(model, *interventions):
        acts = collect_activations(model, prompts, sites=("resid_pre",), layers=[later], progress=False)
    return (acts.acts["resid_pre"][:, 0, 0].double() @ unit_later.double()).mean().item()


def test_addition_and_ablation_move_later_representations_along_the_direction(offline_model, extraction) -> None:
    result, _ = extraction
    directions = result.steering_set
    layer = result.selected.layer
    later = min(layer + 2, offline_model.n_layers - 1)
    unit_later = directions.unit(later)
    harmless = prompt_sets.benign_eval()[:16]
    harmful = prompt_sets.harmful_eval()[:16]
    generator = torch.Generator().manual_seed(0)

    base = _later_projection(offline_model, harmless, unit_later, later)
    added = _later_projection(offline_model, harmless, unit_later, later, [addition(directions, layer=layer, alpha=1.0)])
    subtracted = _later_projection(offline_model, harmless, unit_later, later, [addition(directions, layer=layer, alpha=-1.0)])
    random_shifts = []
    for _ in range(3):
        vector = torch.randn(offline_model.d_model, generator=generator)
        vector = vector / vector.norm() * directions.norm(layer)
        random_shifts.append(
            _later_projection(offline_model, harmless, unit_later, later, [addition(vector, layer=layer, alpha=1.0)]) - base
        )
    gap = directions.norm(later)  # harmful minus harmless mean along the later direction
    print(f"\nlayer {layer} -> {later}: +dir {added - base:.1f}, -dir {subtracted - base:.1f}, "
          f"random {[round(s, 1) for s in random_shifts]}, harmful-harmless gap {gap:.1f}")
    assert added - base > 0.3 * gap
    assert subtracted - base < -0.3 * gap
    # Random directions of the same norm also move things (the residual stream is not isotropic),
    # but less than the direction itself, and not consistently along it.
    assert added - base > max(abs(shift) for shift in random_shifts)
    assert sum(abs(shift) for shift in random_shifts) / len(random_shifts) < 0.5 * (added - base)

    # Ablating the direction at every layer closes most of the harmful-harmless gap downstream.
    ablate = [ablation(directions, layer=layer)]
    gap_before = _later_projection(offline_model, harmful, unit_later, later) - base
    gap_after = _later_projection(offline_model, harmful, unit_later, later, ablate) - _later_projection(
        offline_model, harmless, unit_later, later, ablate
    )
    print(f"harmful-harmless gap at layer {later}: {gap_before:.1f} -> {gap_after:.1f} after ablation")
    assert abs(gap_after) < 0.5 * abs(gap_before)


def test_full_run_completes_offline(offline_model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    output = tmp_path / "run"
    arguments = [
        "run", "--model", "gemma-3-270m-offline", "--output-dir", str(output),
        "--max-eval-prompts", "6", "--max-new-tokens", "6", "--alphas", "-1", "0", "1",
        "--no-honesty", "--quiet",
    ]
    # Reuse the already-loaded weights: the CLI's loader is patched to return them.
    monkeypatch.setattr("refusal_dir.pipeline.load_model", lambda *args, **kwargs: offline_model)
    assert main(arguments) == 0
    rows = list(csv.DictReader(open(output / "results.csv")))
    assert {r["method"] for r in rows} == {"addition", "ablation"}
    assert {float(r["alpha"]) for r in rows} == {-1.0, 0.0, 1.0}
    # alpha 0 is the unsteered model for both methods: identical numbers.
    at_zero = {
        (r["method"], r["metric"]): float(r["value"]) for r in rows if float(r["alpha"]) == 0.0
    }
    for (method, metric), value in at_zero.items():
        if method == "addition":
            assert value == pytest.approx(at_zero[("ablation", metric)], abs=1e-6), metric
    assert (output / "report.md").read_text().count("| addition |") == 3
    assert json.loads((output / "directions" / "selected.json").read_text())["rule"] == "effect"
    assert (output / "figures" / "sweep.html").exists()
