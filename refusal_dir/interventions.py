"""Interventions on the residual stream: activation addition, directional ablation, clamping.

Each intervention is a small frozen dataclass (a "hook factory"). Apply it in a scope that
removes every hook afterwards, also after an exception::

    with steer(model, addition(directions, layer=6, alpha=1.5)):
        ...  # model.hf / generate() / next_token_logits() see the intervention

or give it to the TransformerLens bridge: ``model.bridge.hooks(fwd_hooks=bridge_hooks(model, i))``.

Units of the steering coefficient ``alpha`` (``addition(..., unit=...)``):

* ``"raw"`` (default, the seed's convention): ``alpha`` times the raw mean-difference vector at
  that layer, so ``alpha = 1`` moves a harmless activation to the harmful mean along the
  direction, whatever the residual norm (Gemma residual norms are in the thousands);
* ``"unit"``: ``alpha`` times the unit direction, in the residual stream's own units.

Where an addition acts in the sequence (``apply_to=``), correct with and without the KV cache:

* ``"all"``: every position, prompt and generated;
* ``"prompt"``: prompt positions only (including the template's post-instruction tokens);
* ``"generated"``: generated positions only.

Directional ablation removes the direction's component from the residual stream at every layer
and every position (Arditi et al. 2024). ``mode="stream"`` projects it out of ``resid_pre``,
``attn_out`` and ``mlp_out`` of every block (TransformerLens hook semantics).
``mode="weights"`` is the form that weight orthogonalization bakes in exactly: it projects the
embedding, and each block's attention and MLP output before the post-norm (Gemma-2/3), along the
direction rescaled by that norm's gain, so the norm's output has no component along the
direction. On models without post-norms (Llama, Mistral, Qwen, Phi-3) the two modes are the
same. Which modules these are, family by family, is declared in :mod:`refusal_dir.architectures`.
``clamp(...)`` sets the component to a fixed value instead of zero (its opposite use).
Given a :class:`~refusal_dir.subspace.Subspace` instead of a DirectionSet, ``ablation`` removes
the component along every row of the layer's ``k x d_model`` basis, in both modes; ``k=1`` is
the single-direction ablation bit for bit.

The words (docs/glossary.md): ``layer`` is whose direction, ``token`` which direction-set label
(the prompt token it was read at), ``at_layers`` where the intervention acts, ``apply_to`` which
positions of the sequence, ``alpha`` every coefficient. The older keywords (``direction_layer``,
``position``, ``positions``, ``layers``, ``strength``, a list as addition's ``layer``) still work
for one release with a :class:`DeprecationWarning`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import torch
from jaxtyping import Float
from torch import Tensor, nn

from refusal_dir.architectures import WRITE_KINDS, Architecture, WriteKind
from refusal_dir.architectures import norm_gain as norm_gain  # re-exported for analysis users
from refusal_dir.deprecation import renamed
from refusal_dir.directions import DirectionSet
from refusal_dir.errors import ConfigError, DirectionMismatchError
from refusal_dir.model import HookedModel
from refusal_dir.sites import check_layer, check_site, hook_name
from refusal_dir.subspace import Subspace, orthonormal_rows

if TYPE_CHECKING:
    from refusal_dir.abliteration import KernelAblation

PositionRule = Literal["all", "prompt", "generated"]
POSITION_RULES: tuple[str, ...] = ("all", "prompt", "generated")
Alpha = float | Sequence[float] | Tensor


# ----------------------------------------------------------------------------------------------
# Position state shared by the hooks of one scope
# ----------------------------------------------------------------------------------------------


@dataclass
class PositionState:
    """Where the current forward pass sits in the sequence.

    ``offset`` is the number of positions already in the KV cache (0 at prefill);
    ``prompt_length`` is the padded prompt width during generation (``None`` outside it: every
    position then counts as a prompt position); ``rows`` selects the batch rows of per-row
    coefficients that the current forward pass covers.

    The offset is derived from the forward passes themselves, never from a ``transformers``
    keyword (whose name changes between releases): one hook per pass calls :meth:`advance` with
    the number of positions the pass carries. A pass with more positions than the sequence held
    so far starts from position 0 (a prefill, or a recompute without a KV cache); a shorter one
    continues the sequence (a KV-cached decode step). The same rule serves the fast path and the
    TransformerLens bridge.
    """

    offset: int = 0
    prompt_length: int | None = None
    rows: slice | Tensor = field(default_factory=lambda: slice(None))
    seen: int = 0
    resuming: bool = False
    _moved: dict[torch.device, tuple[Tensor, Tensor]] = field(default_factory=dict, init=False, repr=False, compare=False)

    def row_index(self, device: torch.device) -> slice | Tensor:
        """:attr:`rows` for indexing a tensor on ``device``: a tensor of rows is moved there once
        per device and set of rows, not on every hook call of every decode step."""
        if isinstance(self.rows, slice):
            return self.rows
        cached = self._moved.get(device)
        if cached is None or cached[0] is not self.rows:
            cached = self._moved[device] = (self.rows, self.rows.to(device))
        return cached[1]

    def start(self, rows: slice | Tensor, prompt_length: int | None = None) -> None:
        """Begin a new batch: its rows, its padded prompt width (generation only), offset 0."""
        self.rows = rows
        self.prompt_length = prompt_length
        self.offset = 0
        self.seen = 0
        self.resuming = False

    def resume(self, rows: slice | Tensor) -> None:
        """Go on with the sequence seen so far, now for ``rows``: the next pass continues it
        whatever its length (a shared prefix ran once per group of alike rows, and each row's
        own tokens follow it)."""
        self.rows = rows
        self.resuming = True

    def advance(self, seq_len: int) -> None:
        """Record one forward pass over ``seq_len`` positions (called before its first layer)."""
        continues = self.resuming or seq_len <= self.seen
        self.offset = self.seen if continues else 0
        self.seen = self.offset + seq_len
        self.resuming = False

    def mask(self, seq_len: int, rule: str, device: torch.device) -> Tensor | None:
        """``1 x seq x 1`` mask of the positions a rule covers; ``None`` means all of them."""
        if rule == "all":
            return None
        if self.prompt_length is None:
            # Outside generation every position is a prompt position.
            return None if rule == "prompt" else torch.zeros(1, seq_len, 1, dtype=torch.bool, device=device)
        absolute = torch.arange(self.offset, self.offset + seq_len, device=device)
        if rule == "prompt":
            covered = absolute < self.prompt_length
        else:
            covered = absolute >= self.prompt_length
        return covered.view(1, seq_len, 1)


def _check_positions(positions: str) -> str:
    if positions not in POSITION_RULES:
        raise ConfigError(
            f"unknown apply_to {positions!r}: choose one of {', '.join(POSITION_RULES)}"
        )
    return positions


def _as_alpha(alpha: Alpha) -> float | Tensor:
    if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
        if not math.isfinite(alpha):
            raise ConfigError(f"alpha must be a finite number, got {alpha}")
        return float(alpha)
    values = torch.as_tensor(alpha, dtype=torch.float32).flatten()
    if values.numel() == 0:
        raise ConfigError("alpha is an empty list: give one coefficient per batch row")
    if not bool(torch.isfinite(values).all()):
        raise ConfigError(f"alpha must be finite, got {values.tolist()}")
    return values


# ----------------------------------------------------------------------------------------------
# Interventions
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Addition:
    """Add ``alpha * vector`` at ``site`` of ``layers``. ``alpha`` may be one value per row."""

    vector: Float[Tensor, " d_model"]
    at_layers: tuple[int, ...]
    alpha: float | Tensor = 1.0
    site: str = "resid_pre"
    apply_to: str = "all"


@dataclass(frozen=True)
class Ablation:
    """Move the component along ``unit`` to ``value`` (0: ablation) at every layer.

    ``alpha`` interpolates: the component becomes ``(1 - alpha) * c + alpha * value``; 1 is full
    ablation (or clamping), 0 leaves the model alone, 2 reflects the component, negative values
    amplify it. ``value`` and ``alpha`` may be one value per batch row (a tensor), so one
    batched call sweeps them.
    """

    unit: Float[Tensor, " d_model"] | Float[Tensor, "rows d_model"]
    """One direction, or one per row (``rows x d_model``, stream mode only)."""
    at_layers: tuple[int, ...] | None = None
    value: float | Tensor = 0.0
    alpha: float | Tensor = 1.0
    mode: str = "stream"
    apply_to: str = "all"
    basis: Float[Tensor, "k d_model"] | None = None
    """A subspace whose every direction is removed (k >= 2 orthonormal rows, the first equal to
    ``unit``; :func:`ablation` with a :class:`~refusal_dir.subspace.Subspace`). None: ``unit``
    alone."""


Intervention = Addition | Ablation
if TYPE_CHECKING:
    from typing import TypeAlias

    # What takes per-row coefficients: also abliteration.KernelAblation (its per_row() names them).
    RowIntervention: TypeAlias = "Intervention | KernelAblation"

_Rows = TypeVar("_Rows", bound="RowIntervention")


def _direction_vector(directions: DirectionSet | Tensor, layer: int, token: str | int | None, unit: str) -> Tensor:
    if isinstance(directions, DirectionSet):
        return directions.unit(layer, token) if unit == "unit" else directions.vector(layer, token)
    vector = torch.as_tensor(directions, dtype=torch.float32)
    if vector.ndim != 1:
        raise DirectionMismatchError(
            f"a direction must be a d_model vector, got shape {tuple(vector.shape)}"
        )
    return vector / vector.norm().clamp_min(1e-12) if unit == "unit" else vector


def addition(
    directions: DirectionSet | Tensor,
    *,
    layer: int | None = None,
    alpha: Alpha = 1.0,
    site: str = "resid_pre",
    unit: Literal["raw", "unit"] = "raw",
    apply_to: str | None = None,
    at_layers: Sequence[int] | None = None,
    token: str | int | None = None,
    **deprecated: Any,
) -> Addition:
    """Activation addition of the direction of ``layer`` (read at ``token``, default the set's
    last label), added at ``at_layers`` (default: ``layer`` itself) to the ``apply_to``
    positions (default all)."""
    if layer is not None and not isinstance(layer, int):
        # The old form: a list of layers to act at, with the direction of the first (or of
        # direction_layer=).
        warnings.warn(
            "addition(layer=[...]) is deprecated: use layer= (whose direction) and at_layers= (where)",
            DeprecationWarning, stacklevel=2,
        )
        if at_layers is not None:
            raise ConfigError("addition() got a list as layer= and at_layers=: use at_layers= for where")
        at_layers, layer = tuple(int(x) for x in layer), None
    names = {"direction_layer": "layer", "position": "token", "positions": "apply_to"}
    given = renamed(deprecated, "addition", names, {"layer": layer, "token": token, "apply_to": apply_to})
    layer, token, apply_to = given["layer"], given["token"], given["apply_to"] or "all"
    check_site(site)
    if layer is None:
        if not at_layers:
            raise ConfigError("addition needs layer= (whose direction)")
        layer = int(at_layers[0])
    where = (int(layer),) if at_layers is None else tuple(int(x) for x in at_layers)
    if not where:
        raise ConfigError("addition needs at least one layer in at_layers")
    if unit not in ("raw", "unit"):
        raise ConfigError(f"unknown unit {unit!r}: choose raw or unit")
    vector = _direction_vector(directions, int(layer), token, unit)
    return Addition(
        vector=vector.float(),
        at_layers=where,
        alpha=_as_alpha(alpha),
        site=site,
        apply_to=_check_positions(apply_to),
    )


def ablation(
    directions: DirectionSet | Subspace | Tensor,
    *,
    layer: int | None = None,
    token: str | int | None = None,
    at_layers: Sequence[int] | None = None,
    mode: Literal["stream", "weights"] = "stream",
    apply_to: str | None = None,
    alpha: Alpha | None = None,
    **deprecated: Any,
) -> Ablation:
    """Directional ablation of one direction at every layer (or at ``at_layers``).

    With a DirectionSet, ``layer`` names whose direction is ablated (and ``token`` its label);
    with a :class:`~refusal_dir.subspace.Subspace`, whose ``k``-dimensional basis.
    ``alpha`` (one value or one per row) scales the ablation; 1 removes the component.
    """
    return clamp(directions, value=0.0, layer=layer, token=token, at_layers=at_layers, mode=mode,
                 apply_to=apply_to, alpha=alpha, _function="ablation", **deprecated)


def clamp(
    directions: DirectionSet | Subspace | Tensor,
    *,
    value: Alpha,
    layer: int | None = None,
    token: str | int | None = None,
    at_layers: Sequence[int] | None = None,
    mode: Literal["stream", "weights"] = "stream",
    apply_to: str | None = None,
    alpha: Alpha | None = None,
    _function: str = "clamp",
    **deprecated: Any,
) -> Ablation:
    """Set the residual stream's component along the direction to ``value`` everywhere
    (``alpha`` interpolates, as in :class:`Ablation`)."""
    names = {
        "direction_layer": "layer", "position": "token", "positions": "apply_to",
        "layers": "at_layers", "strength": "alpha",
    }
    given = renamed(
        deprecated, _function, names,
        {"layer": layer, "token": token, "apply_to": apply_to, "at_layers": at_layers, "alpha": alpha},
    )
    layer, token, at_layers = given["layer"], given["token"], given["at_layers"]
    apply_to = given["apply_to"] or "all"
    alpha = 1.0 if given["alpha"] is None else given["alpha"]
    if mode not in ("stream", "weights"):
        raise ConfigError(f"unknown ablation mode {mode!r}: choose stream or weights")
    if isinstance(directions, (DirectionSet, Subspace)) and layer is None:
        raise ConfigError(f"{_function} with a {type(directions).__name__} needs layer= (whose direction)")
    basis = None
    if isinstance(directions, Subspace):
        rows = directions.basis(layer, token).float()  # type: ignore[arg-type]
        unit_vector, basis = rows[0], (rows if len(rows) > 1 else None)
        if basis is not None and not (isinstance(value, (int, float)) and float(value) == 0.0):
            raise ConfigError(f"{_function} of a subspace sets no value: ablate it (value 0), or clamp one direction")
    elif isinstance(directions, Tensor) and directions.ndim == 2:
        # One direction per row: a batch compares several directions in one pass.
        if mode != "stream":
            raise ConfigError("one direction per row needs mode='stream'")
        rows = directions.float()
        unit_vector = rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    else:
        unit_vector = _direction_vector(directions, layer or 0, token, "unit")
    target = _as_alpha(value)
    if mode == "weights" and not (isinstance(target, float) and target == 0.0):
        raise ConfigError("mode='weights' supports ablation (value 0) only: use mode='stream'")
    return Ablation(
        unit=unit_vector.float(),
        at_layers=None if at_layers is None else tuple(int(x) for x in at_layers),
        value=target,
        alpha=_as_alpha(alpha),
        mode=mode,
        apply_to=_check_positions(apply_to),
        basis=basis,
    )


_PER_ROW_FIELDS = {Addition: ("alpha",), Ablation: ("value", "alpha")}


def _per_row(intervention: RowIntervention) -> dict[str, Tensor]:
    if hasattr(intervention, "per_row"):  # refusal_dir.abliteration.KernelAblation
        return intervention.per_row()
    names = _PER_ROW_FIELDS[type(intervention)]
    fields = {name: getattr(intervention, name) for name in names if isinstance(getattr(intervention, name), Tensor)}
    if isinstance(intervention, Ablation) and intervention.unit.ndim == 2:
        fields["unit"] = intervention.unit
    return fields


def check_rows(interventions: Sequence[RowIntervention], n_rows: int) -> None:
    """Raise ConfigError unless every per-row coefficient list has exactly ``n_rows`` values."""
    for intervention in interventions:
        for name, values in _per_row(intervention).items():
            if values.shape[0] != n_rows:
                raise ConfigError(
                    f"{values.shape[0]} per-row values of {name} for {n_rows} prompts: give one "
                    "value per prompt"
                )


def row_groups(interventions: Sequence[RowIntervention], rows: slice, n_rows: int) -> tuple[Tensor, Tensor]:
    """The rows of one batch that every intervention treats alike (equal per-row values in all
    of them): ``(first, group)``, the index among all ``n_rows`` rows of each group's first row
    and each batch row's group. Without per-row values the whole batch is one group."""
    indices = torch.arange(n_rows)[rows]
    columns = [
        values.detach()[rows].reshape(len(indices), -1).float().cpu()
        for intervention in interventions
        for values in _per_row(intervention).values()
    ]
    if not columns:
        return indices[:1], torch.zeros(len(indices), dtype=torch.long)
    _, group = torch.unique(torch.cat(columns, dim=1), dim=0, return_inverse=True)
    n_groups = int(group.max()) + 1
    first = torch.full((n_groups,), len(indices), dtype=torch.long).scatter_reduce(
        0, group, torch.arange(len(indices)), reduce="amin"
    )
    return indices[first], group


