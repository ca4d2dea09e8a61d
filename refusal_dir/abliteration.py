"""Parametrized ablation: a per-layer weight kernel, at run time (per batch row) and in the weights.

A search over ablation parameters (a tuner that removes refusal) needs one thing evaluated many
times: "remove ``w(L)`` of the refusal direction from what layer ``L``'s attention and MLP
write". This module is that thing, in two equal forms:

* at run time, :func:`kernel_ablation` returns an intervention for
  :func:`refusal_dir.interventions.steer`; given one :class:`AblationPoint` per batch row it
  scores many candidate points in one batched forward pass or generation;
* in the weights, :func:`weight_edits` says how each output matrix changes
  (:class:`WeightEdit`), and :func:`bake` applies it to a model in place. Tested equal to the
  run-time form to float precision, family by family.

The kernel (:class:`Kernel`) has heretic's shape: weight ``max_weight`` at layer
``max_weight_position``, falling linearly to ``min_weight`` at ``min_weight_distance`` layers
from it, and 0 beyond; one kernel for attention writes and one for MLP writes. The direction is
each layer's own (``direction_index=None``) or one direction interpolated between two layers'
(``direction_index=3.25``: ``normalize(0.75 * d3 + 0.25 * d4)`` of the unit directions, the
layers of the :class:`~refusal_dir.directions.DirectionSet`; heretic counts the same way, its
index 0 being the first layer's output). The embedding is never edited by a kernel point.

Options (:class:`AblationOptions`):

* ``projected`` (default on): each layer's refusal direction is orthogonalized against that
  layer's harmless mean first (:func:`project_out`), so ablating it leaves the harmless mean's
  own direction alone;
* ``norm_preserving`` (default on; heretic's "full row normalization", after grimjim's
  biprojected abliteration): each edited output matrix keeps the norm of every row (one row per
  residual-stream coordinate): ``W' = diag(r) normalize_rows((I - w u u^T) diag(1/r) W)`` with
  ``r`` the row norms of ``W``. The writer's bias is left alone. Without it the edit is the
  plain projection ``W' = (I - w u u^T) W`` (bias projected too), as in Arditi et al.

On Gemma-2/3, whose blocks normalize each write with a post-norm, ``u`` is the direction
rescaled by that norm's gain (as :func:`refusal_dir.interventions.weights_mode_unit`), so that a
full plain edit leaves the post-norm's output with no component along the direction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from refusal_dir.architectures import WRITE_KINDS, Writer
from refusal_dir.directions import DirectionSet
from refusal_dir.errors import ConfigError, DirectionMismatchError
from refusal_dir.interventions import Edit, PositionState, _OnDevice, _Scope, weights_mode_unit
from refusal_dir.model import HookedModel
from refusal_dir.sites import check_layer

_EPS = 1e-12


# ----------------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------------


def _finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Kernel:
    """Per-layer ablation weights: ``max_weight`` at the peak, linear to ``min_weight`` at
    ``min_weight_distance`` layers from it, 0 beyond (heretic's kernel)."""

    max_weight: float
    max_weight_position: float
    min_weight: float
    min_weight_distance: float

    def __post_init__(self) -> None:
        for name in ("max_weight", "max_weight_position", "min_weight", "min_weight_distance"):
            object.__setattr__(self, name, _finite(f"kernel {name}", getattr(self, name)))
        if self.min_weight_distance <= 0:
            raise ConfigError(
                f"kernel min_weight_distance must be > 0 (layers), got {self.min_weight_distance}"
            )

    @classmethod
    def zero(cls) -> Kernel:
        """The kernel that edits nothing."""
        return cls(0.0, 0.0, 0.0, 1.0)

    def weights(self, n_layers: int) -> Tensor:
        """The weight of every layer, ``float32 [n_layers]``."""
        distance = (torch.arange(n_layers, dtype=torch.float64) - self.max_weight_position).abs()
        ramp = self.max_weight + distance / self.min_weight_distance * (self.min_weight - self.max_weight)
        return torch.where(distance > self.min_weight_distance, torch.zeros_like(ramp), ramp).float()

    def to_dict(self) -> dict[str, float]:
        return {
            "max_weight": self.max_weight,
            "max_weight_position": self.max_weight_position,
            "min_weight": self.min_weight,
            "min_weight_distance": self.min_weight_distance,
        }


@dataclass(frozen=True)
class AblationPoint:
    """One candidate of the search, and one exported model: a kernel per write kind and the
    direction (each layer's own, or one interpolated at ``direction_index``)."""

    attn: Kernel
    mlp: Kernel
    direction_index: float | None = None

    def __post_init__(self) -> None:
        if self.direction_index is not None:
            object.__setattr__(self, "direction_index", _finite("direction_index", self.direction_index))
            if self.direction_index < 0:
                raise ConfigError(f"direction_index must be >= 0, got {self.direction_index}")

    @classmethod
    def zero(cls) -> AblationPoint:
        return cls(Kernel.zero(), Kernel.zero())

    def kernel(self, kind: str) -> Kernel:
        return self.attn if kind == "attn" else self.mlp

    def layer_weights(self, n_layers: int) -> Tensor:
        """``2 x n_layers``: row 0 the attention writes' weights, row 1 the MLP writes'."""
        return torch.stack([self.kernel(kind).weights(n_layers) for kind in WRITE_KINDS])

    def to_dict(self) -> dict[str, Any]:
        return {"attn": self.attn.to_dict(), "mlp": self.mlp.to_dict(), "direction_index": self.direction_index}

    @classmethod
    def from_dict(cls, raw: Any) -> AblationPoint:
        """The point stored by :meth:`to_dict` (one line naming what is wrong otherwise)."""
        if not isinstance(raw, dict) or set(raw) != {"attn", "mlp", "direction_index"}:
            raise ConfigError(
                "an ablation point must be a mapping with exactly attn, mlp and direction_index, "
                f"got {raw!r}"
            )
        kernels = []
        for kind in ("attn", "mlp"):
            entry = raw[kind]
            names = ("max_weight", "max_weight_position", "min_weight", "min_weight_distance")
            if not isinstance(entry, dict) or set(entry) != set(names):
                raise ConfigError(f"the ablation point's {kind} kernel must have exactly {', '.join(names)}")
            kernels.append(Kernel(**{name: entry[name] for name in names}))
        return cls(kernels[0], kernels[1], raw["direction_index"])


@dataclass(frozen=True)
class AblationOptions:
    """How a point's directions are built and baked (see the module docstring)."""

    projected: bool = True
    norm_preserving: bool = True
    token: str | int | None = None


# ----------------------------------------------------------------------------------------------
# Directions
# ----------------------------------------------------------------------------------------------


def project_out(directions: DirectionSet, harmless_means: Tensor) -> DirectionSet:
    """The directions orthogonalized against the harmless mean of their layer (and token).

    ``harmless_means`` is ``layers x d_model`` (one per layer, used for every token label) or
    ``tokens x layers x d_model``. Each raw direction ``r`` becomes ``r - (r . m) m`` with ``m``
    the unit harmless mean; the set keeps raw vectors (their norms shrink by the removed part).
    """
    raw = directions._raw().double()
    means = torch.as_tensor(harmless_means).double()
    if means.ndim == 2:
        means = means.unsqueeze(0).expand_as(raw)
    if means.shape != raw.shape:
        raise DirectionMismatchError(
            f"harmless means of shape {tuple(means.shape)} do not fit directions of shape "
            f"{tuple(raw.shape)}: compute them at the same layers and site"
        )
    unit = means / means.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    projected = raw - (raw * unit).sum(-1, keepdim=True) * unit
    return DirectionSet.from_raw(projected.float(), directions.meta)


def harmless_means(model: HookedModel, prompts: Sequence[str], *, site: str = "resid_pre", token: str | None = None, batch_size: int = 16) -> Tensor:
    """The mean activation of harmless prompts at every layer, ``tokens x layers x d_model``
    (the token rule's labels, as a DirectionSet of the same rule holds them)."""
    from refusal_dir.activations import collect_activations

    acts = collect_activations(model, prompts, sites=(site,), token=token, batch_size=batch_size, progress=False)
    return acts.mean(site).float()


def layer_units(directions: DirectionSet, n_layers: int, direction_index: float | None, token: str | int | None = None) -> Tensor:
    """``n_layers x d_model`` unit directions: each layer's own, or one interpolated direction."""
    if directions.n_layers != n_layers:
        raise DirectionMismatchError(
            f"the directions cover {directions.n_layers} layers but the model has {n_layers}: "
            "extract directions at every layer of this model"
        )
    units = torch.stack([directions.unit(layer, token) for layer in range(n_layers)]).float()
    if direction_index is None:
        return units
    if direction_index > n_layers - 1:
        raise ConfigError(f"direction_index {direction_index} is beyond the last layer {n_layers - 1}")
    fraction, whole = math.modf(direction_index)
    low = units[int(whole)]
    high = units[min(int(whole) + 1, n_layers - 1)]
    one = torch.lerp(low, high, fraction)
    one = one / one.norm().clamp_min(_EPS)
    return one.expand(n_layers, -1).clone()


def _point_units(directions: DirectionSet, n_layers: int, point: AblationPoint, options: AblationOptions, means: Tensor | None) -> Tensor:
    if options.projected:
        if means is None:
            raise ConfigError(
                "projected ablation needs the harmless means (harmless_means(model, prompts)); "
                "or pass AblationOptions(projected=False)"
            )
        directions = project_out(directions, means)
    return layer_units(directions, n_layers, point.direction_index, options.token)


# ----------------------------------------------------------------------------------------------
# The edit of one output matrix
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightEdit:
    """The edit of one parameter: remove ``weight`` of its output along ``basis``.

    ``basis`` is ``k x d_model`` with orthonormal rows (k=1: one direction; a
    :class:`~refusal_dir.subspace.Subspace`'s basis), already rescaled by the post-norm gain
    where the family has one. ``apply`` takes the parameter with ``d_model`` on axis -2 (a
    Linear's ``d_model x d_in`` weight, or stacked experts) or a ``d_model`` bias;
    ``rows=True``, a matrix with ``d_model`` on its last axis (an embedding's rows).

    The plain edit removes the rows one after another (the same as all at once, the rows being
    orthonormal), each as ``W - w u (u^T W)``: this is the projection weight orthogonalization
    (:mod:`refusal_dir.orthogonalize`) bakes, one formula for both.
    """

    basis: Tensor
    weight: float
    norm_preserving: bool

    def apply(self, tensor: Tensor, *, rows: bool = False) -> Tensor:
        values = tensor.float()
        basis = self.basis.to(values.device).float()
        if values.ndim == 1:
            if self.norm_preserving:
                return tensor.clone()
            for u in basis:
                values = values - self.weight * ((values @ u).unsqueeze(-1) * u)
            return values.to(tensor.dtype)
        if rows and self.norm_preserving:
            raise ConfigError("norm-preserving ablation edits output matrices, not embedding rows")
        if rows:
            for u in basis:
                values = values - self.weight * torch.outer(values @ u, u)
            return values.to(tensor.dtype)
        if not self.norm_preserving:
            for u in basis:
                values = values - self.weight * (u.unsqueeze(-1) * (u @ values).unsqueeze(-2))
            return values.to(tensor.dtype)
        if values.ndim != 2 or basis.shape[0] != 1:
            raise ConfigError(
                "norm-preserving ablation edits one direction of a dense matrix: use "
                "norm_preserving=False for stacked experts or a subspace"
            )
        norms = values.norm(dim=1, keepdim=True)
        unit_rows = values / norms.clamp_min(_EPS)
        u = basis[0]
        edited = unit_rows - self.weight * torch.outer(u, u @ unit_rows)
        edited = edited / edited.norm(dim=1, keepdim=True).clamp_min(_EPS)
        return (edited * norms).to(tensor.dtype)


def _parameter_names(module: nn.Module) -> dict[int, str]:
    return {id(parameter): name for name, parameter in module.named_parameters(remove_duplicate=False)}


def weight_edits(
    model: HookedModel,
    directions: DirectionSet,
    point: AblationPoint,
    *,
    options: AblationOptions = AblationOptions(),
    harmless_means: Tensor | None = None,
) -> dict[str, WeightEdit]:
    """Parameter name (as in ``model.hf.state_dict()``) -> its edit, for one point.

    Reads the architecture and the post-norm gains only, never a writer's weight, so it works on
    a model whose writers are still on disk (the meta device).
    """
    n_layers = model.n_layers
    units = _point_units(directions, n_layers, point, options, harmless_means)
    weights = point.layer_weights(n_layers)
    architecture = model.architecture
    names = _parameter_names(model.hf)
    edits: dict[str, WeightEdit] = {}
    for layer, block in enumerate(architecture.layers(model.hf)):
        for k, kind in enumerate(WRITE_KINDS):
            w = float(weights[k, layer])
            if w == 0.0:
                continue
            unit = weights_mode_unit(architecture, block, kind, units[layer]).float().cpu()
            writers = architecture.writers(block, kind)
            if options.norm_preserving and (len(writers) != 1 or writers[0].weight.ndim != 2):
                raise ConfigError(
                    f"norm-preserving ablation edits dense writers; layer {layer}'s {kind} write "
                    "has stacked experts: use norm_preserving=False"
                )
            for writer in writers:
                edit = WeightEdit(unit.unsqueeze(0), w, options.norm_preserving)
                edits[names[id(writer.weight)]] = edit
                if writer.bias is not None:
                    edits[names[id(writer.bias)]] = edit
    return edits


def bake(
    model: HookedModel,
    directions: DirectionSet,
    point: AblationPoint,
    *,
    options: AblationOptions = AblationOptions(),
    harmless_means: Tensor | None = None,
) -> None:
    """Edit ``model.hf``'s weights in place (copy the model first to keep the original)."""
    edits = weight_edits(model, directions, point, options=options, harmless_means=harmless_means)
    parameters = dict(model.hf.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, edit in edits.items():
            parameter = parameters[name]
            parameter.data = edit.apply(parameter.data)


# ----------------------------------------------------------------------------------------------
# The same edit at run time, one point per batch row
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelAblation:
    """The run-time form of a point (or of one point per row): for :func:`steer`.

    ``units`` is ``layers x d_model`` (one direction per layer, shared by every row) or
    ``rows x layers x d_model``; ``weights`` is ``2 x layers`` or ``rows x 2 x layers``.
    """

    units: Tensor
    weights: Tensor
    norm_preserving: bool

    def per_row(self) -> dict[str, Tensor]:
        fields = {}
        if self.weights.ndim == 3:
            fields["weights"] = self.weights
        if self.units.ndim == 3:
            fields["units"] = self.units
        return fields

    def place_on(self, model: HookedModel, scope: _Scope, state: PositionState) -> None:
        n_layers = model.n_layers
        if self.units.shape[-2:] != (n_layers, model.d_model) or self.weights.shape[-2:] != (2, n_layers):
            raise DirectionMismatchError(
                f"the kernel ablation was built for other dimensions (units {tuple(self.units.shape)}, "
                f"weights {tuple(self.weights.shape)}) than the model's {n_layers} layers x "
                f"{model.d_model}: build it for this model"
            )
        architecture = model.architecture
        for layer, block in enumerate(architecture.layers(model.hf)):
            check_layer(layer, n_layers)
            for k, kind in enumerate(WRITE_KINDS):
                weight = self.weights[..., k, layer]
                if not bool(weight.ne(0).any()):
                    continue  # no hook at all: the unedited layer is bit-for-bit the model's
                unit = self.units[..., layer, :]
                rescaled = weights_mode_unit(architecture, block, kind, unit)
                if not self.norm_preserving:
                    scope.on_output(architecture.block_output(block, kind), _projection(rescaled, weight, state))
                    continue
                writers = architecture.writers(block, kind)
                if len(writers) != 1 or writers[0].weight.ndim != 2:
                    raise ConfigError(
                        f"norm-preserving ablation edits dense writers; layer {layer}'s {kind} "
                        "write has stacked experts: use norm_preserving=False"
                    )
                module = block.get_submodule(writers[0].path)
                scope.on_output(module, _row_preserving(writers[0], rescaled, weight, state))


def _selected(values: _OnDevice, per_row: bool, state: PositionState, act: Tensor) -> Tensor:
    tensor = values.like(act)
    if not per_row:
        return tensor
    selected = tensor[state.row_index(tensor.device)]
    if selected.shape[0] != act.shape[0]:
        raise ConfigError(
            f"{values.tensor.shape[0]} per-row ablation points do not fit a batch of "
            f"{act.shape[0]} rows: give one point per prompt"
        )
    return selected


def _projection(units: Tensor, weight: Tensor, state: PositionState) -> Edit:
    """Output edit: remove ``weight`` of the component along ``units`` (per row if given so)."""
    unit_values, weight_values = _OnDevice(units.float()), _OnDevice(weight.float())
    units_per_row, weights_per_row = units.ndim == 2, weight.ndim == 1

    def edit(act: Tensor) -> Tensor:
        u = _selected(unit_values, units_per_row, state, act)
        w = _selected(weight_values, weights_per_row, state, act)
        u = u.view(act.shape[0], 1, -1) if units_per_row else u
        w = w.view(act.shape[0], 1, 1) if weights_per_row else w
        component = (act * u).sum(-1, keepdim=True)
        return act - w * component * u

    return edit


def _row_preserving(writer: Writer, units: Tensor, weight: Tensor, state: PositionState) -> Edit:
    """Output edit of a Linear writer (hooked at its module's output) equal to its
    norm-preserving edit.

    With ``r`` the row norms of ``W``, ``V = diag(1/r) W``, ``g = V^T u`` and ``c = V g``, the
    edited row ``i`` has norm ``n_i = sqrt(|V_i|^2 - 2 w u_i c_i + w^2 u_i^2 |g|^2)``, and
    ``W' x = (r / n) * ((I - w u u^T) V x)``. So the output ``y = W x + b`` becomes
    ``y + (y - b) * (1/n - 1) - w (u . (y - b) / r) * u * r / n``: exact when ``w = 0``.
    """
    matrix = writer.weight.detach().float()
    norms = matrix.norm(dim=1)
    unit_rows = matrix / norms.clamp_min(_EPS).unsqueeze(1)
    # |V_i|^2 is 1 (0 for an all-zero row); taken as exactly that, a row with w = 0 keeps n = 1
    # and its output bit for bit.
    row_sq = (norms > 0).float()
    flat = units.float().reshape(-1, units.shape[-1])
    g = flat @ unit_rows  # rows x d_in
    c = g @ unit_rows.T  # rows x d_model
    g_sq = (g * g).sum(-1, keepdim=True)
    tables = {name: _OnDevice(value) for name, value in {
        "u": flat, "c": c, "g_sq": g_sq, "norms": norms.unsqueeze(0), "row_sq": row_sq.unsqueeze(0),
    }.items()}
    weight_values = _OnDevice(weight.float())
    units_per_row, weights_per_row = units.ndim == 2, weight.ndim == 1
    bias = None if writer.bias is None else _OnDevice(writer.bias.detach().float())

    def edit(y: Tensor) -> Tensor:
        w = _selected(weight_values, weights_per_row, state, y)
        w = w.view(-1, 1) if weights_per_row else w.view(1, 1)
        u, c_, g_sq_ = (
            _selected(tables[name], units_per_row, state, y) for name in ("u", "c", "g_sq")
        )
        r, s = tables["norms"].like(y), tables["row_sq"].like(y)
        n = (s - 2 * w * u * c_ + w * w * u * u * g_sq_).clamp_min(0).sqrt().clamp_min(_EPS)
        rows = y.shape[0]
        shape = (rows, 1, -1)
        n, u, r = n.expand(rows, -1).reshape(shape), u.expand(rows, -1).reshape(shape), r.reshape(1, 1, -1)
        w3 = w.expand(rows, 1).reshape(rows, 1, 1)
        y0 = y if bias is None else y - bias.like(y)
        along = ((y0 / r.clamp_min(_EPS)) * u).sum(-1, keepdim=True)
        return y + y0 * (1 / n - 1) - w3 * along * u * r / n

    return edit


def kernel_ablation(
    directions: DirectionSet,
    points: AblationPoint | Sequence[AblationPoint],
    *,
    options: AblationOptions = AblationOptions(),
    harmless_means: Tensor | None = None,
) -> KernelAblation:
    """The run-time intervention of one point, or of one point per batch row."""
    n_layers = directions.n_layers
    if isinstance(points, AblationPoint):
        units = _point_units(directions, n_layers, points, options, harmless_means)
        return KernelAblation(units, points.layer_weights(n_layers), options.norm_preserving)
    points = list(points)
    if not points or not all(isinstance(p, AblationPoint) for p in points):
        raise ConfigError("kernel_ablation needs an AblationPoint or a non-empty list of them")
    base = project_out(directions, harmless_means) if options.projected and harmless_means is not None else directions
    if options.projected and harmless_means is None:
        _point_units(directions, n_layers, points[0], options, None)  # raises the one-line error
    plain = AblationOptions(projected=False, norm_preserving=options.norm_preserving, token=options.token)
    indices = {p.direction_index for p in points}
    if len(indices) == 1:
        units = _point_units(base, n_layers, points[0], plain, None)
    else:
        units = torch.stack([_point_units(base, n_layers, p, plain, None) for p in points])
    weights = torch.stack([p.layer_weights(n_layers) for p in points])
    return KernelAblation(units, weights, options.norm_preserving)
