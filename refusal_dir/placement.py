"""Where a model's weights live: one device, a ``device_map`` over several devices with CPU or
disk offload (accelerate), or 8-/4-bit quantized weights (bitsandbytes).

Nothing here moves tensors itself: ``transformers.from_pretrained`` places the modules and
accelerate's hooks bring an offloaded module's weights in for each forward pass. This module
checks the settings before anything is loaded (one :class:`ConfigError` line each), reads a
weight that accelerate keeps on the ``meta`` device between passes (:func:`onloaded`), and makes
the full-precision one-device copy that export edits (:func:`materialized_copy`).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from refusal_dir.errors import ConfigError

DEVICE_MAPS: tuple[str, ...] = ("auto", "balanced", "balanced_low_0", "sequential")
"""The ``device_map`` strategies of accelerate that ``from_pretrained`` takes by name."""
QUANTIZATIONS: tuple[str, ...] = ("8bit", "4bit")
"""bitsandbytes loadings: ``8bit`` (LLM.int8) and ``4bit`` (NF4)."""

DeviceMap = str | Mapping[str, int | str | torch.device]
MaxMemory = Mapping[int | str, int | str]


def parse_max_memory(value: str | MaxMemory | None) -> dict[int | str, int | str] | None:
    """accelerate's ``max_memory`` from ``"0=20GiB,1=20GiB,cpu=60GiB"`` (or a mapping).

    Keys are GPU indices (written as integers), ``cpu``, ``disk`` or ``mps``; values are sizes
    accelerate reads (``"20GiB"``, ``"500MB"``) or a number of bytes.
    """
    if value is None:
        return None
    if isinstance(value, str):
        pairs = [item.partition("=") for item in value.split(",") if item.strip()]
        if not pairs or any(not sep or not key.strip() or not size.strip() for key, sep, size in pairs):
            raise ConfigError(
                f"max_memory {value!r} is not a list of device=size: write it like "
                "'0=20GiB,cpu=60GiB'"
            )
        value = {key.strip(): size.strip() for key, _, size in pairs}
    if not isinstance(value, Mapping) or not value:
        raise ConfigError("max_memory must map devices to sizes, like {0: '20GiB', 'cpu': '60GiB'}")
    limits: dict[int | str, int | str] = {}
    for key, size in value.items():
        device: int | str = int(key) if isinstance(key, str) and key.isdigit() else key
        if not (isinstance(device, int) or device in ("cpu", "disk", "mps")):
            raise ConfigError(
                f"max_memory key {key!r} is no device: use a GPU index (0, 1, ...), cpu, disk or mps"
            )
        limits[device] = size
    return limits


def _check_device_map(device_map: DeviceMap) -> None:
    if isinstance(device_map, str):
        if device_map not in DEVICE_MAPS:
            raise ConfigError(
                f"unknown device_map {device_map!r}: choose one of {', '.join(DEVICE_MAPS)}, or "
                "pass a dict from module names to devices"
            )
        return
    if not isinstance(device_map, Mapping) or not device_map:
        raise ConfigError("device_map must be a strategy name (auto, ...) or a dict from module names to devices")
    for module, where in device_map.items():
        if where == "disk" or (isinstance(where, int) and not isinstance(where, bool) and where >= 0):
            continue
        try:
            torch.device(where)
        except (RuntimeError, TypeError) as error:
            raise ConfigError(
                f"device_map puts {module!r} on {where!r}, which is no device: use a GPU index, "
                "'cuda:N', 'cpu' or 'disk'"
            ) from error


def _check_offload_folder(folder: str | Path) -> None:
    path = Path(folder).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"offload_folder {str(folder)!r} is not a directory: pass a directory to write offloaded weights in")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"offload_folder {str(folder)!r} is not writable ({existing} is not): pass a directory "
            "you may write into"
        )


def check_placement(
    *,
    device: str | None,
    device_map: DeviceMap | None,
    max_memory: str | MaxMemory | None,
    offload_folder: str | Path | None,
) -> dict[str, Any]:
    """Validate where the model goes, before anything is loaded; return ``from_pretrained``'s
    placement keywords (empty for a plain one-device load, which ``device`` then places)."""
    if device_map is None:
        for name, given in (("max_memory", max_memory), ("offload_folder", offload_folder)):
            if given is not None:
                raise ConfigError(f"{name} needs device_map: pass device_map='auto' (or a dict) with it")
        return {}
    if device is not None:
        raise ConfigError("device and device_map exclude each other: give device_map only (it places every module)")
    _check_device_map(device_map)
    if isinstance(device_map, Mapping) and "disk" in device_map.values() and offload_folder is None:
        raise ConfigError("device_map puts modules on 'disk': pass offload_folder=<a directory you may write into>")
    if offload_folder is not None:
        _check_offload_folder(offload_folder)
    placement: dict[str, Any] = {"device_map": device_map if isinstance(device_map, str) else dict(device_map)}
    limits = parse_max_memory(max_memory)
    if limits is not None:
        placement["max_memory"] = limits
    if offload_folder is not None:
        placement["offload_folder"] = str(Path(offload_folder).expanduser())
    return placement


def quantization_config(quantization: str | None, dtype: torch.dtype) -> Any | None:
    """A ``BitsAndBytesConfig`` for ``8bit``/``4bit`` (``None``: full precision), computing in
    ``dtype``. Raises :class:`ConfigError` when bitsandbytes is missing or supports none of
    this machine's devices, before any weight is read."""
    if quantization is None:
        return None
    if quantization not in QUANTIZATIONS:
        raise ConfigError(f"unknown quantization {quantization!r}: choose one of {', '.join(QUANTIZATIONS)}, or none")
    from transformers import BitsAndBytesConfig
    from transformers.utils import import_utils

    needed = import_utils.BITSANDBYTES_MIN_VERSION
    if not import_utils.is_bitsandbytes_available():
        raise ConfigError(
            f"quantization={quantization!r} needs bitsandbytes>={needed}, which is not installed: "
            "pip install 'refusal-dir[quantization]', or load without quantization"
        )
    from transformers.integrations.bitsandbytes import validate_bnb_backend_availability

    if not validate_bnb_backend_availability(raise_exception=False):
        raise ConfigError(
            f"quantization={quantization!r}: the installed bitsandbytes supports none of this "
            "machine's devices (see its installation guide): load without quantization"
        )
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