def repeat_rows(interventions: Sequence[_Rows], counts: Sequence[int]) -> list[_Rows]:
    """Repeat per-row coefficients so that row ``i`` covers ``counts[i]`` consecutive rows."""
    check_rows(interventions, len(counts))
    repeats = torch.tensor(list(counts))
    return [
        replace(intervention, **{name: values.repeat_interleave(repeats, dim=0) for name, values in _per_row(intervention).items()})  # type: ignore[arg-type]
        for intervention in interventions
    ]


# ----------------------------------------------------------------------------------------------
# The maths, shared by the fast path and the bridge
# ----------------------------------------------------------------------------------------------


class _OnDevice:
    """A tensor converted to an activation's device and dtype once, not on every forward pass.

    A hook runs on every decode step; converting a CPU vector there would copy it host-to-device
    at every hook and step on a GPU (a synchronising copy per hook, 37 per step for an ablation
    on an 18-layer model).
    """

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor
        self._copies: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def like(self, act: Tensor) -> Tensor:
        key = (act.device, act.dtype)
        copy = self._copies.get(key)
        if copy is None:
            copy = self._copies[key] = self.tensor.to(device=act.device, dtype=act.dtype)
        return copy


Coefficient = float | _OnDevice


def _coefficient(value: float | Tensor) -> Coefficient:
    return value if isinstance(value, float) else _OnDevice(value)


