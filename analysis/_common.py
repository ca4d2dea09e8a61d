"""Small helpers shared by the analysis modules: reading activations, directions, figure style."""

from __future__ import annotations

import math
from collections.abc import Sequence

import plotly.graph_objects as go
import torch
from jaxtyping import Float
from torch import Tensor

from refusal_dir import Activations, DirectionSet
from refusal_dir.errors import ConfigError, DirectionMismatchError

SiteActs = Float[Tensor, "prompts positions layers d_model"]
Vector = Float[Tensor, "d_model"]
ActsInput = Activations | Tensor


TEMPLATE = "plotly_white"
POSITIVE_COLOR = "#d62728"
NEGATIVE_COLOR = "#1f77b4"


def site_tensor(acts: ActsInput, site: str) -> SiteActs:
    """The ``prompts x positions x layers x d_model`` tensor of one site (or the tensor itself)."""
    if isinstance(acts, Activations):
        return acts.site(site)
    if not isinstance(acts, Tensor) or acts.ndim != 4:
        raise ConfigError(
            "activations must be an Activations object or a prompts x positions x layers x "
            f"d_model tensor, got {type(acts).__name__}"
            + (f" of shape {tuple(acts.shape)}" if isinstance(acts, Tensor) else "")
        )
    return acts


def position_index(acts: ActsInput, token: str | int) -> int:
    """Index of the token label ``token`` (a label of ``acts.positions``, or an int, negative
    allowed)."""
    n_positions = _n_positions(acts)
    if isinstance(token, str):
        if not isinstance(acts, Activations) or token not in acts.positions:
            known = ", ".join(acts.positions) if isinstance(acts, Activations) else "none"
            raise ConfigError(f"token {token!r} is not collected: collected are {known}")
        return acts.positions.index(token)
    if not -n_positions <= token < n_positions:
        raise ConfigError(f"token index {token} is out of range for {n_positions} token labels")
    return token % n_positions


def _n_positions(acts: ActsInput) -> int:
    if isinstance(acts, Activations):
        return len(acts.positions)
    return int(acts.shape[1])


def layer_index(acts: ActsInput, layer: int) -> int:
    """Column of model layer ``layer`` in ``acts`` (which may hold a subset of the layers)."""
    if isinstance(acts, Activations):
        if layer not in acts.layers:
            raise ConfigError(f"layer {layer} was not collected: collected are {list(acts.layers)}")
        return acts.layers.index(layer)
    if not 0 <= layer < acts.shape[2]:
        raise ConfigError(f"layer {layer} is out of range: the tensor has {acts.shape[2]} layers")
    return layer


def layer_acts(
    acts: ActsInput, *, site: str, layer: int, token: str | int
) -> Float[Tensor, "prompts d_model"]:
    """One layer's activations at one token label, as float64."""
    tensor = site_tensor(acts, site)
    return tensor[:, position_index(acts, token), layer_index(acts, layer)].to(torch.float64)


def unit_vector(
    direction: DirectionSet | Tensor,
    *,
    layer: int | None = None,
    token: str | int | None = None,
    allow_zero: bool = False,
) -> Vector:
    """The unit direction of a DirectionSet at ``layer`` (and token label), or a normalized vector.

    A zero direction (e.g. ``resid_pre`` of layer 0 at the last template token, which is the same
    token for every prompt) raises, unless ``allow_zero`` (then the zero vector is returned).
    """
    if isinstance(direction, DirectionSet):
        if layer is None:
            raise ConfigError("a DirectionSet needs layer= (which layer's direction to use)")
        vector = direction.unit(layer, token).to(torch.float64)
    else:
        vector = torch.as_tensor(direction).detach().to(torch.float64).cpu()
        if vector.ndim != 1:
            raise DirectionMismatchError(
                f"a direction must be a d_model vector, got shape {tuple(vector.shape)}"
            )
    norm = float(vector.norm())
    if norm == 0.0 and allow_zero:
        return vector
    if not math.isfinite(norm) or norm == 0.0:
        raise DirectionMismatchError("the direction is zero or not finite: it has no unit vector")
    return vector / norm


def layer_list(layers: Sequence[int] | None, n_layers: int) -> list[int]:
    """``layers`` checked against ``n_layers`` (every layer when ``None``)."""
    chosen = list(range(n_layers)) if layers is None else [int(layer) for layer in layers]
    if not chosen:
        raise ConfigError("no layers chosen: pass at least one layer")
    for layer in chosen:
        if not 0 <= layer < n_layers:
            raise ConfigError(f"layer {layer} is out of range: layers are 0..{n_layers - 1}")
    return chosen


def subplot_grid(count: int, *, max_columns: int = 4) -> tuple[int, int]:
    """``(rows, columns)`` for ``count`` subplots."""
    columns = min(count, max_columns)
    return math.ceil(count / columns), columns


def integer_ticks(count: int) -> dict[str, object]:
    """Axis settings that label integer steps (layers, heads), about 20 labels at most."""
    return {"tickmode": "linear", "tick0": 0, "dtick": max(1, math.ceil(count / 20))}


def annotated_heatmap(
    matrix: Tensor,
    names: Sequence[str],
    *,
    zmin: float,
    zmax: float,
    colorscale: str,
    colorbar_title: str,
    title: str,
) -> go.Figure:
    """A square names x names heatmap with each value written in its cell (2 decimals)."""
    values = matrix.tolist()
    figure = go.Figure(
        go.Heatmap(
            z=values,
            x=list(names),
            y=list(names),
            zmin=zmin,
            zmax=zmax,
            colorscale=colorscale,
            text=[[f"{value:.2f}" for value in row] for row in values],
            texttemplate="%{text}",
            colorbar={"title": colorbar_title},
        )
    )
    figure.update_layout(title=title, template=TEMPLATE, height=420)
    figure.update_yaxes(autorange="reversed")
    return figure

