"""The figure of ``tune --objective remove``: every trial's refusal against its KL, the Pareto
front joined, the chosen point and the unedited model marked."""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go


def pareto_figure(result: Any) -> go.Figure:
    """``result``: a :class:`refusal_dir.tune_remove.RemoveResult`."""
    figure = go.Figure()
    feasible = [t for t in result.trials if t.feasible]
    infeasible = [t for t in result.trials if not t.feasible]
    for name, trials, symbol in (("trial", feasible, "circle"), ("beyond a limit", infeasible, "x")):
        if trials:
            figure.add_trace(go.Scatter(
                x=[t.kl for t in trials], y=[t.refusal for t in trials], mode="markers", name=name,
                marker={"symbol": symbol, "size": 8, "opacity": 0.6},
                text=[f"trial {t.number}" for t in trials], hovertemplate="%{text}<br>KL %{x:.4g}<br>refusal %{y:.2f}",
            ))
    front = sorted(result.front, key=lambda t: t.kl)
    figure.add_trace(go.Scatter(
        x=[t.kl for t in front], y=[t.refusal for t in front], mode="lines+markers", name="Pareto front",
    ))
    for name, trial, symbol in (("unedited", result.baseline, "square"), ("chosen", result.chosen, "star")):
        figure.add_trace(go.Scatter(
            x=[trial.kl], y=[trial.refusal], mode="markers", name=name, marker={"symbol": symbol, "size": 16},
        ))
    figure.update_layout(
        title="Ablation search (validation prompts)", xaxis_title="first-token KL on harmless prompts",
        yaxis_title="refusal rate on harmful prompts", xaxis_type="log" if any(t.kl > 0 for t in result.trials) else "linear",
        height=550, width=800,
    )
    return figure
