"""Export an ablation point as a model directory or a LoRA adapter, streaming shard by shard.

What is baked is a :class:`Bake`: a tuned point (:meth:`Bake.tuned`, what
``refusal-dir tune --objective remove`` saved) or the full single-direction ablation of Arditi
et al. (:meth:`Bake.full_ablation`: weight 1 at every layer, one layer's direction everywhere,
plain projection, and the token embedding projected too, as
:func:`refusal_dir.orthogonalize.save_orthogonalized` does; tested tensor for tensor equal to it).

**Streaming** (the default). The model is loaded with every weight left on disk
(``device_map={"": "disk"}``: transformers builds it on the ``meta`` device and records, for each
parameter, which checkpoint file and key hold it). That is enough to check the directions'
fingerprint and to compute the edits (:func:`refusal_dir.abliteration.weight_edits` reads the
architecture and the post-norm gains only). Then the checkpoint's safetensors files are copied
one tensor at a time (:mod:`refusal_dir.shards`): a tensor with an edit is read, edited in
float32 and cast back to its stored dtype; the others are copied a chunk at a time. Output shards hold
at most 2 GiB; the names and layout are the checkpoint's own (what ``save_pretrained`` writes),
with the config, generation config and tokenizer beside them. Peak memory is about one tensor
(bench/bench_export_memory.py measures it). Tied input/output embeddings stay tied unless the
embedding is edited (full ablation): then the unembedding is written with its original weights
and the config unties them.

**In memory** where streaming is impossible: a quantized load, or a checkpoint that
transformers converts while loading (mixture-of-experts weights stored one expert per tensor,
``.bin`` or GGUF files). The model is loaded with the given options, copied
(:func:`refusal_dir.placement.materialized_copy`), edited and saved with ``save_pretrained``, in
the same output format; a warning says so.

**LoRA** (``lora_adapter=True``): a peft adapter instead of full weights, exact for plain projections
(:mod:`refusal_dir.lora`).

Everything is written into a staging directory beside ``output_dir`` and swapped in with the
refusal_dir marker; an existing directory is replaced only when it is empty or an earlier export.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from refusal_dir import lora, outdir, shards
from refusal_dir.abliteration import AblationOptions, AblationPoint, Kernel, weight_edits
from refusal_dir.directions import DirectionSet, ReadElements
from refusal_dir.model import HookedModel, load_model
from refusal_dir.placement import materialized_copy
from refusal_dir.tuned import TunedAblation

logger = logging.getLogger(__name__)

MAX_SHARD_BYTES = 2 * 1024**3
_BLOCK = 1 << 22  # elements of the embedding edited at a time


@dataclass(frozen=True)
class EmbeddingEdit:
    """The token embedding's edit in the full ablation: no row keeps a component along ``basis``
    (``vocab x d_model``: rows live in the residual stream). The same arithmetic as
    :func:`refusal_dir.orthogonalize.orthogonalized_copy` (float32, ``E - outer(E u, u)``), done
    a block of rows at a time so that a large vocabulary needs no second full-size matrix."""

    basis: Tensor
    weight: float = 1.0

    def apply(self, tensor: Tensor, *, owned: bool = False) -> Tensor:
        """The edited tensor (``owned``: the caller gives ``tensor`` up; a float32 one is then
        edited in place)."""
        values = tensor.float()
        if values is tensor and not owned:
            values = values.clone()
        unit = self.basis[0].to(device=values.device, dtype=values.dtype)
        along = values @ unit
        rows = max(1, _BLOCK // max(1, values.shape[1]))
        for start in range(0, values.shape[0], rows):
            values[start : start + rows] -= torch.outer(along[start : start + rows], unit)
        return values.to(tensor.dtype)


@dataclass(frozen=True)
class Bake:
    """What an export writes into the weights."""

    directions: DirectionSet
    point: AblationPoint
    options: AblationOptions
    harmless_means: Tensor | None = None
    embedding: Tensor | None = None
    """A unit direction to remove from the token embedding too (the full ablation), or None."""
    note: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def tuned(cls, tuned: TunedAblation) -> Bake:
        """The point ``tune --objective remove`` chose, as it was measured."""
        note = {
            "edit": "tuned ablation point baked into weights (refusal_dir.export)",
            "point": tuned.point.to_dict(),
            "options": asdict(tuned.options),
        }
        return cls(tuned.directions, tuned.point, tuned.options, tuned.harmless_means, note=note)

    @classmethod
    def full_ablation(cls, directions: DirectionSet, layer: int, token: str | int | None = None) -> Bake:
        """Arditi et al.'s ablation: ``layer``'s direction removed from every write of every
        block and from the token embedding (weight 1, plain projection)."""
        unit = directions.unit(layer, token)  # layer and token exist in the set
        everywhere = DirectionSet(
            unit.expand_as(directions.directions).clone(), directions.norms.clone(), directions.meta
        )
        one = Kernel(1.0, 0.0, 1.0, float(directions.n_layers))  # weight exactly 1 at every layer
        note = {"edit": "directional ablation baked into weights (refusal_dir.export)", "direction_layer": layer}
        options = AblationOptions(projected=False, norm_preserving=False, token=token)
        return cls(everywhere, AblationPoint(one, one), options, embedding=unit.clone(), note=note)


def planned_edits(model: HookedModel, bake: Bake) -> dict[str, Any]:
    """Parameter name (``model.hf.state_dict()``'s) -> its edit (``.apply(tensor)``)."""
    edits: dict[str, Any] = dict(
        weight_edits(model, bake.directions, bake.point, options=bake.options, harmless_means=bake.harmless_means)
    )
    if bake.embedding is not None:
        edits[_embedding_name(model)] = EmbeddingEdit(bake.embedding.float().unsqueeze(0))
    return edits


def _names_of(hf: nn.Module, parameter: Tensor) -> list[str]:
    return [name for name, p in hf.named_parameters(remove_duplicate=False) if p is parameter]


def _embedding_name(model: HookedModel) -> str:
    return _names_of(model.hf, model.architecture.embedding(model.hf).weight)[0]


# ----------------------------------------------------------------------------------------------
# The checkpoint on disk, as transformers mapped it
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """The source checkpoint's tensors in file order, each with the parameter it loads into."""

    tensors: list[tuple[str, shards.StoredTensor]]


def checkpoint_of(hf: nn.Module, scratch: Path) -> Checkpoint | str:
    """Where each weight of a disk-offloaded model lives, or why it cannot be streamed."""
    index: dict[str, dict[str, Any]] | None = None
    for module in hf.modules():
        weights = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
        if weights is not None:
            index = weights.dataset.index
            if weights.dataset.state_dict:
                return "some weights were loaded into memory"
            break
    if not index:
        return "transformers did not leave the weights on disk"
    groups = _tied_groups(hf)
    canonical = {name: group[0] for group in groups for name in group}  # tied names: the first
    located: dict[tuple[str, str], str] = {}
    for name, entry in index.items():
        file = entry.get("safetensors_file")
        if file is None or Path(file).resolve().is_relative_to(scratch.resolve()):
            return f"{name} is converted while it loads (e.g. experts stored one per tensor, or not safetensors)"
        where = (str(Path(file).resolve()), entry["weight_name"])
        if located.setdefault(where, canonical.get(name, name)) != canonical.get(name, name):
            return f"{located[where]} and {name} load from one checkpoint tensor"
    for group in groups:
        if not any(name in index for name in group):
            return f"{group[0]} is not in the checkpoint's files"
    tensors = []
    for file in sorted({path for path, _ in located}):
        for stored in shards.read_header(file):
            parameter = located.get((file, stored.key))
            if parameter is None:
                logger.info("%s in %s is not part of the model: not exported", stored.key, Path(file).name)
                continue
            tensors.append((parameter, stored))
    return Checkpoint(tensors)


def _tied_groups(hf: nn.Module) -> list[list[str]]:
    groups: dict[int, list[str]] = {}
    for name, parameter in hf.named_parameters(remove_duplicate=False):
        groups.setdefault(id(parameter), []).append(name)
    return list(groups.values())


def _checkpoint_key(hf: Any, name: str) -> str:
    """The key ``save_pretrained`` writes parameter ``name`` under (the checkpoint's naming)."""
    from transformers.core_model_loading import revert_weight_conversion

    return next(iter(revert_weight_conversion(hf, {name: torch.empty(0, device="meta")})))


def _planned(model: HookedModel, checkpoint: Checkpoint, edits: Mapping[str, Any], untie: bool) -> list[shards.Planned]:
    embedding = _embedding_name(model)
    planned = []
    for name, stored in checkpoint.tensors:
        edit = edits.get(name)
        if edit is None:
            planned.append(shards.Planned.copied(stored.key, stored))
        else:
            planned.append(shards.Planned(stored.key, stored.torch_dtype, stored.shape, _edited(stored, edit)))
        if untie and name == embedding:  # the unembedding keeps the original weights
            output = model.hf.get_output_embeddings()
            head = next(n for n, module in model.hf.named_modules() if module is output) + ".weight"
            planned.append(shards.Planned.copied(_checkpoint_key(model.hf, head), stored))
    return planned


def _edited(stored: shards.StoredTensor, edit: Any) -> Callable[[], Tensor]:
    if isinstance(edit, EmbeddingEdit):
        return lambda: edit.apply(stored.read(), owned=True)  # the read buffer is ours
    return lambda: edit.apply(stored.read())


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def _untie(config: Any) -> None:
    config.tie_word_embeddings = False
    config.get_text_config().tie_word_embeddings = False


def _write_streamed(staging: Path, model: HookedModel, checkpoint: Checkpoint, edits: Mapping[str, Any], *, untie: bool, max_shard_bytes: int, progress: bool) -> None:
    from tqdm.auto import tqdm

    planned = _planned(model, checkpoint, edits, untie)
    files = shards.plan_shards(planned, max_shard_bytes)
    with tqdm(total=len(planned), desc="export", unit="tensor", disable=not progress) as bar:
        for name, tensors in files.items():
            shards.write_file(staging / name, tensors, written=bar.update)
    if len(files) > 1:
        outdir.write_json(staging / shards.INDEX_FILE, shards.index_payload(files))
    config = copy.deepcopy(model.hf.config)
    dtypes = {t.dtype for t in planned if t.dtype.is_floating_point}
    if len(dtypes) == 1:
        config.dtype = dtypes.pop()  # the stored dtype, which the streamed files keep
    if untie:
        _untie(config)
    config.save_pretrained(staging)
    if model.hf.can_generate():
        model.hf.generation_config.save_pretrained(staging)
    model.tokenizer.save_pretrained(staging)


def _write_in_memory(staging: Path, model: HookedModel, edits: Mapping[str, Any], *, untie: bool, max_shard_bytes: int) -> None:
    """Edit ``model`` (a copy the caller owns) in place and save it with ``save_pretrained``."""
    edited = model.hf
    if untie:
        embedding = model.architecture.embedding(edited)
        edited.get_output_embeddings().weight = nn.Parameter(embedding.weight.detach().clone(), requires_grad=False)
        _untie(edited.config)
    parameters = dict(edited.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, edit in edits.items():
            parameters[name].data = edit.apply(parameters[name].data)
    edited.save_pretrained(staging, max_shard_size=max_shard_bytes)
    model.tokenizer.save_pretrained(staging)


def _checked_edits(
    model: HookedModel, bake: Bake, lora_adapter: bool, *, loaded: HookedModel, read: ReadElements | None = None
) -> tuple[dict[str, Any], bool]:
    """The edits of ``model``, once the directions are known to fit the ``loaded`` model (the
    same, or the one ``model`` was copied from; its weights sample read with ``read``); whether
    the output unties the embeddings (the embedding is edited and the unembedding shares it)."""
    # Before any weight is read: reading an offloaded weight unties it (accelerate swaps the
    # module's parameter in and out).
    untie = bake.embedding is not None and model.architecture.embeddings_tied(model.hf)
    bake.directions.check_fits(loaded, read=read)
    edits = planned_edits(model, bake)
    if lora_adapter:
        shapes = {name: tuple(p.shape) for name, p in model.hf.named_parameters(remove_duplicate=False)}
        lora.check_edits(edits, shapes, embedding=_embedding_name(model))
    return edits, untie


def _sample_reader(hf: nn.Module, checkpoint: Checkpoint) -> ReadElements:
    """Elements of a parameter read from the checkpoint file (the fingerprint needs 16 numbers
    of a matrix, not the matrix)."""
    stored = dict(checkpoint.tensors)
    by_id = {id(p): stored[name] for name, p in hf.named_parameters(remove_duplicate=False) if name in stored}
    return lambda matrix, flat_index: by_id[id(matrix)].read_elements(flat_index)


def _reader(checkpoint: Checkpoint | str, hf: Any) -> Callable[[str], Tensor]:
    if isinstance(checkpoint, Checkpoint):
        stored = dict(checkpoint.tensors)
        return lambda name: stored[name].read()
    weights = dict(hf.named_parameters(remove_duplicate=False))
    return lambda name: weights[name].detach()


def _write_note(staging: Path, model: HookedModel, bake: Bake, *, lora_adapter: bool, streamed: bool) -> None:
    meta = bake.directions.meta
    note = {
        "source_model": model.model_id,
        "source_revision": model.revision,
        **bake.note,
        "format": "peft LoRA adapter" if lora_adapter else "full weights",
        "streamed": streamed,
        "direction_meta": {
            "method": meta.method, "site": meta.site, "position": meta.position, "prompt_set_hash": meta.prompt_set_hash,
        },
    }
    outdir.atomic_write_text(staging / outdir.LEGACY_EXPORT_NOTE, json.dumps(note, indent=2))
    outdir.write_marker(staging, "model")


# ----------------------------------------------------------------------------------------------
# The export
# ----------------------------------------------------------------------------------------------


def export(
    model_name: str,
    bake: Bake,
    output_dir: str | Path,
    *,
    load_options: Mapping[str, Any] | None = None,
    lora_adapter: bool = False,
    protect: Iterable[str | Path] = (),
    max_shard_bytes: int = MAX_SHARD_BYTES,
    progress: bool = True,
    cache: Path | None = None,
) -> Path:
    """Write ``bake`` applied to model ``model_name`` into ``output_dir`` (see the module
    docstring); ``load_options`` are :func:`refusal_dir.model.load_model`'s (used as given by the
    in-memory path; streaming needs only ``revision``). Returns the output directory."""
    protect = list(protect)
    output_dir = outdir.check_output_dir(output_dir, kind="model", fresh=True, protect=protect)
    if lora_adapter:
        lora.check_peft()
        lora.check_low_rank(bake.options.norm_preserving)
    options = dict(load_options or {})
    staging = outdir.staging_dir(output_dir.parent, output_dir.name)
    scratch = outdir.staging_dir(output_dir.parent, f"{output_dir.name}-offload")
    try:
        checkpoint: Checkpoint | str = "the model is loaded quantized"
        if options.get("quantization") is None:
            model = load_model(
                model_name, device_map={"": "disk"}, offload_folder=scratch, with_bridge=False,
                revision=options.get("revision"), cache=cache,
            )
            checkpoint = checkpoint_of(model.hf, scratch)
            read = _sample_reader(model.hf, checkpoint) if isinstance(checkpoint, Checkpoint) else None
            edits, untie = _checked_edits(model, bake, lora_adapter, loaded=model, read=read)
            if isinstance(checkpoint, Checkpoint):
                missing = sorted(set(edits) - {name for name, _ in checkpoint.tensors})
                if missing:
                    checkpoint = f"the edited weight {missing[0]} is not in the checkpoint's files"
        if not isinstance(checkpoint, Checkpoint):
            logger.warning("exporting %s in memory, not streamed: %s", model_name, checkpoint)
            loaded = load_model(model_name, with_bridge=False, cache=cache, **options)
            model = copy.copy(loaded)
            model.hf = materialized_copy(loaded.hf)  # one device, full precision, no hooks
            edits, untie = _checked_edits(model, bake, lora_adapter, loaded=loaded)
            del loaded
        try:
            if lora_adapter:
                tensors = lora.adapter_tensors(edits, _reader(checkpoint, model.hf), embedding=_embedding_name(model))
                lora.write_adapter(staging, tensors, base_model=model.model_id)
            elif isinstance(checkpoint, Checkpoint):
                _write_streamed(staging, model, checkpoint, edits, untie=untie, max_shard_bytes=max_shard_bytes, progress=progress)
            else:
                _write_in_memory(staging, model, edits, untie=untie, max_shard_bytes=max_shard_bytes)
            _write_note(staging, model, bake, lora_adapter=lora_adapter, streamed=isinstance(checkpoint, Checkpoint))
        except OSError as error:
            raise outdir.write_error(output_dir, error) from error
        outdir.check_output_dir(output_dir, kind="model", fresh=True, protect=protect)
        outdir.swap_in(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
    return output_dir
