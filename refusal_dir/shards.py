"""Safetensors files read and written one tensor at a time.

``safetensors`` itself writes a file from a dict of tensors held in memory, and reads through a
memory map whose pages count towards the process's resident memory until the file is closed.
An export that must stay near one tensor of memory needs neither: :func:`read_header` lists a
file's tensors, :meth:`StoredTensor.read` reads one of them (or a few of its elements) with plain
file reads, and :func:`write_file` writes a header for tensors that do not exist yet, then each
tensor's bytes as its producer makes it, or copied from the source file a chunk at a time. The
files are ordinary safetensors files (``safetensors.safe_open``
reads them; tested).

:func:`plan_shards` splits tensors into shards of at most ``max_bytes`` the way
``transformers``' ``save_pretrained`` names them (``model-00001-of-00002.safetensors`` and
``model.safetensors.index.json``; one ``model.safetensors`` when one shard holds them all).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from torch import Tensor

from refusal_dir.errors import ModelLoadError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_HEADER_LIMIT = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
_CHUNK = 64 * 1024 * 1024  # bytes copied at a time


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a safetensors file: where its bytes are and what they hold."""

    path: Path
    key: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    def read(self) -> Tensor:
        """The tensor, read from disk into memory of its own (no memory map)."""
        if self.nbytes == 0:
            return torch.empty(self.shape, dtype=self.torch_dtype)
        buffer = bytearray(self.nbytes)
        with open(self.path, "rb") as file:
            file.seek(self.start)
            if file.readinto(buffer) != self.nbytes:
                raise ModelLoadError(f"{self.path} ends inside tensor {self.key}: the checkpoint file is truncated; download it again")
        return torch.frombuffer(buffer, dtype=self.torch_dtype).reshape(self.shape)

    def read_elements(self, flat_index: Tensor) -> Tensor:
        """The elements at these positions of the flattened tensor (one small read each)."""
        size = self.torch_dtype.itemsize
        buffer = bytearray(size * len(flat_index))
        view = memoryview(buffer)
        with open(self.path, "rb") as file:
            for k, position in enumerate(flat_index.tolist()):
                file.seek(self.start + position * size)
                file.readinto(view[k * size : (k + 1) * size])
        return torch.frombuffer(buffer, dtype=self.torch_dtype)

    def copy_to(self, file: BinaryIO) -> None:
        """Append this tensor's bytes to ``file``, a chunk at a time (no tensor in memory)."""
        with open(self.path, "rb") as source:
            source.seek(self.start)
            left = self.nbytes
            while left:
                chunk = source.read(min(left, _CHUNK))
                if not chunk:
                    raise ModelLoadError(f"{self.path} ends inside tensor {self.key}: the checkpoint file is truncated; download it again")
                file.write(chunk)
                left -= len(chunk)


def read_header(path: str | Path) -> list[StoredTensor]:
    """The tensors of a safetensors file, in the order of their bytes."""
    path = Path(path)
    with open(path, "rb") as file:
        raw_length = file.read(8)
        length = struct.unpack("<Q", raw_length)[0] if len(raw_length) == 8 else -1
        if not 0 < length <= _HEADER_LIMIT:
            raise ModelLoadError(f"{path} is not a safetensors file (no header): check the model directory")
        header = json.loads(file.read(length))
    base = 8 + length
    tensors = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if entry["dtype"] not in DTYPES:
            raise ModelLoadError(f"{path}: tensor {key} has dtype {entry['dtype']}, which refusal_dir cannot copy: export from a load without streaming")
        begin, end = entry["data_offsets"]
        tensors.append(StoredTensor(path, key, entry["dtype"], tuple(entry["shape"]), base + begin, base + end))
    return sorted(tensors, key=lambda tensor: tensor.start)


@dataclass(frozen=True)
class Planned:
    """A tensor to be written: its key, dtype and shape now, its values when :func:`write_file`
    calls ``produce``, or, with ``produce=None``, the bytes of ``copy`` (a stored tensor of this
    dtype and shape) copied as they are."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], Tensor] | None = None
    copy: StoredTensor | None = None

    def __post_init__(self) -> None:
        if (self.produce is None) == (self.copy is None):
            raise ValueError(f"{self.key}: plan a producer or a stored tensor to copy, not both or neither")
        if self.copy is not None and (self.copy.torch_dtype, self.copy.shape) != (self.dtype, self.shape):
            raise ValueError(f"{self.key}: the copied tensor is {self.copy.dtype} {self.copy.shape}")

    @classmethod
    def copied(cls, key: str, stored: StoredTensor) -> Planned:
        return cls(key, stored.torch_dtype, stored.shape, copy=stored)

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=self.dtype).element_size()


def write_file(
    path: Path,
    tensors: Sequence[Planned],
    metadata: Mapping[str, str] | None = None,
    *,
    written: Callable[[], object] | None = None,
) -> None:
    """Write a safetensors file: the header first, then each tensor as it is produced (one
    tensor in memory at a time) or copied. A produced tensor must have its planned dtype and
    shape. ``written()`` is called after each tensor (a progress bar)."""
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for planned in tensors:
        header[planned.key] = {"dtype": NAMES[planned.dtype], "shape": list(planned.shape), "data_offsets": [offset, offset + planned.nbytes]}
        offset += planned.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(encoded)))
        file.write(encoded)
        for planned in tensors:
            if planned.produce is None:
                assert planned.copy is not None  # __post_init__
                planned.copy.copy_to(file)
            else:
                tensor = planned.produce()
                if tensor.dtype != planned.dtype or tuple(tensor.shape) != planned.shape:
                    raise ValueError(
                        f"{planned.key}: produced {tensor.dtype} {tuple(tensor.shape)}, planned "
                        f"{planned.dtype} {planned.shape}"
                    )
                if tensor.numel():
                    file.write(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().data)
                del tensor
            if written is not None:
                written()


def plan_shards(tensors: Iterable[Planned], max_bytes: int) -> dict[str, list[Planned]]:
    """File name -> its tensors, in order; a new shard starts when the next tensor would pass
    ``max_bytes`` (a tensor larger than that gets a shard of its own)."""
    shards: list[list[Planned]] = [[]]
    size = 0
    for planned in tensors:
        if shards[-1] and size + planned.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(planned)
        size += planned.nbytes
    if len(shards) == 1:
        return {SINGLE_FILE: shards[0]}
    total = len(shards)
    return {f"model-{i:05d}-of-{total:05d}.safetensors": shard for i, shard in enumerate(shards, start=1)}


def index_payload(shards: Mapping[str, Sequence[Planned]]) -> dict[str, object]:
    """The ``model.safetensors.index.json`` of sharded files, as ``transformers`` reads it."""
    total = sum(planned.nbytes for shard in shards.values() for planned in shard)
    weight_map = {planned.key: name for name, shard in shards.items() for planned in shard}
    return {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
