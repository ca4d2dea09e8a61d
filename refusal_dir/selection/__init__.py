"""Layer selection: which (token, layer) direction is steered with.

* :mod:`~refusal_dir.selection.separation`: every (token, layer) scored on held-out pairs
  (separation accuracy, AUROC, Cohen's d, probe accuracy) and the best-separating layer
  (:func:`select_layer`; ``extraction.selection: separation``);
* :mod:`~refusal_dir.selection.effect`: every candidate tried on held-out pairs (ablation KL,
  bypass, induce) and the layer chosen by what the direction does (:func:`choose_layer`;
  ``extraction.selection: effect``, the default);
* :mod:`~refusal_dir.selection.cosine`: every candidate tried on held-out pairs and scored by
  activation geometry alone, after COSMIC (:func:`choose_by_cosine`;
  ``extraction.selection: cosine``): no logits, no refusal tokens;
* :func:`ranked_layers`: the candidate layers ``refusal-dir tune`` tries, best first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from refusal_dir.selection.cosine import (
    CosineScan,
    CosineSelection,
    LayerCosine,
    choose_by_cosine,
    cosines_table,
    layer_cosines,
)
from refusal_dir.selection.effect import (
    LayerEffect,
    LayerSelection,
    choose_layer,
    effects_table,
    layer_effects,
    select_by_effect,
)
from refusal_dir.selection.separation import (
    LayerScore,
    format_score_table,
    score_layers,
    select_layer,
    separation_accuracy,
)

if TYPE_CHECKING:
    from refusal_dir.extraction import Extraction


def ranked_layers(extraction: Extraction, n: int) -> list[int]:
    """The first ``n`` layers to try: the selected layer, then the others by steering score
    (bypass + induce) when effects were measured, by cosine score when cosines were, else by
    held-out separation accuracy."""
    if extraction.effects:
        ranked = [e.layer for e in sorted(extraction.effects, key=lambda e: e.steering_score, reverse=True)]
    elif extraction.cosines:
        ranked = [c.layer for c in sorted(extraction.cosines, key=lambda c: c.cosine_score, reverse=True)]
    else:
        scores = extraction.scores[extraction.selected_key]
        ranked = [s.layer for s in sorted(scores, key=lambda s: s.separation_accuracy, reverse=True)]
    return list(dict.fromkeys([extraction.selected.layer, *ranked]))[:n]


__all__ = [
    "CosineScan",
    "CosineSelection",
    "LayerCosine",
    "LayerEffect",
    "LayerScore",
    "LayerSelection",
    "choose_by_cosine",
    "choose_layer",
    "cosines_table",
    "effects_table",
    "format_score_table",
    "layer_cosines",
    "layer_effects",
    "ranked_layers",
    "score_layers",
    "select_by_effect",
    "select_layer",
    "separation_accuracy",
]