def _rows(value: Coefficient, state: PositionState, act: Tensor) -> float | Tensor:
    """The coefficient of each row of ``act`` as ``batch x 1 x 1`` (a float stays a float)."""
    if isinstance(value, float):
        return value
    selected = value.like(act)[state.row_index(act.device)]
    batch = act.shape[0]
    if selected.numel() != batch:
        raise ConfigError(
            f"{value.tensor.numel()} per-row coefficients do not fit a batch of {batch} rows: "
            "give one coefficient per prompt"
        )
    return selected.view(batch, 1, 1)


def _apply_addition(act: Tensor, vector: _OnDevice, alpha: Coefficient, mask: Tensor | None, state: PositionState) -> Tensor:
    delta = _rows(alpha, state, act) * vector.like(act)
    if mask is not None:
        delta = delta * mask.to(act.dtype)
    return act + delta


def _apply_projection(
    act: Tensor,
    unit: _OnDevice,
    value: Coefficient,
    strength: Coefficient,
    mask: Tensor | None,
    state: PositionState,
) -> Tensor:
    direction = unit.like(act)
    if direction.ndim == 2:  # one direction per row
        direction = direction[state.row_index(act.device)]
        if direction.shape[0] != act.shape[0]:
            raise ConfigError(
                f"{unit.tensor.shape[0]} per-row directions do not fit a batch of {act.shape[0]} "
                "rows: give one direction per prompt"
            )
        direction = direction.unsqueeze(1)
        component = (act * direction).sum(-1, keepdim=True)
    else:
        component = (act @ direction).unsqueeze(-1)
    delta = _rows(strength, state, act) * (_rows(value, state, act) - component) * direction
    if mask is not None:
        delta = delta * mask.to(act.dtype)
    return act + delta


