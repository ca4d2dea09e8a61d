"""Geometry of directions: cosines across layers, methods and behaviours; a direction's logit lens.

Logit lens of a direction (:func:`direction_logit_lens`). The default ``method="readout"``
uses TransformerLens' ``transformer_lens.tools.analysis.logit_readout`` on the bridge: it reads
the vector through the model's real final norm, ``W_U``, ``b_U`` and output transform (Gemma's
logit soft-cap). For an RMSNorm model with ``b_U = 0`` (Gemma, Llama, Qwen) that is
``softcap(gain * v / rms(v) @ W_U)``: the ``1 / rms(v)`` factor is one positive number for the
whole vector and the soft-cap is monotone, so the *ranking* of tokens is exactly that of the
linear projection ``(gain * v) @ W_U`` (``method="linear"``, computed from the bridge's ``W_U``
and the final norm's gain; tested equal). The values differ: ``readout`` gives the logits the
model would produce if its residual stream pointed along ``v``; ``linear`` gives logits per unit
of ``v`` before the final norm's division by the residual norm. On LayerNorm models (GPT-2) the
norm also removes the mean, and only ``readout`` is exact.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import plotly.graph_objects as go
import torch
from jaxtyping import Float
from plotly.subplots import make_subplots
from torch import Tensor

from analysis._common import (
    TEMPLATE,
    annotated_heatmap,
    integer_ticks,
    unit_vector,
)
from refusal_dir import DirectionSet, HookedModel
from refusal_dir.deprecation import renamed_keywords
from refusal_dir.errors import ConfigError, DirectionMismatchError

PerLayer = Float[Tensor, "layers"]
Vector = Float[Tensor, "d_model"]
VocabLogits = Float[Tensor, "vocab"]

# ----------------------------------------------------------------------------------------------
# Cosines
# ----------------------------------------------------------------------------------------------


def _units(directions: DirectionSet, token: str | int | None) -> Float[Tensor, "layers d_model"]:
    units = directions.directions[directions.position_index(token)].to(torch.float64)
    return units / units.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@renamed_keywords(position="token")
def cosine_across_layers(
    directions: DirectionSet, *, token: str | int | None = None
) -> Float[Tensor, "layers layers"]:
    """Cosine similarity of every layer's direction with every other layer's (one token label)."""
    units = _units(directions, token)
    return (units @ units.T).clamp(-1.0, 1.0)


@dataclass(frozen=True)
class CosineMatrix:
    """Pairwise cosines between named directions."""

    names: tuple[str, ...]
    matrix: Float[Tensor, "n n"]

    def value(self, first: str, second: str) -> float:
        return float(self.matrix[self.names.index(first), self.names.index(second)])


@renamed_keywords(position="token")
def cosine_across_methods(
    sets: Mapping[str, DirectionSet], layer: int, *, token: str | int | None = None
) -> CosineMatrix:
    """Pairwise cosines at one layer between direction sets (e.g. mean_diff, pca, probe)."""
    if len(sets) < 1:
        raise ConfigError("pass at least one direction set")
    names = tuple(sets)
    vectors = torch.stack([unit_vector(sets[name], layer=layer, token=token) for name in names])
    _check_same_width(vectors.shape[1], sets)
    return CosineMatrix(names, (vectors @ vectors.T).clamp(-1.0, 1.0))


def _check_same_width(width: int, sets: Mapping[str, DirectionSet]) -> None:
    for name, directions in sets.items():
        if directions.d_model != width:
            raise DirectionMismatchError(
                f"direction set {name!r} has d_model {directions.d_model}, others {width}"
            )


@renamed_keywords(position_first="token_first", position_second="token_second")
def cosine_between(
    first: DirectionSet,
    second: DirectionSet,
    *,
    token_first: str | int | None = None,
    token_second: str | int | None = None,
) -> PerLayer:
    """Per-layer cosine between two direction sets of the same model (e.g. refusal vs honesty)."""
    if first.directions.shape[1:] != second.directions.shape[1:]:
        raise DirectionMismatchError(
            f"the direction sets differ in shape: {first.n_layers} layers x d_model "
            f"{first.d_model} against {second.n_layers} x {second.d_model}"
        )
    return (_units(first, token_first) * _units(second, token_second)).sum(dim=-1).clamp(-1.0, 1.0)


def cosine_layers_figure(
    matrix: Float[Tensor, "layers layers"], *, title: str = "Cosine between layers' directions"
) -> go.Figure:
    """Heatmap of :func:`cosine_across_layers`."""
    layers = list(range(matrix.shape[0]))
    figure = go.Figure(
        go.Heatmap(
            z=matrix.tolist(),
            x=layers,
            y=layers,
            zmin=-1,
            zmax=1,
            colorscale="RdBu_r",
            colorbar={"title": "cosine"},
            hovertemplate="layer %{y} vs %{x}: %{z:.3f}<extra></extra>",
        )
    )
    figure.update_layout(
        title=title,
        template=TEMPLATE,
        xaxis_title="layer",
        yaxis_title="layer",
        height=560,
        width=640,
    )
    figure.update_xaxes(**integer_ticks(len(layers)))
    figure.update_yaxes(autorange="reversed", **integer_ticks(len(layers)))
    return figure


def cosine_methods_figure(
    result: CosineMatrix, *, title: str = "Cosine between methods"
) -> go.Figure:
    """Annotated heatmap of :func:`cosine_across_methods`."""
    return annotated_heatmap(
        result.matrix,
        result.names,
        zmin=-1,
        zmax=1,
        colorscale="RdBu_r",
        colorbar_title="cosine",
        title=title,
    )


def cosine_between_figure(
    curves: Tensor | Mapping[str, Tensor], *, title: str = "Cosine between directions per layer"
) -> go.Figure:
    """Per-layer cosine lines (one per named pair, e.g. ``{"refusal vs honesty": ...}``)."""
    named = {"cosine": curves} if isinstance(curves, Tensor) else dict(curves)
    figure = go.Figure()
    for name, values in named.items():
        figure.add_trace(
            go.Scatter(
                x=list(range(len(values))), y=values.tolist(), mode="lines+markers", name=name
            )
        )
    figure.add_hline(y=0.0, line={"color": "grey", "width": 1})
    figure.update_layout(
        title=title,
        template=TEMPLATE,
        xaxis_title="layer",
        yaxis_title="cosine",
        yaxis_range=[-1.05, 1.05],
    )
    longest = max((len(values) for values in named.values()), default=1)
    figure.update_xaxes(**integer_ticks(longest))
    return figure


# ----------------------------------------------------------------------------------------------
# Logit lens of a direction
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenScore:
    token: str
    token_id: int
    value: float


@dataclass(frozen=True)
class LogitLensTokens:
    """Tokens a direction promotes (highest logits first) and suppresses (lowest first)."""

    promoted: tuple[TokenScore, ...]
    suppressed: tuple[TokenScore, ...]
    method: str
    logits: VocabLogits


def direction_logits(model: HookedModel, vector: Vector, *, method: str = "readout") -> VocabLogits:
    """Logits of every token for a direction (see the module docstring for the two methods)."""
    vector = torch.as_tensor(vector).detach().float().cpu()
    if vector.ndim != 1 or vector.shape[0] != model.d_model:
        raise DirectionMismatchError(
            f"the direction must be a vector of d_model {model.d_model}, got shape "
            f"{tuple(vector.shape)}"
        )
    bridge = model.bridge
    if method == "readout":
        from transformer_lens.tools.analysis import logit_readout

        readout = logit_readout(bridge, vector.to(device=bridge.W_U.device, dtype=bridge.W_U.dtype))
        return readout.values.float().cpu()
    if method == "linear":
        architecture = model.architecture
        gain = architecture.norm_gain(architecture.final_norm(model.hf)).cpu()
        W_U = bridge.W_U.detach().float().cpu()
        return (gain * vector) @ W_U
    raise ConfigError(f"unknown method {method!r}: choose readout or linear")


def direction_logit_lens(
    model: HookedModel, vector: Vector, k: int = 10, *, method: str = "readout"
) -> LogitLensTokens:
    """The ``k`` tokens a direction promotes most and the ``k`` it suppresses most."""
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    logits = direction_logits(model, vector, method=method)
    k = min(k, logits.shape[0])
    top = torch.topk(logits, k)
    bottom = torch.topk(-logits, k)

    def scores(ids: Tensor) -> tuple[TokenScore, ...]:
        return tuple(
            TokenScore(model.tokenizer.decode([int(i)]), int(i), float(logits[int(i)])) for i in ids
        )

    return LogitLensTokens(scores(top.indices), scores(bottom.indices), method, logits)


def logit_lens_figure(
    lenses: LogitLensTokens | Mapping[str, LogitLensTokens],
    *,
    title: str = "Tokens promoted and suppressed by the direction",
) -> go.Figure:
    """Horizontal bars: promoted tokens (right) and suppressed tokens (left), one row per lens."""
    named = {"direction": lenses} if isinstance(lenses, LogitLensTokens) else dict(lenses)
    figure = make_subplots(
        rows=len(named), cols=2, subplot_titles=_lens_titles(named), horizontal_spacing=0.15
    )
    for row, lens in enumerate(named.values(), start=1):
        for column, (tokens, color) in enumerate(
            ((lens.suppressed, "#1f77b4"), (lens.promoted, "#d62728")), start=1
        ):
            ordered = list(reversed(tokens))  # strongest at the top
            figure.add_trace(
                go.Bar(
                    x=[score.value for score in ordered],
                    y=[f"{score.token!r} ({score.token_id})" for score in ordered],
                    orientation="h",
                    marker={"color": color},
                    showlegend=False,
                ),
                row=row,
                col=column,
            )
    figure.update_layout(title=title, template=TEMPLATE, height=max(360, 320 * len(named)))
    return figure


def _lens_titles(named: Mapping[str, LogitLensTokens]) -> Sequence[str]:
    titles = []
    for name in named:
        titles += [f"{name}: suppressed", f"{name}: promoted"]
    return titles
