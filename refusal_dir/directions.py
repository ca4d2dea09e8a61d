"""Directions per layer from contrastive activations, and the portable DirectionSet file format.

Methods (a registry; a config names one):

* ``mean_diff``: ``mean(positive) - mean(negative)`` per layer, accumulated in float64;
* ``pca``: first principal component of the paired differences ``positive_i - negative_i``
  (uncentred, as in RepE), sign aligned with the mean difference;
* ``probe``: the weight vector of a logistic-regression probe (scikit-learn) separating positive
  from negative activations, sign aligned with the mean difference.

Every direction is stored as a unit vector. ``norms`` keeps the length of the mean-difference
vector *projected on that unit direction*, so ``alpha * norms[l] * directions[l]`` with
``alpha = 1`` moves a negative-class activation to the positive-class mean along the direction,
whatever the method (the seed's "raw mean difference" unit of the steering coefficient).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import Tensor

from refusal_dir.activations import ActivationReader
from refusal_dir.errors import ConfigError, DataError, DirectionMismatchError, OutputDirError
from refusal_dir.fingerprint import ReadElements as ReadElements
from refusal_dir.fingerprint import same_weights as same_weights
from refusal_dir.fingerprint import weights_fingerprint as weights_fingerprint
from refusal_dir.fingerprint import weights_sample as weights_sample
from refusal_dir.outdir import atomic_write_bytes

logger = logging.getLogger(__name__)

PairActs = Float[Tensor, "n d_model"]
Direction = Float[Tensor, " d_model"]

FORMAT_VERSION = 1
TENSORS_FILE = "directions.safetensors"
META_FILE = "directions.json"
#: Largest raw norm a direction file may hold (residual-stream mean differences are far smaller).
MAX_NORM = 1e6


def _package_version() -> str:
    from refusal_dir import __version__

    return __version__


# ----------------------------------------------------------------------------------------------
# Methods: one layer's positive and negative activations in, one (unnormalized) direction out
# ----------------------------------------------------------------------------------------------


def mean_diff(positive: PairActs, negative: PairActs) -> Direction:
    """Difference of class means, computed in float64."""
    return positive.to(torch.float64).mean(dim=0) - negative.to(torch.float64).mean(dim=0)


def pca_diff(positive: PairActs, negative: PairActs) -> Direction:
    """First right-singular vector of the paired differences, oriented like the mean difference."""
    if positive.shape != negative.shape:
        raise DataError(
            "pca needs matched pairs: got "
            f"{positive.shape[0]} positive and {negative.shape[0]} negative prompts"
        )
    differences = positive.to(torch.float64) - negative.to(torch.float64)
    _, _, vh = torch.linalg.svd(differences, full_matrices=False)
    component = vh[0]
    return component if float(component @ differences.mean(dim=0)) >= 0 else -component


def probe_direction(positive: PairActs, negative: PairActs, *, seed: int = 0) -> Direction:
    """Weights of an L2-regularized logistic-regression probe on standardized features."""
    from sklearn.linear_model import LogisticRegression

    features = torch.cat([positive, negative]).to(torch.float64)
    labels = [1] * len(positive) + [0] * len(negative)
    scale = features.std(dim=0).clamp_min(1e-8)
    center = features.mean(dim=0)
    probe = LogisticRegression(C=1.0, max_iter=2000, random_state=seed)
    probe.fit(((features - center) / scale).numpy(), labels)
    # Undo the standardization so the weights live in activation space.
    weights = torch.as_tensor(probe.coef_[0], dtype=torch.float64) / scale
    return weights if float(weights @ mean_diff(positive, negative)) >= 0 else -weights


METHODS: dict[str, Callable[[PairActs, PairActs], Direction]] = {
    "mean_diff": mean_diff,
    "pca": pca_diff,
    "probe": probe_direction,
}


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    return method


# ----------------------------------------------------------------------------------------------
# DirectionSet
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DirectionMeta:
    """What a direction file was made from, and for which model."""

    model_id: str
    model_revision: str | None
    d_model: int
    n_layers: int
    site: str
    position: str
    positions: tuple[str, ...]
    method: str
    prompt_set_hash: str
    package_version: str
    name: str = "refusal"
    created: str = ""
    format_version: int = FORMAT_VERSION
    weights_sample: tuple[float, ...] = ()
    """A few weights of the model, spread over its matrices (:func:`weights_sample`)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "positions", tuple(self.positions))
        object.__setattr__(self, "weights_sample", tuple(float(x) for x in self.weights_sample))


