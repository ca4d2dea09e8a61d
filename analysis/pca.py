"""PCA of contrastive activations per layer, and histograms of projections on a direction.

Conventions (the seed's honesty write-up, made explicit):

* ``paired=True`` fits the PCA on the paired differences ``positive_i - negative_i``, uncentred
  by default (as RepE and :func:`refusal_dir.directions.pca_diff` do, so the first component is
  the library's ``pca`` direction); ``paired=False`` fits it on the pooled activations of both
  sets, centred on their mean (ordinary PCA).
* ``explained_variance_ratio`` is each component's share of the fitted matrix's total sum of
  squares: variance when centred, second moment when not.
* Every component's sign is aligned with the mean difference (positive set minus negative set),
  so the positive set sits on the positive side of PC1 whenever PC1 separates them.
* The scatter coordinates are the activations of both sets, centred on their pooled mean,
  projected on the components.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import plotly.graph_objects as go
import torch
from jaxtyping import Float
from plotly.subplots import make_subplots
from torch import Tensor

from analysis._common import (
    NEGATIVE_COLOR,
    POSITIVE_COLOR,
    TEMPLATE,
    ActsInput,
    layer_acts,
    position_index,
    site_tensor,
    subplot_grid,
    unit_vector,
)
from refusal_dir import DirectionSet
from refusal_dir.deprecation import renamed_keywords
from refusal_dir.errors import ConfigError, DataError

Projections = Float[Tensor, "n"]
Variances = Float[Tensor, "k"]
Vector = Float[Tensor, "d_model"]


@dataclass(frozen=True)
class PCAProjection:
    """Both sets of one layer projected on its first principal components."""

    layer: int
    position: str | int
    paired: bool
    centered: bool
    components: Float[Tensor, "k d_model"]
    explained_variance_ratio: Variances
    positive: Float[Tensor, "n_positive k"]
    negative: Float[Tensor, "n_negative k"]
    mean: Vector

    def auroc(self, component: int = 0) -> float:
        """AUROC of the positive against the negative set along one component."""
        return _auroc(self.positive[:, component], self.negative[:, component])


def _auroc(positive: Tensor, negative: Tensor) -> float:
    """Fraction of (positive, negative) pairs with the positive one higher, ties counting half."""
    difference = positive.double().unsqueeze(1) - negative.double().unsqueeze(0)
    return float(((difference > 0).double() + 0.5 * (difference == 0).double()).mean())


@renamed_keywords(position="token")
def pca_projection(
    acts_pos: ActsInput,
    acts_neg: ActsInput,
    *,
    layer: int,
    token: str | int = -1,
    paired: bool = True,
    site: str = "resid_post",
    n_components: int = 2,
    center: bool | None = None,
) -> PCAProjection:
    """PCA of one layer's activations at one token label; see the module docstring.

    ``acts_pos``/``acts_neg`` are :class:`refusal_dir.Activations` (read at ``site``) or
    ``prompts x positions x layers x d_model`` tensors. ``center`` defaults to ``not paired``.
    """
    positive = layer_acts(acts_pos, site=site, layer=layer, token=token)
    negative = layer_acts(acts_neg, site=site, layer=layer, token=token)
    if n_components < 1 or n_components > positive.shape[1]:
        raise ConfigError(
            f"n_components must be in 1..{positive.shape[1]} (d_model), got {n_components}"
        )
    centered = (not paired) if center is None else bool(center)
    if paired:
        if positive.shape != negative.shape:
            raise DataError(
                f"paired PCA needs matched pairs: got {positive.shape[0]} positive and "
                f"{negative.shape[0]} negative prompts (use paired=False)"
            )
        fitted = positive - negative
    else:
        fitted = torch.cat([positive, negative])
    if fitted.shape[0] < 2:
        raise DataError("PCA needs at least two rows: pass more prompts")
    if centered:
        fitted = fitted - fitted.mean(dim=0)
    _, singular, vh = torch.linalg.svd(fitted, full_matrices=False)
    count = min(n_components, vh.shape[0])
    components = vh[:count].clone()
    gap = positive.mean(dim=0) - negative.mean(dim=0)
    signs = torch.where(components @ gap >= 0, 1.0, -1.0).to(components.dtype)
    components = components * signs.unsqueeze(1)
    total = float(singular.pow(2).sum())
    ratio = (
        singular[:count].pow(2) / total if total > 0 else torch.zeros(count, dtype=torch.float64)
    )
    mean = torch.cat([positive, negative]).mean(dim=0)
    return PCAProjection(
        layer=layer,
        position=token,
        paired=paired,
        centered=centered,
        components=components.float(),
        explained_variance_ratio=ratio.float(),
        positive=((positive - mean) @ components.T).float(),
        negative=((negative - mean) @ components.T).float(),
        mean=mean.float(),
    )


@renamed_keywords(position="token")
def pca_projections(
    acts_pos: ActsInput,
    acts_neg: ActsInput,
    *,
    layers: Sequence[int],
    token: str | int = -1,
    paired: bool = True,
    site: str = "resid_post",
    n_components: int = 2,
) -> list[PCAProjection]:
    """:func:`pca_projection` for each of ``layers``."""
    return [
        pca_projection(
            acts_pos,
            acts_neg,
            layer=layer,
            token=token,
            paired=paired,
            site=site,
            n_components=n_components,
        )
        for layer in layers
    ]


def pca_scatter_figure(
    projections: Sequence[PCAProjection],
    *,
    labels: tuple[str, str] = ("positive", "negative"),
    components: tuple[int, int] = (0, 1),
    title: str = "Activations on the first two principal components",
) -> go.Figure:
    """A 2-D scatter of both sets for each layer (one subplot per projection)."""
    if not projections:
        raise ConfigError("no PCA projections to plot: compute them with pca_projections")
    first, second = components
    for projection in projections:
        if max(first, second) >= projection.components.shape[0]:
            raise ConfigError(
                f"component {max(first, second)} was not computed: raise n_components"
            )
    rows, columns = subplot_grid(len(projections))
    figure = make_subplots(
        rows=rows,
        cols=columns,
        subplot_titles=[f"layer {p.layer}" for p in projections],
        horizontal_spacing=0.06,
        vertical_spacing=min(0.2, 0.45 / rows) if rows > 1 else 0.0,
    )
    for index, projection in enumerate(projections):
        row, column = index // columns + 1, index % columns + 1
        for name, coordinates, color in (
            (labels[0], projection.positive, POSITIVE_COLOR),
            (labels[1], projection.negative, NEGATIVE_COLOR),
        ):
            figure.add_trace(
                go.Scatter(
                    x=coordinates[:, first].tolist(),
                    y=coordinates[:, second].tolist(),
                    mode="markers",
                    marker={"color": color, "size": 6, "opacity": 0.75},
                    name=name,
                    legendgroup=name,
                    showlegend=index == 0,
                ),
                row=row,
                col=column,
            )
        ratio = projection.explained_variance_ratio
        figure.update_xaxes(
            title_text=f"PC{first + 1} ({100 * float(ratio[first]):.0f}%)", row=row, col=column
        )
        figure.update_yaxes(
            title_text=f"PC{second + 1} ({100 * float(ratio[second]):.0f}%)", row=row, col=column
        )
    kind = "paired differences" if projections[0].paired else "pooled activations"
    figure.update_layout(
        title=f"{title} (PCA of {kind})", template=TEMPLATE, height=340 * rows + 100
    )
    return figure


# ----------------------------------------------------------------------------------------------
# Projections on a direction (or a principal component), per layer
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerProjections:
    """Scalar projections of both sets on one axis per layer."""

    layers: tuple[int, ...]
    positive: tuple[Projections, ...]
    negative: tuple[Projections, ...]
    axis: str

    def auroc(self, layer: int) -> float:
        """AUROC of the positive against the negative set at ``layer``."""
        index = self.layers.index(layer)
        return _auroc(self.positive[index], self.negative[index])


@renamed_keywords(position="token", direction_position="direction_token")
def layer_projections(
    acts_pos: ActsInput,
    acts_neg: ActsInput,
    *,
    layers: Sequence[int],
    directions: DirectionSet | Tensor | None = None,
    component: int | None = None,
    token: str | int = -1,
    direction_token: str | int | None = None,
    site: str = "resid_post",
    paired: bool = True,
) -> LayerProjections:
    """Project both sets at each layer on that layer's unit direction, or on a PCA component.

    Give exactly one of ``directions`` (a DirectionSet: each layer's own direction; a tensor:
    the same vector at every layer) and ``component`` (0-based index of the principal component
    of that layer, fitted as in :func:`pca_projection` with ``paired``).
    """
    if (directions is None) == (component is None):
        raise ConfigError("give exactly one of directions= and component=")
    positives, negatives = [], []
    for layer in layers:
        pos = layer_acts(acts_pos, site=site, layer=layer, token=token)
        neg = layer_acts(acts_neg, site=site, layer=layer, token=token)
        if directions is not None:
            axis = unit_vector(directions, layer=layer, token=direction_token, allow_zero=True)
            if axis.shape[0] != pos.shape[1]:
                raise ConfigError(
                    f"the direction has d_model {axis.shape[0]}, the activations {pos.shape[1]}"
                )
        else:
            assert component is not None  # checked above; narrows the type
            projection = pca_projection(
                acts_pos,
                acts_neg,
                layer=layer,
                token=token,
                paired=paired,
                site=site,
                n_components=component + 1,
            )
            axis = projection.components[component].double()
        positives.append((pos @ axis).float())
        negatives.append((neg @ axis).float())
    label = "direction" if component is None else f"PC{component + 1}"
    return LayerProjections(tuple(layers), tuple(positives), tuple(negatives), label)


@renamed_keywords(position="token")
def projection_histogram_figure(
    directions: DirectionSet | Tensor | LayerProjections | None,
    acts_pos: ActsInput | None = None,
    acts_neg: ActsInput | None = None,
    *,
    layers: Sequence[int] | None = None,
    component: int | None = None,
    token: str | int = -1,
    site: str = "resid_post",
    labels: tuple[str, str] = ("positive", "negative"),
    bins: int = 30,
    title: str | None = None,
) -> go.Figure:
    """Histograms of both sets' projections per layer, overlaid (one subplot per layer).

    Pass precomputed :class:`LayerProjections`, or ``directions`` (or ``None`` with
    ``component=``) with the two activation sets and ``layers``.
    """
    if isinstance(directions, LayerProjections):
        projections = directions
    else:
        if acts_pos is None or acts_neg is None:
            raise ConfigError("pass both activation sets (acts_pos, acts_neg)")
        if layers is None:
            layers = list(range(site_tensor(acts_pos, site).shape[2]))
            position_index(acts_pos, token)  # validates the token label early
        projections = layer_projections(
            acts_pos,
            acts_neg,
            layers=layers,
            directions=directions,
            component=component,
            token=token,
            site=site,
        )
    rows, columns = subplot_grid(len(projections.layers))
    figure = make_subplots(
        rows=rows,
        cols=columns,
        subplot_titles=[
            f"layer {layer} (AUROC {projections.auroc(layer):.2f})" for layer in projections.layers
        ],
        horizontal_spacing=0.05,
        vertical_spacing=min(0.2, 0.45 / rows) if rows > 1 else 0.0,
    )
    for index in range(len(projections.layers)):
        row, column = index // columns + 1, index % columns + 1
        pos, neg = projections.positive[index], projections.negative[index]
        low = float(torch.minimum(pos.min(), neg.min()))
        high = float(torch.maximum(pos.max(), neg.max()))
        size = (high - low) / bins if high > low else 1.0
        for name, values, color in (
            (labels[0], pos, POSITIVE_COLOR),
            (labels[1], neg, NEGATIVE_COLOR),
        ):
            figure.add_trace(
                go.Histogram(
                    x=values.tolist(),
                    xbins={"start": low, "end": high + size, "size": size},
                    marker={"color": color},
                    opacity=0.6,
                    name=name,
                    legendgroup=name,
                    showlegend=index == 0,
                ),
                row=row,
                col=column,
            )
        figure.update_xaxes(title_text=f"projection on {projections.axis}", row=row, col=column)
    figure.update_layout(
        barmode="overlay",
        template=TEMPLATE,
        title=title or f"Projections on the {projections.axis} per layer",
        height=320 * rows + 100,
    )
    return figure
