"""Activations on disk: a resumable store, written atomically batch by batch.

For extraction sets too large for memory (100k+ prompts), :func:`collect_to_store` runs the
same batches as :func:`~refusal_dir.activations.collect_activations` and writes each one to
its own file instead of keeping it; what it returns, :class:`StoredActivations`, gives
:func:`~refusal_dir.directions.compute_directions` and
:func:`~refusal_dir.selection.score_layers` what they read, without loading the store:

* the mean of each (site, position, layer) from float64 sums streamed over the batch files,
  so mean-difference directions take memory flat in the number of prompts;
* one (position, layer) column of every prompt at a time (``pca``, ``probe``, layer scores),
  read from the memory-mapped batch files.

Layout (``DIR`` is ``--activation-store``; one folder per prompt set)::

    DIR/.refusal_dir-output           marker: refusal-dir's activation store (outdir rules)
    DIR/<name>/manifest.json          the set's key (below), written first, atomically
    DIR/<name>/batch-000000.safetensors   one file per batch: per site and layer a
                                      rows x positions x d_model float32 tensor, with the
                                      key's digest, the batch's rows and a sha256 of the tensors

The **key** is what the activations depend on: the formatted prompts (a hash, and their
number), the model (id, a fingerprint of its weights, dtype, device type), the sites, layers,
token rule and its position labels, the batch size (left padding makes a prompt's activations
depend on its batch) and the backend. A folder written under another key is refused with one
line. Each batch file is written to a temporary file, fsynced and renamed into place; a batch
is trusted only when its file parses, carries the key's digest and its own rows, and its
tensors hash to the recorded sha256, so a torn, truncated or foreign file is computed again.
A run killed at any point therefore resumes from the batches that were complete and gives
bit-identical activations, directions and scores to a run that was never interrupted (tested).

Directory rules are :mod:`refusal_dir.outdir`'s: a store is a directory refusal-dir marked
(kind ``activations``), locked while written; a folder holding other files is never written
into, and nothing here deletes anything but its own temporary files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from safetensors import SafetensorError, safe_open
from safetensors.torch import load, save
from torch import Tensor
from tqdm.auto import tqdm

from refusal_dir.activations import (
    Activations,
    CollectionPlan,
    SiteActs,
    collect_batch,
    plan_collection,
)
from refusal_dir.directions import weights_fingerprint
from refusal_dir.errors import ConfigError, DataError, OutputDirError
from refusal_dir.model import HookedModel
from refusal_dir.outdir import atomic_write_bytes, check_output_dir, claim_output_dir, write_json
from refusal_dir.sites import RESIDUAL_SITES

logger = logging.getLogger(__name__)

STORE_FORMAT = 1
MANIFEST_NAME = "manifest.json"
FLAG = "--activation-store"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def batch_file(index: int) -> str:
    return f"batch-{index:06d}.safetensors"


def _tensor_name(site: str, layer: int) -> str:
    return f"{site}.{layer}"


# ----------------------------------------------------------------------------------------------
# The key
# ----------------------------------------------------------------------------------------------


def store_key(model: HookedModel, plan: CollectionPlan) -> dict[str, Any]:
    """Everything the stored activations depend on (see the module docstring)."""
    texts = hashlib.sha256(json.dumps(plan.texts, ensure_ascii=False).encode()).hexdigest()[:16]
    return {
        "format": STORE_FORMAT,
        "prompts": texts,
        "n_prompts": len(plan.texts),
        "model": model.model_id,
        "weights": weights_fingerprint(model),
        "dtype": str(model.dtype).removeprefix("torch."),
        "device": torch.device(model.device).type,
        "d_model": model.d_model,
        "sites": list(plan.sites),
        "layers": list(plan.layers),
        "token": plan.token,
        "positions": list(plan.labels),
        "batch_size": plan.batch_size,
        "backend": plan.backend,
    }


def key_digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# The directory
# ----------------------------------------------------------------------------------------------


def check_store_dir(path: Path | str, *, output_dir: Path | str | None = None) -> Path:
    """Validate an activation store directory without touching it (one-line
    :class:`OutputDirError`): new, empty, or an activation store refusal-dir wrote; never the
    run's own output directory or its ``directions`` folder (which a run replaces)."""
    directory = check_output_dir(path, kind="activations", flag=FLAG)
    if output_dir is not None:
        target, out = directory.expanduser().resolve(), Path(output_dir).expanduser().resolve()
        replaced = out / "directions"
        if target == out or target == replaced or replaced in target.parents:
            raise OutputDirError(
                f"{FLAG} {path} is the output directory or inside its directions folder, which a "
                f"run replaces: choose a folder beside it, e.g. {out / 'activations'}"
            )
    return directory


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(
            f"activation set name {name!r} must be letters, digits, '_', '.' or '-' (a folder "
            "name): pass another name"
        )
    return name


