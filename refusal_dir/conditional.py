"""Conditional steering (in the spirit of CAST, Lee et al. 2024), batched.

At the end of the prompt, each row's residual stream at ``condition_layer`` is projected onto a
condition direction (for example the harmfulness direction at its best layer). Rows whose
projection exceeds ``threshold`` are steered; the others are left alone. Every row is gated
independently, so mixed batches work (the peers' implementation conditions one prompt at a
time).

Implementation: the gate is read in a first, partial forward pass over the prompts that stops at
``condition_layer`` (cheap: no later layers, no unembedding), and becomes a per-row coefficient
(``alpha`` or 0) of an ordinary :class:`~refusal_dir.interventions.Addition`. The steered run is
then one batched call like any other.

Threshold (:func:`fit_threshold`): on a validation split of positive (should steer) and negative
(should not) prompts, the midpoint between adjacent sorted projections that maximizes balanced
accuracy (Youden's J), ties broken towards the larger margin.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from refusal_dir.activations import collect_activations
from refusal_dir.directions import DirectionSet
from refusal_dir.errors import ConfigError, DataError
from refusal_dir.interventions import Addition, addition
from refusal_dir.model import HookedModel


@dataclass(frozen=True)
class Condition:
    """Gate rows by ``projection(resid_pre[layer] at the last prompt token) > threshold``."""

    unit: Float[Tensor, " d_model"]
    layer: int
    threshold: float
    site: str = "resid_pre"


def condition_projections(
    model: HookedModel, prompts: Sequence[str], *, unit: Tensor, layer: int, site: str = "resid_pre", batch_size: int = 16
) -> Float[Tensor, " prompts"]:
    """Projection of each prompt's last-token residual at ``layer`` onto ``unit``."""
    acts = collect_activations(model, prompts, sites=(site,), layers=[layer], batch_size=batch_size, progress=False)
    unit = unit.double() / unit.double().norm()
    return acts.acts[site][:, 0, 0].double() @ unit


def fit_threshold(positive: Tensor, negative: Tensor) -> float:
    """Threshold maximizing balanced accuracy of ``projection > threshold`` (see module doc)."""
    if positive.numel() == 0 or negative.numel() == 0:
        raise DataError("fitting a threshold needs validation prompts of both kinds")
    values = torch.cat([positive, negative]).double().sort().values
    candidates = torch.cat([values[:1] - 1.0, (values[1:] + values[:-1]) / 2, values[-1:] + 1.0])
    best, best_key = float(candidates[0]), (-1.0, -1.0)
    for threshold in candidates.tolist():
        tpr = float((positive.double() > threshold).double().mean())
        tnr = float((negative.double() <= threshold).double().mean())
        margin = min(
            float((positive.double() - threshold).abs().min()),
            float((negative.double() - threshold).abs().min()),
        )
        key = (tpr + tnr, margin)
        if key > best_key:
            best, best_key = threshold, key
    return best


def fit_condition(
    model: HookedModel,
    directions: DirectionSet,
    *,
    layer: int,
    positive: Sequence[str],
    negative: Sequence[str],
    position: str | int | None = None,
) -> Condition:
    """A Condition on the direction at ``layer``, its threshold fit on validation prompts."""
    unit = directions.unit(layer, position)
    pos = condition_projections(model, positive, unit=unit, layer=layer, site=directions.meta.site)
    neg = condition_projections(model, negative, unit=unit, layer=layer, site=directions.meta.site)
    return Condition(unit=unit, layer=layer, threshold=fit_threshold(pos, neg), site=directions.meta.site)


def gate(model: HookedModel, prompts: Sequence[str], condition: Condition) -> Tensor:
    """Boolean per row: does the condition fire for this prompt?"""
    if not 0 <= condition.layer < model.n_layers:
        raise ConfigError(f"condition layer {condition.layer} is out of range 0..{model.n_layers - 1}")
    projections = condition_projections(model, prompts, unit=condition.unit, layer=condition.layer, site=condition.site)
    return projections > condition.threshold


def conditional_addition(
    model: HookedModel,
    prompts: Sequence[str],
    condition: Condition,
    directions: DirectionSet | Tensor,
    *,
    layer: int,
    alpha: float | Sequence[float],
    **kwargs: object,
) -> Addition:
    """An Addition whose per-row coefficient is ``alpha`` where the condition fires, else 0.

    ``alpha`` may be one value or one per prompt (a sweep). Pass the returned intervention
    with the same ``prompts`` to :func:`~refusal_dir.generation.generate` or any metric.
    """
    fires = gate(model, prompts, condition).float()
    alphas = torch.as_tensor(alpha, dtype=torch.float32)
    if alphas.ndim == 0:
        alphas = alphas.expand(len(prompts))
    if alphas.numel() != len(prompts):
        raise ConfigError(f"{alphas.numel()} coefficients for {len(prompts)} prompts: give one per prompt")
    return addition(directions, layer=layer, alpha=(alphas * fires).tolist(), **kwargs)  # type: ignore[arg-type]
