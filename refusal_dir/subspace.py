"""Multi-direction ablation: a k-dimensional subspace per (token, layer) instead of one direction.

A :class:`~refusal_dir.directions.DirectionSet` holds one unit direction per (token, layer). A
:class:`Subspace` holds ``k`` orthonormal ones, a ``k x d_model`` basis, built by
:func:`build_subspace` from a DirectionSet and the contrastive activations it was computed from:

* row 0 is the DirectionSet's own unit direction (mean difference, PCA or probe: whatever made
  the set), taken as it is;
* rows 1 .. k-1 are the leading right-singular vectors of the paired differences
  ``positive_i - negative_i`` (uncentred, as the ``pca`` method) after the component along row 0
  is removed from every difference. They are the directions along which the pairs still differ
  most once the steering direction is accounted for; each is orthogonalized against the rows
  before it in float64 and its sign fixed (largest coordinate positive), so the same data give
  the same basis.

So ``k=1`` is the DirectionSet, bit for bit: :func:`refusal_dir.interventions.ablation` and
:func:`refusal_dir.orthogonalize.orthogonalized_copy` given a ``k=1`` Subspace compute exactly
(``torch.equal``) what they compute given the DirectionSet (tested). Why this construction and
not "k methods stacked and orthonormalized": the three methods' directions are nearly parallel
on real models (cosines above 0.9), so what is left of the second after orthogonalization is
mostly noise, whereas the paired differences' residual spectrum says which other directions
separate the pairs.

Ablating a subspace removes the component along every basis row (:func:`ablation` with a
Subspace, stream or weights mode; weight orthogonalization of the same basis). The words are
those of docs/glossary.md: ``layer`` is whose basis, ``token`` which label.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from refusal_dir.activations import Activations
from refusal_dir.directions import DirectionSet
from refusal_dir.errors import ConfigError, DataError, DirectionMismatchError

_EPS = 1e-12
#: Rows whose Gram matrix differs from the identity by more than this are not orthonormal.
ORTHONORMAL_TOLERANCE = 1e-4

Basis = Float[Tensor, "k d_model"]


@dataclass(frozen=True)
class Subspace:
    """``k`` orthonormal directions per (token, layer): the set's own direction, then ``extra``.

    ``extra`` is ``tokens x layers x (k - 1) x d_model`` (float32): rows 1 .. k-1 of every basis
    (:func:`build_subspace` builds it). Row 0 is always ``directions.unit(layer, token)`` itself.
    """

    directions: DirectionSet
    extra: Float[Tensor, "tokens layers extra d_model"]

    def __post_init__(self) -> None:
        expected = (*self.directions.directions.shape[:2], self.directions.d_model)
        if self.extra.ndim != 4 or (self.extra.shape[0], self.extra.shape[1], self.extra.shape[3]) != expected:
            raise DirectionMismatchError(
                f"a subspace's extra rows must be tokens x layers x (k - 1) x d_model {expected}, "
                f"got {tuple(self.extra.shape)}: build it with build_subspace(directions, ...)"
            )
        for position in range(expected[0]):
            for layer in range(expected[1]):
                check_orthonormal(self._basis(position, layer), f"the subspace at layer {layer}")

    @property
    def k(self) -> int:
        return 1 + self.extra.shape[2]

    @property
    def n_layers(self) -> int:
        return self.directions.n_layers

    @property
    def d_model(self) -> int:
        return self.directions.d_model

    @property
    def meta(self) -> Any:
        return self.directions.meta

    def _basis(self, position: int, layer: int) -> Basis:
        return torch.cat([self.directions.directions[position, layer].unsqueeze(0), self.extra[position, layer]])

    def basis(self, layer: int, token: str | int | None = None) -> Basis:
        """The ``k x d_model`` orthonormal basis of ``layer`` (label ``token``; default the last)."""
        self.directions.unit(layer, token)  # checks the layer and the label
        return self._basis(self.directions.position_index(token), layer)

    def check_fits(self, model: Any) -> None:
        """Raise DirectionMismatchError unless this subspace was built for this model."""
        self.directions.check_fits(model)


def check_orthonormal(rows: Tensor, where: str) -> None:
    """Raise DirectionMismatchError unless ``rows`` are unit length (or zero) and orthogonal."""
    values = rows.double()
    gram = values @ values.T
    lengths = gram.diagonal()
    expected = torch.diag((lengths > 0.5).double())  # a zero row (a zero direction) is allowed
    if not bool(torch.isfinite(gram).all()) or float((gram - expected).abs().max()) > ORTHONORMAL_TOLERANCE:
        raise DirectionMismatchError(
            f"{where} is not an orthonormal basis (largest deviation of its Gram matrix from the "
            f"identity {float((gram - expected).abs().max()):.3g}): build it with build_subspace(...)"
        )


def orthonormal_rows(rows: Tensor) -> Tensor:
    """Gram-Schmidt in float64, in order; row 0 is returned as it is (a unit vector already).

    The span of the rows is kept. Used where a basis is rescaled (the post-norm gain of
    :func:`refusal_dir.interventions.weights_mode_basis`): row 0 then stays the exact
    single-direction unit, so ``k=1`` edits are the single-direction edits bit for bit.
    """
    if rows.shape[0] <= 1:
        return rows
    chosen = [rows[0].double()]
    for row in rows[1:].double():
        for previous in chosen:
            row = row - (row @ previous) * previous
        chosen.append(row / row.norm().clamp_min(_EPS))
    return torch.cat([rows[:1], torch.stack(chosen[1:]).to(rows.dtype)])


def principal_cosines(first: Tensor, second: Tensor) -> Tensor:
    """Cosines of the principal angles between the row spans of two matrices, largest first.

    ``min(k1, k2)`` values in [0, 1]; all 1 when one span contains the other. The rows need not
    be orthonormal (they are orthonormalized here by QR).
    """
    q1 = torch.linalg.qr(first.double().T).Q
    q2 = torch.linalg.qr(second.double().T).Q
    return torch.linalg.svdvals(q1.T @ q2).clamp(0.0, 1.0)


def _fixed_sign(vector: Tensor) -> Tensor:
    return vector if float(vector[vector.abs().argmax()]) >= 0 else -vector


def _extra_rows(first: Tensor, differences: Tensor, n_extra: int) -> Tensor:
    """Rows 1 .. k-1 of one basis: leading right-singular vectors of the differences with the
    component along ``first`` (row 0) removed, orthogonalized against ``first`` in float64."""
    first = first.double()
    residual = differences - torch.outer(differences @ first, first)
    _, values, vh = torch.linalg.svd(residual, full_matrices=False)
    # A direction the pairs do not differ along (say, a template token every prompt shares)
    # becomes a zero row, as a zero direction is in a DirectionSet: ablating it does nothing.
    floor = 1e-9 * float(differences.norm())
    rows: list[Tensor] = []
    for value, candidate in zip(values[:n_extra], vh[:n_extra]):
        if float(value) <= floor:
            rows.append(torch.zeros_like(candidate))
            continue
        for previous in [first, *rows]:
            candidate = candidate - (candidate @ previous) * previous
        rows.append(_fixed_sign(candidate / candidate.norm().clamp_min(_EPS)))
    return torch.stack(rows)


def build_subspace(
    directions: DirectionSet,
    positive: Activations | None = None,
    negative: Activations | None = None,
    *,
    k: int = 1,
) -> Subspace:
    """A ``k``-dimensional subspace per (token, layer): the set's direction, then ``k - 1``
    principal directions of the paired differences (module docstring).

    ``positive`` and ``negative`` are the matched pairs' activations, collected at every layer
    with the set's token rule (as :func:`refusal_dir.directions.compute_directions` takes them);
    ``k=1`` needs none.
    """
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= directions.d_model:
        raise ConfigError(f"k must be an integer in 1..{directions.d_model} (d_model), got {k!r}")
    n_positions, n_layers = directions.directions.shape[:2]
    extra = torch.zeros(n_positions, n_layers, k - 1, directions.d_model)
    if k == 1:
        return Subspace(directions, extra)
    if positive is None or negative is None:
        raise ConfigError(
            f"a subspace of k={k} needs the contrastive activations: build_subspace(directions, positive, "
            "negative, k=...) with the activations the directions were computed from"
        )
    if positive.n_prompts != negative.n_prompts:
        raise DataError(
            f"a subspace needs matched pairs: got {positive.n_prompts} positive and "
            f"{negative.n_prompts} negative prompts"
        )
    if positive.n_prompts < k:
        raise DataError(f"a subspace of k={k} needs at least {k} pairs, got {positive.n_prompts}")
    if positive.positions != directions.meta.positions or positive.layers != tuple(range(n_layers)):
        raise DataError(
            "the activations were not collected like the directions (token labels "
            f"{list(positive.positions)} vs {list(directions.meta.positions)}, or not every layer): "
            "collect them with the set's token rule at every layer"
        )
    site = directions.meta.site
    differences = positive.site(site).double() - negative.site(site).double()
    for position in range(n_positions):
        for layer in range(n_layers):
            first = directions.directions[position, layer]
            extra[position, layer] = _extra_rows(first, differences[:, position, layer], k - 1).float()
    return Subspace(directions, extra)
