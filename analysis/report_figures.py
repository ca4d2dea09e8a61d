"""Figures of a sweep: each metric against alpha, and the refusal-capability frontier.

Data in (the tidy result rows of :mod:`refusal_dir.pipeline`, as a list or as the ``.rows`` of a
sweep result), plotly figures out.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis._rows import Row, Rows, as_rows

SWEEP_METRICS = (
    ("refusal_harmful", "Refusal rate, harmful prompts"),
    ("answered_benign", "Answered (not refused, not degenerate), benign prompts"),
    ("mmlu_accuracy", "MMLU-style accuracy"),
    ("kl_benign", "KL to unsteered (benign, nats)"),
)


def _series(rows: Sequence[Row], method: str, metric: str) -> list[Row]:
    return sorted(
        (r for r in rows if r["method"] == method and r["metric"] == metric), key=lambda r: r["alpha"]
    )


def sweep_figure(rows: Rows, *, title: str = "Steering sweep") -> go.Figure:
    """One panel per metric: value against alpha per method, 95% CI as error bars."""
    rows = as_rows(rows)
    methods = sorted({r["method"] for r in rows if not r["method"].startswith("honesty_")})
    figure = make_subplots(rows=2, cols=2, subplot_titles=[label for _, label in SWEEP_METRICS])
    for index, (metric, _) in enumerate(SWEEP_METRICS):
        row, col = divmod(index, 2)
        for method in methods:
            series = _series(rows, method, metric)
            if not series:
                continue
            figure.add_trace(
                go.Scatter(
                    x=[r["alpha"] for r in series],
                    y=[r["value"] for r in series],
                    error_y={
                        "type": "data",
                        "symmetric": False,
                        "array": [r["ci_high"] - r["value"] for r in series],
                        "arrayminus": [r["value"] - r["ci_low"] for r in series],
                    },
                    mode="lines+markers",
                    name=method,
                    legendgroup=method,
                    showlegend=index == 0,
                ),
                row=row + 1,
                col=col + 1,
            )
        figure.update_xaxes(title_text="alpha", row=row + 1, col=col + 1)
    figure.update_layout(title=title, height=700, width=1000)
    return figure


def frontier_figure(
    rows: Rows, *, capability: str = "mmlu_accuracy", title: str | None = None
) -> go.Figure:
    """Refusal on harmful prompts against a capability metric, one point per (method, alpha)."""
    rows = as_rows(rows)
    figure = go.Figure()
    methods = sorted({r["method"] for r in rows if not r["method"].startswith("honesty_")})
    for method in methods:
        refusal = {r["alpha"]: r for r in _series(rows, method, "refusal_harmful")}
        other = {r["alpha"]: r for r in _series(rows, method, capability)}
        alphas = sorted(set(refusal) & set(other))
        figure.add_trace(
            go.Scatter(
                x=[other[a]["value"] for a in alphas],
                y=[refusal[a]["value"] for a in alphas],
                text=[f"alpha={a:+.2f}" for a in alphas],
                mode="lines+markers+text",
                textposition="top center",
                name=method,
            )
        )
    figure.update_layout(
        title=title or f"Tradeoff: refusal on harmful prompts vs {capability}",
        xaxis_title=capability,
        yaxis_title="refusal rate (harmful)",
        height=550,
        width=800,
    )
    return figure


def write_report_figures(output_dir: Path, rows: Rows, extraction: Any = None) -> list[Path]:
    """Write the sweep, frontier and (with an extraction) layer-score figures as HTML."""
    rows = as_rows(rows)
    directory = Path(output_dir) / "figures"
    directory.mkdir(parents=True, exist_ok=True)
    figures = {
        "sweep.html": sweep_figure(rows),
        "frontier_mmlu.html": frontier_figure(rows, capability="mmlu_accuracy"),
        "frontier_helpfulness.html": frontier_figure(rows, capability="answered_benign"),
        "frontier_kl.html": frontier_figure(rows, capability="kl_benign"),
    }
    if extraction is not None:
        try:
            from analysis.layers import separation_figure

            figures["layers.html"] = separation_figure(
                extraction.scores[extraction.selected_key], selected=extraction.selected
            )
        except (ImportError, TypeError):
            pass
    written = []
    for name, figure in figures.items():
        path = directory / name
        temporary = path.with_suffix(".tmp")
        figure.write_html(str(temporary), include_plotlyjs="cdn")
        temporary.replace(path)
        written.append(path)
    return written
