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

Given a :class:`~refusal_dir.subspace.Subspace`, every row of the layer's basis is projected
out (on Gemma, of the basis rescaled by each post-norm's gain and orthonormalized:
:func:`~refusal_dir.interventions.weights_mode_basis`), as ``ablation(subspace, ...,
mode="weights")`` does at run time. The projection is
:class:`refusal_dir.abliteration.WeightEdit`'s plain edit at full weight; a ``k=1`` Subspace
gives the single-direction weights bit for bit.
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
from refusal_dir.abliteration import WeightEdit
from refusal_dir.architectures import WRITE_KINDS, Writer
from refusal_dir.deprecation import renamed_keywords
from refusal_dir.directions import DirectionSet
from refusal_dir.errors import (
    ConfigError,
    DirectionMismatchError,
    UnsupportedArchitectureError,
)
from refusal_dir.interventions import weights_mode_basis
from refusal_dir.model import HookedModel
from refusal_dir.placement import materialized_copy
from refusal_dir.subspace import Subspace


def _project_writer(writer: Writer, basis: Tensor) -> None:
    """Edit a writer in place so that its output has no component along ``basis``'s rows.

    The ``d_model`` output axis is second to last (a Linear's ``d_model x d_in`` weight, or
    ``n_experts x d_model x d_expert`` stacked experts: every expert is edited).
    """
    weight = writer.weight
    if weight.shape[-2] != basis.shape[-1]:
        raise UnsupportedArchitectureError(
            f"the writer {writer.path} has shape {tuple(weight.shape)}, whose output axis is not "
            f"d_model {basis.shape[-1]}: its entry in refusal_dir.architectures is wrong"
        )
    edit = WeightEdit(basis, 1.0, norm_preserving=False)
    with torch.no_grad():
        weight.data = edit.apply(weight.data)
        if writer.bias is not None:
            writer.bias.data = edit.apply(writer.bias.data)


def _basis(model: HookedModel, directions: DirectionSet | Subspace | Tensor, layer: int | None, token: str | int | None) -> Tensor:
    """The ``k x d_model`` basis to project out (k=1: one unit direction)."""
    if isinstance(directions, (DirectionSet, Subspace)):
        if layer is None:
            raise ConfigError(f"orthogonalizing with a {type(directions).__name__} needs layer= (whose direction)")
        directions.check_fits(model)
        if isinstance(directions, Subspace):
            return directions.basis(layer, token)
        unit = directions.unit(layer, token)
    else:
        unit = torch.as_tensor(directions, dtype=torch.float32)
        unit = unit / unit.norm().clamp_min(1e-12)
    if unit.shape != (model.d_model,):
        raise DirectionMismatchError(
            f"the direction has shape {tuple(unit.shape)} but the model has d_model "
            f"{model.d_model}: extract directions for this model"
        )
    return unit.unsqueeze(0)


@renamed_keywords(direction_layer="layer", position="token")
def orthogonalized_copy(
    model: HookedModel,
    directions: DirectionSet | Subspace | Tensor,
    *,
    layer: int | None = None,
    token: str | int | None = None,
) -> Any:
    """A new ``transformers`` model with the direction (or the subspace) of ``layer`` (label
    ``token``) projected out of its weights (``direction_layer=``/``position=``: deprecated
    names)."""
    basis = _basis(model, directions, layer, token).float()
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
        embedding.weight.data = WeightEdit(basis, 1.0, norm_preserving=False).apply(embedding.weight.data, rows=True)
    for block in architecture.layers(edited):
        for kind in WRITE_KINDS:
            rows = weights_mode_basis(architecture, block, kind, basis)
            for writer in architecture.writers(block, kind):
                _project_writer(writer, rows)
    return edited


@renamed_keywords(direction_layer="layer", position="token")
def save_orthogonalized(
    model: HookedModel,
    directions: DirectionSet | Subspace | Tensor,
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
        if isinstance(directions, Subspace):
            note["subspace_k"] = directions.k
        if isinstance(directions, (DirectionSet, Subspace)):
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