# ----------------------------------------------------------------------------------------------
# Placement on the plain transformers modules (the fast path)
# ----------------------------------------------------------------------------------------------

Edit = Callable[[Tensor], Tensor]


def _replace_output(output: Any, new: Tensor) -> Any:
    if isinstance(output, tuple):
        return (new, *output[1:])
    return new


def _output_tensor(output: Any) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


class _Scope:
    """Registers forward hooks and remembers their handles."""

    def __init__(self) -> None:
        self.handles: list[Any] = []

    def on_input(self, module: nn.Module, edit: Edit) -> None:
        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> Any:
            if args and isinstance(args[0], Tensor):
                return (edit(args[0]), *args[1:]), kwargs
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = edit(kwargs["hidden_states"])
            return args, kwargs

        self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def on_output(self, module: nn.Module, edit: Edit) -> None:
        def hook(mod: nn.Module, args: tuple, output: Any) -> Any:
            return _replace_output(output, edit(_output_tensor(output)))

        self.handles.append(module.register_forward_hook(hook))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def _edit_for(intervention: Intervention, unit_or_vector: Tensor, state: PositionState) -> Edit:
    vector = _OnDevice(unit_or_vector)
    if isinstance(intervention, Addition):
        alpha = _coefficient(intervention.alpha)

        def add(act: Tensor) -> Tensor:
            mask = state.mask(act.shape[1], intervention.apply_to, act.device)
            return _apply_addition(act, vector, alpha, mask, state)

        return add

    value, strength = _coefficient(intervention.value), _coefficient(intervention.alpha)

    def project(act: Tensor) -> Tensor:
        mask = state.mask(act.shape[1], intervention.apply_to, act.device)
        return _apply_projection(act, vector, value, strength, mask, state)

    return project


