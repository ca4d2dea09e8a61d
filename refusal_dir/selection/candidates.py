"""The candidates a layer-selection rule tries, and their interventions, one block of rows each.

Both rules that steer to choose (:mod:`~refusal_dir.selection.effect`,
:mod:`~refusal_dir.selection.cosine`) try every candidate (token, layer) in one batched pass:
the prompts are repeated once per candidate, and candidate ``i`` acts on its own block of rows
only (its direction on those rows, a one-hot per-row coefficient for its addition).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from refusal_dir.directions import DirectionSet
from refusal_dir.errors import ConfigError
from refusal_dir.interventions import Intervention
from refusal_dir.model import HookedModel
from refusal_dir.selection.separation import LayerScore
from refusal_dir.steer import Steer


def eligible(
    model: HookedModel,
    directions: DirectionSet,
    scores: Sequence[LayerScore],
    *,
    max_layer_fraction: float,
    max_candidates: int | None,
) -> list[LayerScore]:
    """The candidates in the first ``max_layer_fraction`` of the layers with a non-zero
    direction; with ``max_candidates``, the best-separating ones (in their order)."""
    limit = max(1, math.floor(max_layer_fraction * model.n_layers))
    # A zero direction (e.g. resid_pre[0] at a template token every prompt shares) cannot steer.
    candidates = [
        s for s in scores if s.layer < limit and abs(directions.norm(s.layer, s.position)) > 1e-6
    ]
    if not candidates:
        raise ConfigError(
            "no candidate layers with a non-zero direction: raise extraction.max_layer_fraction"
        )
    if max_candidates is not None:
        ranked = sorted(candidates, key=lambda s: (s.separation_accuracy, s.auroc), reverse=True)
        kept = ranked[:max_candidates]
        candidates = [s for s in candidates if s in kept]
    return candidates


def repeated(items: Sequence[str], n_candidates: int) -> list[str]:
    """The rows: every item once per candidate, candidate-major."""
    return [item for _ in range(n_candidates) for item in items]


def ablations(directions: DirectionSet, candidates: Sequence[LayerScore], n_items: int) -> list[Intervention]:
    """Each candidate's direction ablated at every layer, on its own block of ``n_items`` rows."""
    units = torch.stack([directions.unit(c.layer, c.position) for c in candidates])
    return Steer("ablation", units.repeat_interleave(n_items, dim=0)).at(1.0)


def additions(
    directions: DirectionSet, candidates: Sequence[LayerScore], n_items: int, *, alpha: float, site: str
) -> list[Intervention]:
    """``alpha`` x each candidate's raw direction added at its layer, on its own block of rows."""
    n = len(candidates)
    return [
        intervention
        for i, c in enumerate(candidates)
        for intervention in Steer("addition", directions, layer=c.layer, token=c.position, site=site).at(
            [alpha if block == i else 0.0 for block in range(n) for _ in range(n_items)]
        )
    ]