_META_TYPES: dict[str, tuple[type, ...]] = {
    "model_id": (str,),
    "model_revision": (str, type(None)),
    "d_model": (int,),
    "n_layers": (int,),
    "site": (str,),
    "position": (str,),
    "positions": (list,),
    "method": (str,),
    "prompt_set_hash": (str,),
    "package_version": (str,),
    "name": (str,),
    "created": (str,),
    "format_version": (int,),
    "weights_sample": (list,),
}


def _meta_from_json(raw: Any) -> DirectionMeta:
    """A DirectionMeta from parsed JSON, every field type-checked (TypeError names the field)."""
    if not isinstance(raw, dict):
        raise TypeError(f"expected a JSON object, got {type(raw).__name__}")
    for name, value in raw.items():
        allowed = _META_TYPES.get(name)
        if allowed is None:
            raise TypeError(f"unknown field {name!r}")
        if isinstance(value, bool) or not isinstance(value, allowed):
            raise TypeError(f"field {name!r} has the wrong type ({type(value).__name__})")
    positions = raw.get("positions", [])
    if not positions or not all(isinstance(p, str) for p in positions):
        raise TypeError("field 'positions' must be a non-empty list of names")
    sample = raw.get("weights_sample", [])
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in sample):
        raise TypeError("field 'weights_sample' must be a list of finite numbers")
    if raw.get("d_model", 0) < 1 or raw.get("n_layers", 0) < 1:
        raise TypeError("fields 'd_model' and 'n_layers' must be >= 1")
    return DirectionMeta(**raw)