def _ablation_edit(intervention: Ablation, unit: Tensor, basis: Tensor | None, state: PositionState) -> Edit:
    """The edit of ``unit``, or of every row of ``basis`` in turn. The rows are orthonormal, so
    moving each row's component in turn moves the subspace's (one row's edit leaves the others'
    components alone); one row is exactly the single-direction edit."""
    if basis is None:
        return _edit_for(intervention, unit, state)
    edits = [_edit_for(intervention, row, state) for row in basis]

    def project(act: Tensor) -> Tensor:
        for edit in edits:
            act = edit(act)
        return act

    return project


def _writes_of(intervention: Ablation) -> Ablation:
    """The same ablation with value 0: applied to what blocks write into the stream."""
    return replace(intervention, value=0.0)


def _place(model: HookedModel, intervention: Intervention, scope: _Scope, state: PositionState) -> None:
    if hasattr(intervention, "place_on"):  # refusal_dir.abliteration.KernelAblation places itself
        intervention.place_on(model, scope, state)
        return
    if isinstance(intervention, Addition):
        edit = _edit_for(intervention, intervention.vector, state)
        for layer in intervention.at_layers:
            check_layer(layer, model.n_layers)
            block = model.layers[layer]
            if intervention.site == "resid_pre":
                scope.on_input(block, edit)
            else:
                scope.on_output(block, edit)
        return
    if intervention.unit.ndim == 2 and intervention.mode != "stream":
        raise ConfigError("one direction per row needs mode='stream'")
    if intervention.unit.shape[-1] != model.d_model:
        raise DirectionMismatchError(
            f"the direction has d_model {intervention.unit.shape[-1]} but the model has "
            f"{model.d_model}: extract directions for this model"
        )
    candidate_layers = range(model.n_layers) if intervention.at_layers is None else intervention.at_layers
    layers = [check_layer(layer, model.n_layers) for layer in candidate_layers]
    architecture = model.architecture
    for layer in layers:
        block = model.layers[layer]
        if intervention.mode == "stream":
            # The stream entering the first layer is moved to the value; what each block writes
            # is then moved towards zero along the direction, so every later resid_pre, resid_mid
            # and resid_post holds (1 - s) * original + s * value (no compounding across layers).
            if layer == layers[0]:
                scope.on_input(block, _ablation_edit(intervention, intervention.unit, intervention.basis, state))
            write_edit = _ablation_edit(_writes_of(intervention), intervention.unit, intervention.basis, state)
            for kind in WRITE_KINDS:
                scope.on_output(architecture.stream_write(block, kind), write_edit)
        else:
            for kind in WRITE_KINDS:
                unit = weights_mode_unit(architecture, block, kind, intervention.unit)
                basis = None if intervention.basis is None else weights_mode_basis(architecture, block, kind, intervention.basis)
                scope.on_output(architecture.block_output(block, kind), _ablation_edit(intervention, unit, basis, state))


