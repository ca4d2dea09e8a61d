"""Separation of held-out pairs per layer: accuracy and AUROC, one line per token label or site.

The seed's first look at where a behaviour lives ("for each layer, how often does the positive
input project higher than its negative partner?") as a figure over :func:`refusal_dir.score_layers`
results, the selected (token, layer) marked.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis._common import TEMPLATE, integer_ticks
from refusal_dir import LayerScore
from refusal_dir.errors import ConfigError
from refusal_dir.selection import LayerEffect, LayerSelection

METRIC_TITLES: dict[str, str] = {
    "separation_accuracy": "separation accuracy",
    "auroc": "AUROC",
    "effect_size": "effect size (Cohen's d)",
    "probe_accuracy": "probe accuracy",
}
CHANCE: dict[str, float] = {"separation_accuracy": 0.5, "auroc": 0.5, "probe_accuracy": 0.5}


@dataclass(frozen=True)
class ScoreCurve:
    """One line of the figure: a metric per layer for one (site, token label)."""

    label: str
    layers: tuple[int, ...]
    values: dict[str, tuple[float | None, ...]]


def score_curves(
    scores: Sequence[LayerScore] | Mapping[str, Sequence[LayerScore]],
) -> list[ScoreCurve]:
    """Group scores into one curve per token label (per ``site/token`` for a mapping), by layer.

    A mapping's keys name the sites or prompt sets the scores came from (``{"resid_pre": ...,
    "resid_post": ...}``); its curves are labelled ``"key/token"``.
    """
    groups = dict(scores) if isinstance(scores, Mapping) else {"": scores}
    curves = []
    for key, group in groups.items():
        if not group:
            raise ConfigError(f"no layer scores for {key or 'the figure'}: score the layers first")
        by_position: dict[str, list[LayerScore]] = {}
        for score in group:
            by_position.setdefault(score.position, []).append(score)
        for position, rows in by_position.items():
            rows = sorted(rows, key=lambda score: score.layer)
            label = f"{key}/{position}" if key else position
            curves.append(
                ScoreCurve(
                    label=label,
                    layers=tuple(score.layer for score in rows),
                    values={
                        metric: tuple(getattr(score, metric) for score in rows)
                        for metric in METRIC_TITLES
                    },
                )
            )
    return curves


def separation_figure(
    scores: Sequence[LayerScore] | Mapping[str, Sequence[LayerScore]],
    *,
    selected: LayerScore | LayerEffect | LayerSelection | None = None,
    title: str = "Separation of held-out pairs per layer",
    metrics: Sequence[str] = ("separation_accuracy", "auroc"),
) -> go.Figure:
    """Accuracy and AUROC per layer (one subplot per metric, one line per token label or site).

    ``selected`` (a :class:`LayerScore` from :func:`refusal_dir.select_layer`, or the choice of
    :func:`refusal_dir.selection.choose_layer`) is marked with a star and a dotted vertical line;
    the dashed horizontal line is chance (0.5).
    """
    if isinstance(selected, LayerSelection):
        selected = selected.chosen
    if isinstance(selected, LayerEffect):  # chosen by effect: mark it on its separation curve
        selected = _score_of(scores, selected.position, selected.layer)
    for metric in metrics:
        if metric not in METRIC_TITLES:
            raise ConfigError(f"unknown metric {metric!r}: choose from {', '.join(METRIC_TITLES)}")
    curves = score_curves(scores)
    figure = make_subplots(
        rows=1,
        cols=len(metrics),
        subplot_titles=[METRIC_TITLES[metric] for metric in metrics],
        horizontal_spacing=0.08,
    )
    for column, metric in enumerate(metrics, start=1):
        for index, curve in enumerate(curves):
            values = curve.values[metric]
            if all(value is None for value in values):
                continue
            figure.add_trace(
                go.Scatter(
                    x=list(curve.layers),
                    y=list(values),
                    mode="lines+markers",
                    name=curve.label,
                    legendgroup=curve.label,
                    showlegend=column == 1,
                    line={"color": _color(index)},
                    hovertemplate=(
                        f"{curve.label}<br>layer %{{x}}<br>{metric} %{{y:.3f}}<extra></extra>"
                    ),
                ),
                row=1,
                col=column,
            )
        if metric in CHANCE:
            figure.add_hline(
                y=CHANCE[metric],
                line={"dash": "dash", "color": "grey", "width": 1},
                row=1,
                col=column,
            )
        if selected is not None and getattr(selected, metric) is not None:
            figure.add_trace(
                go.Scatter(
                    x=[selected.layer],
                    y=[getattr(selected, metric)],
                    mode="markers",
                    marker={"symbol": "star", "size": 16, "color": "black"},
                    name=f"selected: {selected.position}, layer {selected.layer}",
                    legendgroup="selected",
                    showlegend=column == 1,
                ),
                row=1,
                col=column,
            )
            figure.add_vline(
                x=selected.layer,
                line={"dash": "dot", "color": "black", "width": 1},
                row=1,
                col=column,
            )
        n_layers = 1 + max((max(curve.layers) for curve in curves), default=0)
        figure.update_xaxes(title_text="layer", row=1, col=column, **integer_ticks(n_layers))
    figure.update_layout(title=title, template=TEMPLATE, legend={"title": "token"})
    return figure


_PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)


def _score_of(
    scores: Sequence[LayerScore] | Mapping[str, Sequence[LayerScore]], token: str, layer: int
) -> LayerScore | None:
    """The score of ``(token, layer)`` (of the first site that has it in a mapping)."""
    groups = scores.values() if isinstance(scores, Mapping) else [scores]
    return next(
        (s for group in groups for s in group if s.position == token and s.layer == layer), None
    )


def _color(index: int) -> str:
    return _PALETTE[index % len(_PALETTE)]
