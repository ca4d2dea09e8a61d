"""Bake directional ablation into the weights of a copy of the model, and export it.

The edited copy computes exactly what ``ablation(..., mode="weights")`` computes at run time
(tested to float precision): the embedding matrix and every block's attention-output and
MLP-output matrices are projected so that nothing they write has a component along the
direction. On Gemma-2/3, whose blocks normalize each write with a post-norm, the projection is
taken along the direction rescaled by that norm's gain, which makes the post-norm's output
orthogonal to the direction. Tied input/output embeddings are untied first, so the unembedding
keeps its original weights. The user's model is never modified.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from refusal_dir.directions import DirectionSet
from refusal_dir.errors import ConfigError, DirectionMismatchError, OutputDirError
from refusal_dir.interventions import _has_post_norms, weights_mode_unit, writer_modules
from refusal_dir.model import HookedModel, decoder_layers


def _project_rows(matrix: Tensor, unit: Tensor) -> Tensor:
    """Remove ``unit`` from every row of ``matrix`` (rows live in d_model space)."""
    unit = unit.to(matrix.dtype)
    return matrix - torch.outer(matrix @ unit, unit)


def _project_outputs(linear: nn.Module, unit: Tensor) -> None:
    """Edit a Linear layer in place so that its output has no ``unit`` component."""
    if not isinstance(linear, nn.Linear):
        raise ConfigError(
            f"weight orthogonalization supports nn.Linear writers, not {type(linear).__name__}"
        )
    with torch.no_grad():
        weight = linear.weight.data.float()
        u = unit.to(weight.device).float()
        linear.weight.data = (weight - torch.outer(u, u @ weight)).to(linear.weight.dtype)
        if linear.bias is not None:
            bias = linear.bias.data.float()
            linear.bias.data = (bias - (bias @ u) * u).to(linear.bias.dtype)


def orthogonalized_copy(
    model: HookedModel,
    directions: DirectionSet | Tensor,
    *,
    direction_layer: int | None = None,
    position: str | int | None = None,
) -> Any:
    """A new ``transformers`` model with the direction projected out of its weights."""
    if isinstance(directions, DirectionSet):
        if direction_layer is None:
            raise ConfigError("orthogonalizing with a DirectionSet needs direction_layer=")
        directions.check_fits(model)
        unit = directions.unit(direction_layer, position)
    else:
        unit = torch.as_tensor(directions, dtype=torch.float32)
        unit = unit / unit.norm().clamp_min(1e-12)
    if unit.shape != (model.d_model,):
        raise DirectionMismatchError(
            f"the direction has shape {tuple(unit.shape)} but the model has d_model "
            f"{model.d_model}: extract directions for this model"
        )
    edited = copy.deepcopy(model.hf)
    edited.requires_grad_(False)
    embedding = edited.get_input_embeddings()
    output = edited.get_output_embeddings()
    if output is not None and output.weight is embedding.weight:
        output.weight = nn.Parameter(embedding.weight.detach().clone(), requires_grad=False)
    edited.config.tie_word_embeddings = False
    text_config = edited.config.get_text_config()
    text_config.tie_word_embeddings = False
    with torch.no_grad():
        weight = embedding.weight.data.float()
        embedding.weight.data = _project_rows(weight, unit.to(weight.device)).to(
            embedding.weight.dtype
        )
    for block in decoder_layers(edited):
        modules = writer_modules(block)
        for writer, norm_name in (
            ("attn_write", "post_attention_layernorm"),
            ("mlp_write", "post_feedforward_layernorm"),
        ):
            layer_unit = unit
            if _has_post_norms(block):
                layer_unit = weights_mode_unit(unit, getattr(block, norm_name))
            _project_outputs(modules[writer], layer_unit)
    return edited


def save_orthogonalized(
    model: HookedModel,
    directions: DirectionSet | Tensor,
    output_dir: str | Path,
    *,
    direction_layer: int | None = None,
    position: str | int | None = None,
) -> Path:
    """Write the orthogonalized model as a standard model directory (loads with transformers)."""
    output_dir = Path(output_dir)
    edited = orthogonalized_copy(
        model, directions, direction_layer=direction_layer, position=position
    )
    try:
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=".orthogonalized-"))
    except OSError as error:
        raise OutputDirError(
            f"cannot write to {output_dir.parent} ({error.strerror or error}): choose a "
            "writable output directory"
        ) from error
    try:
        edited.save_pretrained(staging)
        model.tokenizer.save_pretrained(staging)
        note: dict[str, Any] = {
            "source_model": model.model_id,
            "source_revision": model.revision,
            "edit": "directional ablation baked into weights (refusal_dir.orthogonalize)",
            "direction_layer": direction_layer,
        }
        if isinstance(directions, DirectionSet):
            note["direction_meta"] = {
                "method": directions.meta.method,
                "site": directions.meta.site,
                "position": directions.meta.position,
                "prompt_set_hash": directions.meta.prompt_set_hash,
            }
        (staging / "refusal_dir_edit.json").write_text(json.dumps(note, indent=2))
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(staging, output_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return output_dir
