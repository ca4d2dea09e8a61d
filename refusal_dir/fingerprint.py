"""Which model a direction set (or a resume key, or an activation store) belongs to: a
dtype-tolerant sample of its weights, and an exact short hash of it."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from refusal_dir.placement import onloaded

_SAMPLE_MATRICES = 16
_SAMPLE_PER_MATRIX = 16
#: Two sampled weights agree when they differ by at most two bfloat16 steps, so that float32,
#: bfloat16 and float16 loads of one checkpoint match; the weights match when most samples agree.
_SAMPLE_RTOL = 2.0**-7
_SAMPLE_AGREEMENT = 0.75
#: ``read(matrix, flat_index)``: the elements of a (possibly meta) matrix at flat positions.
ReadElements = Callable[[Tensor, Tensor], Tensor]


@torch.no_grad()
def weights_sample(model: Any, *, read: ReadElements | None = None) -> tuple[float, ...]:
    """256 weights spread over the model's matrices: which weights a direction set belongs to.

    Evenly spaced elements of up to 16 evenly spaced weight matrices (the embedding first).
    Rounding-tolerant comparison (:func:`same_weights`) makes the sample independent of the
    dtype the model was loaded in. Empty for objects without ``hf`` weights. ``read(matrix,
    flat_index)`` gives those elements of a matrix whose values are elsewhere (an export reads
    16 numbers from the checkpoint file, not the matrix); by default they are read from the model.
    """
    hf = getattr(model, "hf", None)
    if hf is None or not hasattr(hf, "parameters"):
        return ()
    matrices: list[Tensor] = []
    seen: set[int] = set()
    for parameter in hf.parameters():
        if parameter.ndim == 2 and id(parameter) not in seen:
            seen.add(id(parameter))
            matrices.append(parameter)
    if not matrices:
        return ()
    step = max(1, len(matrices) // _SAMPLE_MATRICES)
    values: list[float] = []
    for matrix in matrices[::step][:_SAMPLE_MATRICES]:
        # Integer arithmetic: a float32 linspace rounds the last index of a 168M-element matrix
        # (Gemma 3 270M's embedding) one past the end.
        index = torch.arange(_SAMPLE_PER_MATRIX) * (matrix.numel() - 1) // (_SAMPLE_PER_MATRIX - 1)
        if read is None:
            flat = _present(hf, matrix).detach().reshape(-1)
            picked = flat[index.to(flat.device)]
        else:
            picked = read(matrix, index)
        values += [float(v) for v in picked.float().cpu()]
    return tuple(values)


def _present(hf: Any, matrix: Tensor) -> Tensor:
    """``matrix``, or its values read through accelerate when it was offloaded (then it sits on
    the meta device between forward passes: :func:`refusal_dir.placement.onloaded`)."""
    if not matrix.is_meta:
        return matrix
    for module in hf.modules():
        for name, parameter in module.named_parameters(recurse=False):
            if parameter is matrix:
                with onloaded(module):
                    return module.get_parameter(name).detach().clone()
    return matrix


def same_weights(recorded: tuple[float, ...], current: tuple[float, ...]) -> bool:
    """Whether two :func:`weights_sample` results come from the same weights (dtype-tolerant)."""
    if len(recorded) != len(current) or not recorded:
        return False
    close = sum(
        abs(a - b) <= _SAMPLE_RTOL * max(abs(a), abs(b)) + 1e-8 for a, b in zip(recorded, current)
    )
    return close >= _SAMPLE_AGREEMENT * len(recorded)


def weights_fingerprint(model: Any) -> str:
    """A short hash of :func:`weights_sample` (exact: used in resume keys, same dtype)."""
    text = json.dumps([float(torch.tensor(x).to(torch.bfloat16)) for x in weights_sample(model)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]