# ----------------------------------------------------------------------------------------------
# Batch files
# ----------------------------------------------------------------------------------------------


def _tensors_sha256(tensors: dict[str, Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().numpy().tobytes())
    return digest.hexdigest()


def _batch_payload(plan: CollectionPlan, stored: dict[str, SiteActs], digest: str, index: int) -> bytes:
    """One batch as safetensors bytes: ``site.layer`` -> rows x positions x d_model."""
    tensors = {
        _tensor_name(site, layer): stored[site][:, :, column, :].contiguous()
        for site in plan.sites
        for column, layer in enumerate(plan.layers)
    }
    rows = plan.rows(index)
    metadata = {
        "format": str(STORE_FORMAT),
        "key": digest,
        "batch": str(index),
        "start": str(rows.start),
        "stop": str(rows.stop),
        "sha256": _tensors_sha256(tensors),
    }
    return save(tensors, metadata=metadata)


def _metadata(payload: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors payload (ValueError when there is none)."""
    length = int.from_bytes(payload[:8], "little")
    if len(payload) < 8 or not 0 < length <= len(payload) - 8:
        raise ValueError("no safetensors header")
    header = json.loads(payload[8 : 8 + length].decode("utf-8"))
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict):
        raise ValueError("no metadata")
    return metadata


def _read_batch(path: Path, *, plan: CollectionPlan, digest: str, index: int) -> dict[str, Tensor] | None:
    """The tensors of batch ``index`` when its file is complete and belongs to this key, else
    None (missing, torn, truncated, edited, or written under another key)."""
    try:
        payload = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as error:
        logger.warning("%s is unreadable (%s): computing that batch again", path, error)
        return None
    rows = plan.rows(index)
    expected = {"key": digest, "batch": str(index), "start": str(rows.start), "stop": str(rows.stop)}
    try:
        metadata = _metadata(payload)
        tensors = load(payload)
    except (SafetensorError, ValueError, UnicodeDecodeError) as error:
        logger.warning("%s is torn or not a batch file (%s): computing that batch again", path, error)
        return None
    names = {_tensor_name(site, layer) for site in plan.sites for layer in plan.layers}
    shape = (len(rows), len(plan.labels))
    good = (
        all(metadata.get(name) == value for name, value in expected.items())
        and set(tensors) == names
        and all(t.dtype == torch.float32 and tuple(t.shape[:2]) == shape and t.ndim == 3 for t in tensors.values())
        and metadata.get("sha256") == _tensors_sha256(tensors)
    )
    if not good:
        logger.warning("%s does not hold this batch (key, rows or checksum differ): computing it again", path)
        return None
    return tensors


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def _recorded_key(folder: Path, fix: str) -> dict[str, Any] | None:
    """The key in the set's manifest; None when there is no manifest."""
    manifest = folder / MANIFEST_NAME
    if not manifest.exists():
        return None
    try:
        recorded = json.loads(manifest.read_bytes().decode("utf-8"))["key"]
        if not isinstance(recorded, dict):
            raise TypeError("its key is not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise OutputDirError(f"{manifest} is corrupt ({error}): {fix}") from error
    return recorded


def _check_key(folder: Path, recorded: dict[str, Any], key: dict[str, Any], fix: str) -> None:
    changed = sorted(name for name in set(recorded) | set(key) if recorded.get(name) != key.get(name))
    if changed:
        raise OutputDirError(f"{folder} holds activations of other inputs ({', '.join(changed)} differ): {fix}")


def _open_set(folder: Path, key: dict[str, Any]) -> None:
    """Create the set's folder and manifest, or refuse one written under another key."""
    fix = f"delete {folder} (or choose another {FLAG}) to collect them again"
    if folder.exists() and not folder.is_dir():
        raise OutputDirError(f"{folder} is a file, not an activation set folder: {fix}")
    recorded = _recorded_key(folder, fix)
    if recorded is not None:
        _check_key(folder, recorded, key, fix)
        return
    if folder.is_dir() and any(folder.iterdir()):
        raise OutputDirError(f"{folder} holds files but no {MANIFEST_NAME}: {fix}")
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_json(folder / MANIFEST_NAME, {"tool": "refusal_dir", "key": key, "digest": key_digest(key), "created": created})


def _untrusted(folder: Path, plan: CollectionPlan, digest: str) -> list[int]:
    """The batches whose files are missing or not trusted (:func:`_read_batch`)."""
    return [i for i in range(plan.n_batches)
            if _read_batch(folder / batch_file(i), plan=plan, digest=digest, index=i) is None]


def collect_to_store(
    model: HookedModel,
    prompts: Sequence[str],
    *,
    store: Path | str,
    name: str,
    sites: Sequence[str] = RESIDUAL_SITES,
    token: str | None = None,
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
    apply_chat_template: bool = True,
    backend: str = "fast",
    progress: bool = True,
    description: str = "caching activations to disk",
) -> StoredActivations:
    """:func:`~refusal_dir.activations.collect_activations`, written to ``store/name`` one batch
    file at a time; resumes from the trusted batches already there (see the module docstring).

    Memory holds one batch, whatever the number of prompts. Refuses (one line) a ``name``
    folder written under another key, and a ``store`` directory refusal-dir did not write.
    """
    _check_name(name)
    plan = plan_collection(
        model, prompts, sites=sites, token=token, layers=layers, batch_size=batch_size,
        apply_chat_template=apply_chat_template, backend=backend,
    )
    key = store_key(model, plan)
    digest = key_digest(key)
    with claim_output_dir(store, kind="activations", flag=FLAG) as directory:
        folder = directory / name
        _open_set(folder, key)
        missing = _untrusted(folder, plan, digest)
        if len(missing) < plan.n_batches:
            logger.info("%s: %d of %d batches already stored", folder, plan.n_batches - len(missing), plan.n_batches)
        bar = tqdm(total=plan.n_batches, initial=plan.n_batches - len(missing), desc=description,
                   disable=not progress, leave=False)
        with bar:
            for index in missing:
                stored = collect_batch(model, plan, index)
                atomic_write_bytes(folder / batch_file(index), _batch_payload(plan, stored, digest, index))
                bar.update(1)
    return StoredActivations(folder, plan, digest, model.d_model)


def read_store(store: Path | str, name: str, *, model: HookedModel, prompts: Sequence[str], **options: Any) -> StoredActivations:
    """A complete stored set, read back for these inputs (``options`` as for
    :func:`collect_to_store`); refused with one line when the set is incomplete, torn or was
    written under another key. Nothing is computed or written."""
    _check_name(name)
    plan = plan_collection(model, prompts, **options)
    key = store_key(model, plan)
    folder = Path(store) / name
    fix = f"run collect_to_store again to collect them (or pass another {FLAG})"
    recorded = _recorded_key(folder, fix)
    if recorded is None:
        raise OutputDirError(f"{folder} holds no stored activations: {fix}")
    _check_key(folder, recorded, key, fix)
    digest = key_digest(key)
    bad = _untrusted(folder, plan, digest)
    if bad:
        raise OutputDirError(f"{folder} lacks {len(bad)} of {plan.n_batches} batches (first: {batch_file(bad[0])}): {fix}")
    return StoredActivations(folder, plan, digest, model.d_model)


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredActivations:
    """Activations in an activation store, read on demand: rows ``start:stop`` of a set.

    Offers what :class:`~refusal_dir.activations.Activations` offers to directions and
    scoring (:class:`~refusal_dir.activations.ActivationReader`): :meth:`layer_mean`
    (streamed float64 sums, computed once for every site), :meth:`column` and
    :meth:`select` of a contiguous range (a view, nothing read). :meth:`site` loads every
    prompt of a site into memory.
    """

    folder: Path
    plan: CollectionPlan
    digest: str
    d_model: int
    start: int = 0
    stop: int | None = None
    _means: dict[str, Tensor] = field(default_factory=dict, compare=False, repr=False)

    @property
    def positions(self) -> tuple[str, ...]:
        return self.plan.labels

    @property
    def layers(self) -> tuple[int, ...]:
        return self.plan.layers

    @property
    def end(self) -> int:
        return len(self.plan.texts) if self.stop is None else self.stop

    @property
    def n_prompts(self) -> int:
        return self.end - self.start

    def _check_site(self, site: str) -> None:
        if site not in self.plan.sites:
            raise ConfigError(f"site {site!r} was not collected: collected are {', '.join(self.plan.sites)}")

    def _pieces(self) -> Iterator[tuple[Path, slice, int]]:
        """(batch file, its rows inside this view, the first row's offset in the view)."""
        size = self.plan.batch_size
        if self.n_prompts <= 0:
            return
        for index in range(self.start // size, (self.end - 1) // size + 1):
            rows = self.plan.rows(index)
            low, high = max(rows.start, self.start), min(rows.stop, self.end)
            yield self.folder / batch_file(index), slice(low - rows.start, high - rows.start), low - self.start

    def _read(self, path: Path) -> dict[str, Tensor]:
        try:
            return load(path.read_bytes())
        except (OSError, SafetensorError) as error:
            raise DataError(f"{path} became unreadable after it was stored ({error}): collect the set again") from error

    def layer_mean(self, site: str, position: int, layer: int) -> Float[Tensor, " d_model"]:
        """Mean over the prompts at (position index, layer column), from float64 sums of the
        batches in order (one pass over the files for every site, then cached)."""
        self._check_site(site)
        if not self._means:
            sums = {s: torch.zeros(len(self.positions), len(self.layers), self.d_model, dtype=torch.float64)
                    for s in self.plan.sites}
            for path, rows, _ in self._pieces():
                tensors = self._read(path)
                for s in self.plan.sites:
                    for column, number in enumerate(self.layers):
                        sums[s][:, column] += tensors[_tensor_name(s, number)][rows].to(torch.float64).sum(dim=0)
            self._means.update({s: total / self.n_prompts for s, total in sums.items()})
        return self._means[site][position, layer]

    def column(self, site: str, position: int, layer: int) -> Float[Tensor, "prompts d_model"]:
        """Every prompt's activation at (position index, layer column), read from the batch
        files (memory: this column only)."""
        self._check_site(site)
        name = _tensor_name(site, self.layers[layer])
        parts = []
        for path, rows, _ in self._pieces():
            with safe_open(str(path), framework="pt") as handle:
                parts.append(handle.get_tensor(name)[rows, position].clone())
        return torch.cat(parts)

    def site(self, site: str) -> SiteActs:
        """Every prompt of the view at ``site``: ``prompts x positions x layers x d_model``,
        in memory (use :meth:`column` and :meth:`layer_mean` to stay on disk)."""
        self._check_site(site)
        out = torch.zeros(self.n_prompts, len(self.positions), len(self.layers), self.d_model)
        for path, rows, offset in self._pieces():
            tensors = self._read(path)
            block = torch.stack([tensors[_tensor_name(site, number)][rows] for number in self.layers], dim=2)
            out[offset : offset + len(block)] = block
        return out

    def select(self, indices: Sequence[int]) -> StoredActivations | Activations:
        """A contiguous ascending range of rows as a view (nothing read); other selections are
        loaded into an in-memory :class:`~refusal_dir.activations.Activations`."""
        chosen = list(indices)
        if any(not 0 <= i < self.n_prompts for i in chosen):
            raise DataError(f"row index out of range: this set has {self.n_prompts} prompts")
        if not chosen:
            return StoredActivations(self.folder, self.plan, self.digest, self.d_model, self.start, self.start)
        if chosen == list(range(chosen[0], chosen[-1] + 1)):
            return StoredActivations(
                self.folder, self.plan, self.digest, self.d_model, self.start + chosen[0], self.start + chosen[-1] + 1
            )
        index = torch.as_tensor(chosen, dtype=torch.long)
        return Activations(
            acts={s: self.site(s)[index] for s in self.plan.sites},
            positions=self.positions, layers=self.layers, n_prompts=len(chosen),
        )
