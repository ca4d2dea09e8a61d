"""A tuned ablation point on disk: what ``tune --objective remove`` writes, ``export --from-tune`` reads.

A tune output directory holds, besides its reports:

* ``ablation.json``: the model it was tuned on, the chosen :class:`AblationPoint`, the
  :class:`AblationOptions` it was measured with, and a checksum of itself and of the files below;
* ``directions/``: the direction set the point's directions come from (a copy, so the export does
  not depend on the extraction directory still being there or unchanged);
* ``harmless_means.safetensors``: the harmless means the directions were projected against
  (present when ``options.projected``).

:func:`read_tuned` gives back exactly what :func:`write_tuned` wrote or one line naming what is
wrong; the point then bakes with :func:`refusal_dir.abliteration.weight_edits` equal to the run-time
edit the tuner measured.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import Tensor

from refusal_dir.abliteration import AblationOptions, AblationPoint
from refusal_dir.directions import META_FILE, TENSORS_FILE, DirectionSet
from refusal_dir.errors import ConfigError, DirectionMismatchError
from refusal_dir.outdir import atomic_write_bytes

ABLATION_FILE = "ablation.json"
MEANS_FILE = "harmless_means.safetensors"
DIRECTIONS_DIR = "directions"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class TunedAblation:
    """One tuned point with everything needed to reproduce it on the model it was tuned on."""

    model: str
    point: AblationPoint
    options: AblationOptions
    directions: DirectionSet
    harmless_means: Tensor | None = None

    def __post_init__(self) -> None:
        if self.options.projected and self.harmless_means is None:
            raise ConfigError("a projected ablation point needs the harmless means it was projected against")


def _digest(directory: Path, names: list[str], fields: dict[str, Any]) -> str:
    """Of the JSON fields (sorted) and of the named files, so editing either is seen."""
    sha = hashlib.sha256(json.dumps(fields, sort_keys=True).encode())
    for name in names:
        sha.update(name.encode())
        sha.update((directory / name).read_bytes())
    return sha.hexdigest()


def _covered(options: AblationOptions) -> list[str]:
    names = [f"{DIRECTIONS_DIR}/{TENSORS_FILE}", f"{DIRECTIONS_DIR}/{META_FILE}"]
    return [*names, MEANS_FILE] if options.projected else names


def write_tuned(directory: str | Path, tuned: TunedAblation) -> Path:
    """Write the three parts into ``directory`` (which the caller owns); ``ablation.json`` last."""
    directory = Path(directory)
    tuned.directions.save(directory / DIRECTIONS_DIR)
    if tuned.options.projected:
        assert tuned.harmless_means is not None  # __post_init__
        atomic_write_bytes(directory / MEANS_FILE, save({"means": tuned.harmless_means.contiguous().float()}))
    payload: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "model": tuned.model,
        "point": tuned.point.to_dict(),
        "options": asdict(tuned.options),
    }
    payload["sha256"] = _digest(directory, _covered(tuned.options), payload)
    atomic_write_bytes(directory / ABLATION_FILE, json.dumps(payload, indent=2).encode())
    return directory / ABLATION_FILE


def _options(raw: Any) -> AblationOptions:
    if not isinstance(raw, dict) or set(raw) != {"projected", "norm_preserving", "token"}:
        raise ConfigError(f"ablation options must have exactly projected, norm_preserving and token, got {raw!r}")
    if not isinstance(raw["projected"], bool) or not isinstance(raw["norm_preserving"], bool):
        raise ConfigError("ablation options projected and norm_preserving must be true or false")
    if raw["token"] is not None and not isinstance(raw["token"], (str, int)):
        raise ConfigError(f"ablation option token must be a label, an index or null, got {raw['token']!r}")
    return AblationOptions(raw["projected"], raw["norm_preserving"], raw["token"])


def read_tuned(directory: str | Path) -> TunedAblation:
    """The point :func:`write_tuned` wrote into ``directory``, checked against its checksum."""
    directory = Path(directory)
    path = directory / ABLATION_FILE
    hint = "pass the --output-dir of `refusal-dir tune --objective remove`"
    if not path.is_file():
        raise ConfigError(f"{directory} holds no tuned ablation point ({ABLATION_FILE} missing): {hint}")
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
        if not isinstance(raw, dict) or raw.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format_version {raw.get('format_version') if isinstance(raw, dict) else None!r}")
        options = _options(raw.get("options"))
        point = AblationPoint.from_dict(raw.get("point"))
        model = raw.get("model")
        if not isinstance(model, str) or not model:
            raise ValueError("no model name")
        fields = {key: value for key, value in raw.items() if key != "sha256"}
        if raw.get("sha256") != _digest(directory, _covered(options), fields):
            raise ValueError("checksum mismatch: a file was changed after tune wrote it")
    except FileNotFoundError as error:
        raise ConfigError(f"{path} names a file that is missing ({Path(error.filename).name}): {hint}") from error
    except (ValueError, TypeError, OSError) as error:
        raise ConfigError(f"{path} is not a usable tuned point ({str(error).splitlines()[0][:160]}): {hint}") from error
    directions = DirectionSet.load(directory / DIRECTIONS_DIR)
    means = None
    if options.projected:
        try:
            means = load((directory / MEANS_FILE).read_bytes())["means"]
        except (SafetensorError, KeyError, OSError) as error:
            raise DirectionMismatchError(f"{directory / MEANS_FILE} is unreadable ({error}): {hint}") from error
    return TunedAblation(model, point, options, directions, means)