@dataclass(frozen=True)
class DirectionSet:
    """Unit directions per (position, layer) with their raw norms and metadata.

    ``directions`` is ``positions x layers x d_model`` (unit vectors, float32) and ``norms`` is
    ``positions x layers``. ``vector(layer)`` is ``norms * direction``: the coefficient unit
    ("alpha = 1 moves a negative activation to the positive mean along the direction").

    DirectionSets support arithmetic on their raw vectors: ``2 * d``, ``-d``, ``d - e``.
    """

    directions: Float[Tensor, "positions layers d_model"]
    norms: Float[Tensor, "positions layers"]
    meta: DirectionMeta

    def __post_init__(self) -> None:
        if self.directions.ndim != 3 or self.norms.shape != self.directions.shape[:2]:
            raise DirectionMismatchError(
                f"directions must be positions x layers x d_model with norms positions x layers; "
                f"got {tuple(self.directions.shape)} and {tuple(self.norms.shape)}"
            )
        if self.directions.shape[1:] != (self.meta.n_layers, self.meta.d_model):
            raise DirectionMismatchError(
                f"direction tensor {tuple(self.directions.shape)} does not match the metadata "
                f"(n_layers={self.meta.n_layers}, d_model={self.meta.d_model})"
            )

    # -- access --------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.meta.n_layers

    @property
    def d_model(self) -> int:
        return self.meta.d_model

    def position_index(self, position: str | int | None) -> int:
        if position is None:
            return len(self.meta.positions) - 1
        if isinstance(position, int):
            if not -len(self.meta.positions) <= position < len(self.meta.positions):
                raise ConfigError(
                    f"position index {position} is out of range: this set has positions "
                    f"{', '.join(self.meta.positions)}"
                )
            return position % len(self.meta.positions)
        if position not in self.meta.positions:
            raise ConfigError(
                f"position {position!r} is not in this direction set: it has "
                f"{', '.join(self.meta.positions)}"
            )
        return self.meta.positions.index(position)

    def unit(self, layer: int, position: str | int | None = None) -> Direction:
        """The unit direction at ``layer`` (and position; default: the last one)."""
        self._check_layer(layer)
        return self.directions[self.position_index(position), layer]

    def norm(self, layer: int, position: str | int | None = None) -> float:
        self._check_layer(layer)
        return float(self.norms[self.position_index(position), layer])

    def vector(self, layer: int, position: str | int | None = None) -> Direction:
        """The raw vector ``norm * unit`` at ``layer``."""
        return self.unit(layer, position) * self.norm(layer, position)

    def _check_layer(self, layer: int) -> None:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise ConfigError(
                f"layer {layer!r} is not in this direction set: it has layers 0..{self.n_layers - 1}"
            )

    # -- arithmetic on raw vectors ---------------------------------------------------------------
    def _raw(self) -> Tensor:
        return self.directions * self.norms.unsqueeze(-1)

    @classmethod
    def from_raw(cls, raw: Tensor, meta: DirectionMeta) -> DirectionSet:
        norms = raw.norm(dim=-1)
        # A zero vector stays zero; any other is divided by its own norm (exactly unit length).
        safe = torch.where(norms > 0, norms, torch.ones_like(norms)).unsqueeze(-1)
        units = torch.where((norms > 0).unsqueeze(-1), raw / safe, torch.zeros_like(raw))
        return cls(units.float(), norms.float(), meta)

    def __mul__(self, factor: float) -> DirectionSet:
        return DirectionSet.from_raw(self._raw() * float(factor), self.meta)

    __rmul__ = __mul__

    def __neg__(self) -> DirectionSet:
        return self * -1.0

    def __add__(self, other: DirectionSet) -> DirectionSet:
        self._check_compatible(other)
        return DirectionSet.from_raw(self._raw() + other._raw(), self.meta)

    def __sub__(self, other: DirectionSet) -> DirectionSet:
        return self + (-other)

    def _check_compatible(self, other: DirectionSet) -> None:
        if self.directions.shape != other.directions.shape:
            raise DirectionMismatchError(
                f"cannot combine direction sets of shapes {tuple(self.directions.shape)} and "
                f"{tuple(other.directions.shape)}"
            )

    # -- compatibility ---------------------------------------------------------------------------
    def check_fits(self, model: Any, *, read: ReadElements | None = None) -> None:
        """Raise DirectionMismatchError unless this set was made for this model.

        Checks the shape and, when the set recorded one, the sample of the weights it was
        extracted from (same-shape directions of another model, or of another fine-tune, are
        refused; another dtype of the same checkpoint is accepted). ``read``: as
        :func:`weights_sample`'s.
        """
        problems = []
        if model.d_model != self.d_model:
            problems.append(f"d_model {self.d_model} vs the model's {model.d_model}")
        if model.n_layers != self.n_layers:
            problems.append(f"{self.n_layers} layers vs the model's {model.n_layers}")
        if not problems and self.meta.weights_sample:
            current = weights_sample(model, read=read)
            if current and not same_weights(self.meta.weights_sample, current):
                problems.append("same shape, but other weights")
        if problems:
            raise DirectionMismatchError(
                f"these directions were made for {self.meta.model_id!r} and do not fit "
                f"{model.model_id!r} ({'; '.join(problems)}): extract directions for this model "
                "with `refusal-dir extract`"
            )
        if not self.meta.weights_sample:
            logger.warning(
                "direction set made for %r records no weights sample (an older file): "
                "cannot check that it belongs to %r", self.meta.model_id, model.model_id,
            )

    def check_values(self) -> None:
        """Raise DirectionMismatchError unless every direction is finite and unit (or zero)
        and every norm finite, >= 0 and at most :data:`MAX_NORM`."""
        where = f"direction set {self.meta.name!r} for {self.meta.model_id!r}"
        if not bool(torch.isfinite(self.directions).all()) or not bool(torch.isfinite(self.norms).all()):
            raise DirectionMismatchError(f"{where} holds NaN or infinite values: re-run `refusal-dir extract`")
        if bool((self.norms < -1e-4).any()) or bool((self.norms > MAX_NORM).any()):
            raise DirectionMismatchError(
                f"{where} holds norms outside [0, {MAX_NORM:g}] (largest {float(self.norms.abs().max()):.3g}): "
                "re-run `refusal-dir extract`"
            )
        lengths = self.directions.double().norm(dim=-1)
        bad = ~((lengths - 1).abs() <= 1e-3) & ~(lengths <= 1e-6)
        if bool(bad.any()):
            position, layer = (int(i) for i in bad.nonzero()[0])
            raise DirectionMismatchError(
                f"{where}: the direction at layer {layer}, position "
                f"{self.meta.positions[position]!r} has length {float(lengths[position, layer]):.4g}, "
                "not 1 (directions are stored as unit vectors): re-run `refusal-dir extract`"
            )

    # -- file format -----------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write ``directions.safetensors`` and ``directions.json`` atomically into ``directory``.

        ``directions.json`` is written last and carries a checksum of itself and of the tensor
        file, so a file edited or torn afterwards is refused by :meth:`load`.
        """
        self.check_values()
        directory = Path(directory)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OutputDirError(
                f"cannot write directions to {directory} ({error.strerror or error}): "
                "choose a writable --output-dir"
            ) from error
        tensors = {"directions": self.directions.contiguous(), "norms": self.norms.contiguous()}
        payload = save(tensors, metadata={"format_version": str(FORMAT_VERSION)})
        meta = _meta_to_json(self.meta)
        meta["checksum"] = _checksum(meta, payload)
        atomic_write_bytes(directory / TENSORS_FILE, payload)
        atomic_write_bytes(directory / META_FILE, json.dumps(meta, indent=2).encode())
        return directory

    @classmethod
    def load(cls, directory: str | Path, *, model: Any | None = None) -> DirectionSet:
        """Read a DirectionSet, checking its checksum and values; with ``model``, refuse one
        that does not fit it (:meth:`check_fits`)."""
        directory = Path(directory)
        meta_path, tensor_path = directory / META_FILE, directory / TENSORS_FILE
        if not meta_path.is_file() or not tensor_path.is_file():
            raise DirectionMismatchError(
                f"{directory} holds no direction set ({META_FILE} and {TENSORS_FILE} expected): "
                "pass the directory written by `refusal-dir extract`"
            )
        try:
            payload = tensor_path.read_bytes()
            raw_meta = json.loads(meta_path.read_bytes().decode("utf-8"))
            checksum = raw_meta.pop("checksum", None) if isinstance(raw_meta, dict) else None
            meta = _meta_from_json(raw_meta)
        except (ValueError, TypeError, OSError) as error:  # JSON, UTF-8, field types
            raise DirectionMismatchError(
                f"{meta_path} is corrupt or not a refusal_dir direction file "
                f"({str(error).splitlines()[0][:160]}): re-run `refusal-dir extract`"
            ) from error
        if checksum is not None and checksum != _checksum(raw_meta, payload):
            raise DirectionMismatchError(
                f"{directory} was changed after it was written (checksum mismatch in {META_FILE}): "
                "re-run `refusal-dir extract`"
            )
        try:
            tensors = load(payload)
            directions, norms = tensors["directions"], tensors["norms"]
        except (SafetensorError, KeyError, OSError, ValueError) as error:
            raise DirectionMismatchError(
                f"{tensor_path} is corrupt ({error}): re-run `refusal-dir extract`"
            ) from error
        loaded = cls(directions.float(), norms.float(), meta)
        loaded.check_values()
        if model is not None:
            loaded.check_fits(model)
        return loaded

    def with_meta(self, **changes: Any) -> DirectionSet:
        return replace(self, meta=replace(self.meta, **changes))


def _meta_to_json(meta: DirectionMeta) -> dict[str, Any]:
    record = asdict(meta)
    record["positions"] = list(meta.positions)
    record["weights_sample"] = list(meta.weights_sample)
    return record


def _checksum(meta: dict[str, Any], payload: bytes) -> str:
    """sha256 of the metadata's canonical JSON (without its checksum) and the tensor file."""
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    digest.update(payload)
    return digest.hexdigest()