def is_dispatched(hf: nn.Module) -> bool:
    """Whether accelerate placed the model's modules (a ``device_map`` with several devices or
    offload): their weights may then live on other devices or, between passes, on ``meta``."""
    return any(hasattr(module, "_hf_hook") for module in hf.modules())


def is_quantized(hf: nn.Module) -> bool:
    return getattr(hf, "hf_quantizer", None) is not None


def input_device(hf: Any) -> str:
    """Where input ids go: the device the token embedding runs on (its accelerate execution
    device when it is offloaded)."""
    embedding = hf.get_input_embeddings()
    execution = getattr(getattr(embedding, "_hf_hook", None), "execution_device", None)
    if execution is not None:
        return str(torch.device(execution) if not isinstance(execution, int) else torch.device("cuda", execution))
    return str(embedding.weight.device)


@contextmanager
def onloaded(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` with its own parameters present inside the block.

    An offloaded module keeps its weights on the ``meta`` device between forward passes;
    accelerate's ``align_module_device`` loads them onto the module's execution device for the
    block, as its hooks do for a forward pass. Any other module is yielded as it is.
    """
    if not hasattr(module, "_hf_hook"):
        yield module
        return
    from accelerate.utils import align_module_device

    with align_module_device(module):
        yield module


def materialized_copy(hf: Any) -> Any:
    """A full-precision copy of the model with every weight present on the CPU and no
    accelerate hooks: what export edits and saves. The model itself is not changed.

    An offloaded model's weights are read through accelerate
    (``get_state_dict_offloaded_model``, one module at a time); tied weights are tied again. A
    bitsandbytes model is copied and dequantized by ``transformers`` (``dequantize()``): the
    export holds the weights the quantized model computes with, in full precision.
    """
    if not is_dispatched(hf):
        edited = copy.deepcopy(hf)
    else:
        from accelerate.hooks import remove_hook_from_module
        from accelerate.utils.modeling import get_state_dict_offloaded_model

        state = get_state_dict_offloaded_model(hf)
        # The structure is copied around the original tensors and hooks (shared, not copied);
        # the copy then drops its hooks and takes its own tensors from the state.
        memo: dict[int, Any] = {id(t): t for t in [*hf.parameters(), *hf.buffers()]}
        memo.update({id(m._hf_hook): m._hf_hook for m in hf.modules() if hasattr(m, "_hf_hook")})
        edited = copy.deepcopy(hf, memo)
        remove_hook_from_module(edited, recurse=True)
        edited.load_state_dict({name: value.clone() for name, value in state.items()}, assign=True)
        if hasattr(edited, "hf_device_map"):
            del edited.hf_device_map
        edited.tie_weights()
        edited.to("cpu")
        left = [name for name, tensor in edited.state_dict().items() if tensor.is_meta]
        if left:
            raise ConfigError(
                f"cannot read the offloaded weights {', '.join(left[:3])}: load the model "
                "without disk offload to export it"
            )
    if is_quantized(edited):
        edited = edited.dequantize()
    edited.requires_grad_(False)
    return edited
