"""Bake directional ablation into the weights of a copy of the model, and export it.

The edited copy computes exactly what ``ablation(..., mode="weights")`` computes at run time
(tested to float precision): the embedding matrix and every block's attention-output and
MLP-output matrices are projected so that nothing they write has a component along the
direction (in a mixture-of-experts MLP: every expert's down projection, and the shared expert's).
On Gemma-2/3, whose blocks normalize each write with a post-norm, the projection is taken along
the direction rescaled by that norm's gain, which makes the post-norm's output orthogonal to the
direction. Which weights these are is declared per family in :mod:`refusal_dir.architectures`.
Tied input/output embeddings are untied first, so the unembedding keeps its original weights.
The user's model is never modified.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from refusal_dir import outdir
from refusal_dir.architectures import WRITE_KINDS, Writer
from refusal_dir.deprecation import renamed_keywords
from refusal_dir.directions import DirectionSet
from refusal_dir.errors import (
    ConfigError,
    DirectionMismatchError,
    UnsupportedArchitectureError,
)
from refusal_dir.interventions import weights_mode_unit
from refusal_dir.model import HookedModel
from refusal_dir.placement import materialized_copy


def _project_rows(matrix: Tensor, unit: Tensor) -> Tensor:
    """Remove ``unit`` from every row of ``matrix`` (rows live in d_model space)."""
    unit = unit.to(matrix.dtype)
    return matrix - torch.outer(matrix @ unit, unit)


def _project_writer(writer: Writer, unit: Tensor) -> None:
    """Edit a writer in place so that its output has no ``unit`` component.

    The ``d_model`` output axis is second to last (a Linear's ``d_model x d_in`` weight, or
    ``n_experts x d_model x d_expert`` stacked experts: every expert is edited).
    """
    weight = writer.weight
    if weight.shape[-2] != unit.shape[0]:
        raise UnsupportedArchitectureError(
            f"the writer {writer.path} has shape {tuple(weight.shape)}, whose output axis is not "
            f"d_model {unit.shape[0]}: its entry in refusal_dir.architectures is wrong"
        )
    with torch.no_grad():
        u = unit.to(weight.device).float()
        values = weight.data.float()
        along = u @ values  # ... x d_in: each expert's (or the Linear's) row read along u
        weight.data = (values - u.unsqueeze(-1) * along.unsqueeze(-2)).to(weight.dtype)
        if writer.bias is not None:
            bias = writer.bias.data.float()
            writer.bias.data = (bias - (bias @ u).unsqueeze(-1) * u).to(writer.bias.dtype)


@renamed_keywords(direction_layer="layer", position="token")
def orthogonalized_copy(
    model: HookedModel,
    directions: DirectionSet | Tensor,
    *,
    layer: int | None = None,
    token: str | int | None = None,
) -> Any:
    """A new ``transformers`` model with the direction of ``layer`` (label ``token``) projected
    out of its weights (``direction_layer=``/``position=``: deprecated names)."""
    if isinstance(directions, DirectionSet):
        if layer is None:
            raise ConfigError("orthogonalizing with a DirectionSet needs layer= (whose direction)")
        directions.check_fits(model)
        unit = directions.unit(layer, token)
    else:
        unit = torch.as_tensor(directions, dtype=torch.float32)
        unit = unit / unit.norm().clamp_min(1e-12)
    if unit.shape != (model.d_model,):
        raise DirectionMismatchError(
            f"the direction has shape {tuple(unit.shape)} but the model has d_model "
            f"{model.d_model}: extract directions for this model"
        )
    edited = materialized_copy(model.hf)  # one device, full precision (offloaded or quantized loads too)
    edited.requires_grad_(False)
    architecture = model.architecture
    embedding = architecture.embedding(edited)
    if architecture.embeddings_tied(edited):
        output = edited.get_output_embeddings()
        output.weight = nn.Parameter(embedding.weight.detach().clone(), requires_grad=False)
    edited.config.tie_word_embeddings = False
    text_config = edited.config.get_text_config()
    text_config.tie_word_embeddings = False
    with torch.no_grad():
        weight = embedding.weight.data.float()
        embedding.weight.data = _project_rows(weight, unit.to(weight.device)).to(
            embedding.weight.dtype
        )
    for block in architecture.layers(edited):
        for kind in WRITE_KINDS:
            direction = weights_mode_unit(architecture, block, kind, unit)
            for writer in architecture.writers(block, kind):
                _project_writer(writer, direction)
    return edited


@renamed_keywords(direction_layer="layer", position="token")
def save_orthogonalized(
    model: HookedModel,
    directions: DirectionSet | Tensor,
    output_dir: str | Path,
    *,
    layer: int | None = None,
    token: str | int | None = None,
    protect: Iterable[str | Path] = (),
) -> Path:
    """Write the orthogonalized model as a standard model directory (loads with transformers).

    The model is written beside ``output_dir`` and swapped in when complete. An existing
    ``output_dir`` is replaced only when it is empty or an earlier export (it carries the
    refusal_dir marker), never when it holds other files, is the current directory or a parent
    of it, or holds a path in ``protect`` (the directions being read).
    """
    output_dir = outdir.check_output_dir(output_dir, kind="model", fresh=True, protect=protect)
    edited = orthogonalized_copy(model, directions, layer=layer, token=token)
    staging = outdir.staging_dir(output_dir.parent, output_dir.name)
    try:
        try:
            edited.save_pretrained(staging)
            model.tokenizer.save_pretrained(staging)
        except OSError as error:
            raise outdir.write_error(output_dir, error) from error
        note: dict[str, Any] = {
            "source_model": model.model_id,
            "source_revision": model.revision,
            "edit": "directional ablation baked into weights (refusal_dir.orthogonalize)",
            "direction_layer": layer,
        }
        if isinstance(directions, DirectionSet):
            note["direction_meta"] = {
                "method": directions.meta.method,
                "site": directions.meta.site,
                "position": directions.meta.position,
                "prompt_set_hash": directions.meta.prompt_set_hash,
            }
        outdir.atomic_write_text(staging / "refusal_dir_edit.json", json.dumps(note, indent=2))
        outdir.write_marker(staging, "model")
        outdir.check_output_dir(output_dir, kind="model", fresh=True, protect=protect)
        outdir.swap_in(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output_dir