def prompt_set_hash(*texts: list[str]) -> str:
    """A short stable hash of one or more lists of prompts."""
    digest = hashlib.sha256(json.dumps(texts, ensure_ascii=False).encode()).hexdigest()
    return digest[:16]


def token_rule(labels: Sequence[str]) -> str:
    """The token rule that gives these direction-set labels."""
    if tuple(labels) in (("last",), ("mean",)):
        return labels[0]
    if labels and all(str(label).startswith("post_instruction") for label in labels):
        return "post_instruction"
    raise DataError(f"cannot tell the token rule of the labels {list(labels)}: pass position_rule=")


def compute_directions(
    positive: ActivationReader,
    negative: ActivationReader,
    *,
    site: str = "resid_pre",
    method: str = "mean_diff",
    model: Any,
    position_rule: str | None = None,
    prompt_hash: str = "",
    name: str = "refusal",
) -> DirectionSet:
    """Directions for every (token label, layer) of one site from contrastive activations.

    ``position_rule``: the token rule the activations were collected with (recorded in the
    set); by default read from their labels (``last``, ``mean``, ``post_instruction-k``).

    The activations may be in memory (:class:`~refusal_dir.activations.Activations`) or on disk
    (:class:`~refusal_dir.store.StoredActivations`): the mean difference then comes from float64
    sums streamed over the stored batches (memory flat in the number of prompts); ``pca`` and
    ``probe`` read one (position, layer) column of every prompt at a time."""
    check_method(method)
    if position_rule is None:
        position_rule = token_rule(positive.positions)
    if positive.n_prompts == 0 or negative.n_prompts == 0:
        raise DataError("cannot compute directions from an empty prompt set")
    if method == "pca" and positive.n_prompts != negative.n_prompts:
        raise DataError(
            f"pca needs matched pairs: got {positive.n_prompts} positive and "
            f"{negative.n_prompts} negative prompts"
        )
    if positive.positions != negative.positions or positive.layers != negative.layers:
        raise DataError("positive and negative activations were collected differently")
    n_positions, n_layers = len(positive.positions), model.n_layers
    if len(positive.layers) != n_layers:
        raise DataError("collect activations at every layer before computing directions")
    units = torch.zeros(n_positions, n_layers, model.d_model)
    norms = torch.zeros(n_positions, n_layers)
    for p in range(n_positions):
        for layer in range(n_layers):
            # mean_diff(pos, neg), from each side's own float64 mean (streamed when stored).
            difference = positive.layer_mean(site, p, layer) - negative.layer_mean(site, p, layer)
            if method == "mean_diff":
                raw = difference
            else:
                raw = METHODS[method](positive.column(site, p, layer), negative.column(site, p, layer))
            length = raw.norm()
            unit = raw / length if length > 0 else torch.zeros_like(raw)
            units[p, layer] = unit.float()
            norms[p, layer] = float(difference @ unit)
    meta = DirectionMeta(
        model_id=model.model_id,
        model_revision=model.revision,
        d_model=model.d_model,
        n_layers=n_layers,
        site=site,
        position=position_rule,
        positions=positive.positions,
        method=method,
        prompt_set_hash=prompt_hash,
        package_version=_package_version(),
        name=name,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        weights_sample=weights_sample(model),
    )
    return DirectionSet(units, norms, meta)