def _place_embedding_edit(model: HookedModel, intervention: Intervention, scope: _Scope, state: PositionState) -> None:
    """The embedding part of a ``mode="weights"`` ablation, as an edit of the first block's input.

    The input of the first block is the embedding output (times a scalar on Gemma), so removing
    the component there equals removing it from the embedding matrix. It is placed right after
    the position tracker and before every other intervention's edits, as the embedding itself
    would come first, and so it sees the current pass's offset (an embedding hook would run
    before the tracker).
    """
    if (
        isinstance(intervention, Ablation)
        and intervention.mode == "weights"
        and (intervention.at_layers is None or 0 in intervention.at_layers)
    ):
        scope.on_input(model.layers[0], _ablation_edit(intervention, intervention.unit, intervention.basis, state))


def weights_mode_unit(
    architecture: Architecture, block: nn.Module, kind: WriteKind, unit: Tensor
) -> Tensor:
    """The direction to remove from a block's ``kind`` write, before its post-norm if any
    (``unit``: ``d_model``, or any batch of them ``... x d_model``).

    Without a post-norm it is ``unit`` itself. With one, it is ``unit`` rescaled by the norm's
    gain: the norm's output then has no ``unit`` component (the norm divides by one number per
    position and multiplies by the gain elementwise).
    """
    norm = architecture.post_norm(block, kind)
    if norm is None:
        return unit
    scaled = architecture.norm_gain(norm).to(unit.device) * unit.float()
    return scaled / scaled.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def weights_mode_basis(
    architecture: Architecture, block: nn.Module, kind: WriteKind, basis: Tensor
) -> Tensor:
    """A subspace's ``k x d_model`` basis to remove before a post-norm: every row rescaled by the
    gain (:func:`weights_mode_unit`), then orthonormalized in order (rescaling breaks
    orthogonality; the span is what the norm's output must not reach). Row 0 stays
    :func:`weights_mode_unit` of the first direction, bit for bit."""
    rows = torch.stack([weights_mode_unit(architecture, block, kind, row) for row in basis])
    return orthonormal_rows(rows)


