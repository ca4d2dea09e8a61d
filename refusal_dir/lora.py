"""An ablation point as a ``peft`` LoRA adapter, exactly.

A plain (not norm-preserving) ablation edit of an output matrix is a low-rank update:
``W' = W - w U^T U W`` with ``U`` the ``k x d_model`` orthonormal basis of the ablated directions
(k=1: one direction), so ``W' = W + B A`` with ``B = -w U^T`` (``d_model x k``) and ``A = U W``
(``k x d_in``), a LoRA of rank ``k`` at ``lora_alpha = k`` (scaling 1). A writer's bias
``b' = b - w U^T U b`` is handled exactly too: it is the LoRA ``B`` layer's bias (peft's
``lora_bias``). The token-embedding edit of the full ablation, ``E' = E - (E U^T) U``, is a LoRA
of the embedding (peft's ``lora_embedding_A = U E^T``, ``lora_embedding_B = -U^T``); the
unembedding keeps its weights, as in the exported full weights.

Refused, each with one line: norm-preserving edits (every row is rescaled: not low-rank), writers
with stacked experts (peft has no exact LoRA for them), and a bias edit together with an
embedding edit (peft's ``lora_bias`` does not cover embeddings).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from refusal_dir.errors import ConfigError

ADAPTER_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."


def check_peft() -> None:
    """Raise one line when peft is missing."""
    try:
        import peft  # noqa: F401
    except ImportError as error:
        raise ConfigError("--lora needs peft, which is not installed: pip install 'refusal-dir[lora]', or drop --lora") from error


def check_low_rank(norm_preserving: bool) -> None:
    if norm_preserving:
        raise ConfigError(
            "a norm-preserving ablation rescales every row of each edited matrix, so it has no "
            "exact LoRA adapter: drop --lora to export full weights, or tune with --no-norm-preserving"
        )


def _module(parameter_name: str) -> tuple[str, str]:
    module, _, leaf = parameter_name.rpartition(".")
    return module, leaf


def check_edits(edits: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], *, embedding: str | None) -> None:
    """Refuse, in one line, edits that one exact adapter cannot hold (``shapes``: each edited
    parameter's shape, known before any weight is read)."""
    for name in edits:
        leaf = _module(name)[1]
        if name != embedding and (leaf not in ("weight", "bias") or len(shapes[name]) != (1 if leaf == "bias" else 2)):
            raise ConfigError(
                f"{name} ({tuple(shapes[name])}) is no dense Linear weight (stacked experts?), so it "
                "has no exact peft LoRA form: drop --lora to export full weights"
            )
    biased = [name for name in edits if _module(name)[1] == "bias"]
    if biased and embedding in edits:
        raise ConfigError(
            f"this edit changes writer biases ({biased[0]}) and the token embedding, which one "
            "peft LoRA adapter cannot hold together: drop --lora to export full weights"
        )
    if not edits:
        raise ConfigError("this point edits no weight, so there is no adapter to write: drop --lora or choose another point")


def adapter_tensors(edits: Mapping[str, Any], read: Any, *, embedding: str | None) -> dict[str, Tensor]:
    """The adapter's tensors (peft's key names) for ``edits`` (parameter name -> edit with
    ``basis`` and ``weight``; checked by :func:`check_edits`), reading each edited parameter with
    ``read(name)``; ``embedding`` names the token embedding's parameter (edited row-wise)."""
    tensors: dict[str, Tensor] = {}
    for name, edit in edits.items():
        module, leaf = _module(name)
        basis = edit.basis.double()
        value = read(name).double()
        if name == embedding:
            tensors[f"{_PREFIX}{module}.lora_embedding_A"] = (basis @ value.T).float().contiguous()
            tensors[f"{_PREFIX}{module}.lora_embedding_B"] = (-edit.weight * basis.T).float().contiguous()
        elif leaf == "bias":
            tensors[f"{_PREFIX}{module}.lora_B.bias"] = (-edit.weight * (basis.T @ (basis @ value))).float()
        else:
            tensors[f"{_PREFIX}{module}.lora_A.weight"] = (basis @ value).float().contiguous()
            tensors[f"{_PREFIX}{module}.lora_B.weight"] = (-edit.weight * basis.T).float().contiguous()
    if any(key.endswith(".lora_B.bias") for key in tensors):  # lora_bias gives every adapted Linear a B bias
        for key in [k for k in tensors if k.endswith(".lora_B.weight")]:
            tensors.setdefault(key.removesuffix(".weight") + ".bias", torch.zeros(tensors[key].shape[0]))
    return tensors


def write_adapter(directory: Path, tensors: Mapping[str, Tensor], *, base_model: str) -> None:
    """``adapter_config.json`` and ``adapter_model.safetensors`` as ``peft`` saves them."""
    from peft import LoraConfig

    ranks = {
        key.removeprefix(_PREFIX).removesuffix(".lora_A.weight").removesuffix(".lora_embedding_A"): int(value.shape[0])
        for key, value in tensors.items() if key.endswith((".lora_A.weight", ".lora_embedding_A"))
    }
    rank = max(ranks.values())
    patterns = {module: k for module, k in ranks.items() if k != rank}
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=sorted(ranks),
        rank_pattern=patterns,
        alpha_pattern=patterns,
        lora_dropout=0.0,
        bias="none",
        lora_bias=any(key.endswith(".lora_B.bias") for key in tensors),
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
        inference_mode=True,
    )
    config.save_pretrained(str(directory))
    save_file(dict(tensors), str(directory / ADAPTER_FILE), metadata={"format": "pt"})
