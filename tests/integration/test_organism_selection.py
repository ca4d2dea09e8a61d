"""The cosine layer selection on a model that really refuses: the trained refusal organism.

The cosine rule chooses from activations alone; the claim is that the layer it picks is one where
ablating the direction removes refusal on held-out harmful prompts (test topics it never saw),
as the effect rule's layer does. Both rules run through ``bench/bench_selection.py``'s
``compare`` (the same code that wrote docs/selection-comparison.txt), which also times them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from refusal_dir.model import load_model
from refusal_dir.testing.organism import organism_eval_sets

pytestmark = pytest.mark.slow
BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_selection.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_selection", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cosine_rule_picks_a_layer_where_ablation_removes_heldout_refusal(organism_dir: Path) -> None:
    model = load_model(str(organism_dir), device="cpu")
    result = _bench().compare(model, organism_eval_sets(0), repeats=1)
    rows = {row["layer"]: row for row in result["rows"]}
    print(
        f"\ncosine rule: layer {result['cosine_layer']} ({result['cpu_seconds']['cosine']:.2f} s CPU); "
        f"effect rule: layer {result['effect_layer']} ({result['cpu_seconds']['effect']:.2f} s CPU); "
        f"per layer: {rows}"
    )
    assert result["baseline_harmful_refusal"] >= 0.9  # there is refusal to remove
    assert result["cosine_rule"].startswith("cosine:")  # its choice moves the means, not none-moves
    chosen = rows[result["cosine_layer"]]
    assert chosen["harmful_refusal_ablated"] <= 0.2
    assert chosen["harmless_refusal_added"] >= 0.8
    assert rows[result["effect_layer"]]["harmful_refusal_ablated"] <= 0.2
    assert chosen["cosine_score"] == max(row["cosine_score"] for row in rows.values())