def _hidden_states(args: tuple, kwargs: dict) -> Tensor:
    """The hidden states a decoder block receives (its first positional argument, or by name)."""
    if args and isinstance(args[0], Tensor):
        return args[0]
    return kwargs["hidden_states"]


def _track_positions(state: PositionState) -> Callable[..., None]:
    """A pre-hook on the first decoder block: one :meth:`PositionState.advance` per pass."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        state.advance(int(_hidden_states(args, kwargs).shape[1]))

    return hook


@contextmanager
def steer(
    model: HookedModel,
    *interventions: Intervention,
    state: PositionState | None = None,
) -> Iterator[PositionState]:
    """Apply interventions to ``model.hf`` inside the block; every hook is removed afterwards.

    Yields the :class:`PositionState` that generation code updates (prompt length, rows).
    """
    state = state or PositionState()
    scope = _Scope()
    try:
        # Registered first, so the state is current before any edit of the first block runs.
        scope.handles.append(
            model.layers[0].register_forward_pre_hook(_track_positions(state), with_kwargs=True)
        )
        for intervention in interventions:
            _place_embedding_edit(model, intervention, scope, state)
        for intervention in interventions:
            _place(model, intervention, scope, state)
        yield state
    finally:
        scope.remove()


# ----------------------------------------------------------------------------------------------
# The same interventions as TransformerLens hooks on the bridge
# ----------------------------------------------------------------------------------------------


def bridge_hooks(
    model: HookedModel, *interventions: Intervention, state: PositionState | None = None
) -> list[tuple[str, Callable[..., Tensor]]]:
    """``(hook_name, fn)`` pairs for ``model.bridge.hooks(fwd_hooks=...)``.

    The first pair tracks positions exactly as :func:`steer` does on the fast path (one
    :meth:`PositionState.advance` per forward pass, at the first block's ``resid_pre``), so the
    position rules hold under TransformerLens' KV-cached ``generate`` too. For generation, call
    ``state.start(rows, prompt_length)`` before each batch (or pass a new ``PositionState``):
    it also resets the position count, without which a reused state takes the next batch's
    prefill, when no wider than what it has seen, for a decode step.
    """
    state = state or PositionState()

    def track(act: Tensor, hook: Any) -> Tensor:
        state.advance(int(act.shape[1]))
        return act

    hooks: list[tuple[str, Callable[..., Tensor]]] = [(hook_name("resid_pre", 0), track)]

    def as_hook(edit: Edit) -> Callable[..., Tensor]:
        """TransformerLens calls hooks with ``(activation, hook)``."""

        def fn(act: Tensor, hook: Any) -> Tensor:
            return edit(act)

        return fn

    for intervention in interventions:
        if hasattr(intervention, "place_on"):
            raise ConfigError(
                "a kernel ablation runs on the fast path (steer(model, ...)), not as bridge hooks"
            )
        if isinstance(intervention, Addition):
            edit = _edit_for(intervention, intervention.vector, state)
            hooks += [(hook_name(intervention.site, layer), as_hook(edit)) for layer in intervention.at_layers]
            continue
        if intervention.mode != "stream":
            raise ConfigError("bridge hooks support mode='stream' ablation only")
        stream_edit = as_hook(_ablation_edit(intervention, intervention.unit, intervention.basis, state))
        write_edit = as_hook(_ablation_edit(_writes_of(intervention), intervention.unit, intervention.basis, state))
        layers = list(range(model.n_layers)) if intervention.at_layers is None else list(intervention.at_layers)
        for layer in layers:
            if layer == layers[0]:
                hooks.append((hook_name("resid_pre", layer), stream_edit))
            hooks += [(hook_name(site, layer), write_edit) for site in ("attn_out", "mlp_out")]
    return hooks
