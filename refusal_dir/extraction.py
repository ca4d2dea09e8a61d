"""Stage 1: compute, score and save the directions, and select the steering layer.

Its files, inside the run's output directory (written to a staging folder and swapped in):

```
OUT/directions/<method>_<site>/          one DirectionSet per method and site (safetensors + JSON)
OUT/directions/honesty_<method>_<site>/  the honesty direction (when evaluation.honesty)
OUT/directions/scores.csv                per-layer separation scores of every set
OUT/directions/layer_effects.csv         every candidate's effects (effect selection)
OUT/directions/layer_cosines.csv         every candidate's cosines (cosine selection)
OUT/directions/selected.json             the chosen set, token and layer, the rule that fired and
                                         the extraction key (written last)
```

The rules that choose the layer are in :mod:`refusal_dir.selection`; this module runs them
and writes, reads back and validates the files.

The activations are kept in memory, or with ``extraction.activation_store`` (``--activation-store
DIR``) written to ``DIR/<refusal|honesty>-<positive|negative>`` batch by batch and read from
there (:mod:`refusal_dir.store`): the same directions, memory flat in the number of pairs for the
mean difference, and a killed extraction resumes from the stored batches.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refusal_dir.activations import ActivationReader, collect_activations
from refusal_dir.config import SPEED_ONLY_SETTINGS, Config
from refusal_dir.datasets import Datasets, split_pairs
from refusal_dir.directions import DirectionSet, compute_directions, weights_fingerprint
from refusal_dir.errors import DataError, DirectionMismatchError, OutputDirError, short_message
from refusal_dir.model import HookedModel
from refusal_dir.outdir import atomic_write_bytes, lock_output_dir, staging_dir, swap_in, write_json
from refusal_dir.prompts import PairSet
from refusal_dir.selection import (
    LayerCosine,
    LayerEffect,
    LayerScore,
    choose_by_cosine,
    choose_layer,
    layer_cosines,
    layer_effects,
    score_layers,
    select_layer,
)
from refusal_dir.store import check_store_dir, collect_to_store


@dataclass(frozen=True)
class Extraction:
    sets: dict[str, DirectionSet]
    scores: dict[str, list[LayerScore]]
    selected_key: str
    selected: LayerScore
    honesty_key: str | None = None
    honesty_selected: LayerScore | None = None
    effects: tuple[LayerEffect, ...] = ()
    selection: dict[str, Any] | None = None
    """Which rule chose the layer (:meth:`LayerSelection.as_record` or
    :meth:`CosineSelection.as_record`); None: by separation."""
    cosines: tuple[LayerCosine, ...] = ()

    @property
    def rule(self) -> str:
        """``effect``, ``cosine`` or ``separation``: the rule that chose the layer."""
        return "effect" if self.effects else "cosine" if self.cosines else "separation"

    @property
    def steering_set(self) -> DirectionSet:
        return self.sets[self.selected_key]


def set_key(method: str, site: str, prefix: str = "") -> str:
    """The name of the DirectionSet of ``method`` at ``site`` in an extraction (its folder name;
    ``prefix`` "honesty_" for the honesty family)."""
    return f"{prefix}{method}_{site}"


def _collect_split(
    model: HookedModel, pairs: PairSet, config: Config, *, progress: bool, label: str
) -> tuple[ActivationReader, ActivationReader, ActivationReader, ActivationReader, list[str]]:
    """Train and held-out activations of both sides, and each held-out pair's group.

    With ``extraction.activation_store`` they are written to ``<store>/<label>-<side>`` and
    read from there (:mod:`refusal_dir.store`), else kept in memory."""
    train, heldout = split_pairs(pairs, config)
    texts_pos = train.positives + heldout.positives
    texts_neg = train.negatives + heldout.negatives
    store = config.extraction.activation_store

    def collect(texts: list[str], side: str) -> ActivationReader:
        options: dict[str, Any] = {
            "sites": config.extraction.sites,
            "token": config.extraction.token,
            "batch_size": config.extraction.batch_size,
            "progress": progress,
            "description": f"{label}: {side}",
        }
        if store is None:
            return collect_activations(model, texts, **options)
        return collect_to_store(model, texts, store=store, name=f"{label}-{side}", **options)

    positive, negative = collect(texts_pos, "positive"), collect(texts_neg, "negative")
    n_train = len(train)
    train_idx, held_idx = range(n_train), range(n_train, len(texts_pos))
    return (
        positive.select(train_idx),
        negative.select(train_idx),
        positive.select(held_idx),
        negative.select(held_idx),
        heldout.groups,
    )


def _extract_family(
    model: HookedModel, pairs: PairSet, config: Config, *, name: str, prefix: str, progress: bool
) -> tuple[dict[str, DirectionSet], dict[str, list[LayerScore]]]:
    if len(pairs) < 4:
        raise DataError(f"{name} pairs: need at least 4 pairs to hold some out, got {len(pairs)}")
    train_pos, train_neg, held_pos, held_neg, groups = _collect_split(
        model, pairs, config, progress=progress, label=name
    )
    digest = pairs.content_hash()
    sets: dict[str, DirectionSet] = {}
    scores: dict[str, list[LayerScore]] = {}
    for method in config.extraction.methods:
        for site in config.extraction.sites:
            key = set_key(method, site, prefix)
            sets[key] = compute_directions(
                train_pos,
                train_neg,
                site=site,
                method=method,
                model=model,
                position_rule=config.extraction.token,
                prompt_hash=digest,
                name=name,
            )
            scores[key] = score_layers(
                sets[key], held_pos, held_neg, train_positive=train_pos, train_negative=train_neg,
                groups=groups,
            )
    return sets, scores


def extraction_key(config: Config, model: HookedModel, datasets: Datasets) -> str:
    """What an extraction depends on: its settings, the model's weights and the pairs."""
    settings = config.key_dict()
    speed_only = {key.partition(".")[2] for key in SPEED_ONLY_SETTINGS if key.startswith("extraction.")}
    record = {
        "model": settings["model"],
        "data": {k: settings["data"][k] for k in ("refusal_pairs", "honesty_pairs", "heldout_fraction", "seed")},
        "extraction": {k: v for k, v in settings["extraction"].items() if k not in speed_only},
        "honesty": config.evaluation.honesty,
        "weights": weights_fingerprint(model),
        "pairs": datasets.refusal_pairs.content_hash(),
        "honesty_pairs": datasets.honesty_pairs.content_hash() if datasets.honesty_pairs else None,
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def check_activation_store(config: Config, output_dir: Path) -> None:
    """Validate ``extraction.activation_store`` (when set) before anything is loaded."""
    if config.extraction.activation_store is not None:
        check_store_dir(config.extraction.activation_store, output_dir=output_dir)


def extract(
    model: HookedModel, config: Config, datasets: Datasets, output_dir: Path, *, progress: bool = True
) -> Extraction:
    """Compute, score and save every direction set; select the steering (position, layer).

    The sets are written to a staging directory and swapped in as ``OUT/directions`` at the
    end, so an interrupted extraction leaves the previous directions (if any) as they were.
    """
    output_dir = Path(output_dir)
    with lock_output_dir(output_dir):
        result = _extract(model, config, datasets, progress=progress)
        staging = staging_dir(output_dir, "directions")
        try:
            save_extraction(result, staging, key=extraction_key(config, model, datasets))
            swap_in(staging, output_dir / "directions")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return result


def _extract(model: HookedModel, config: Config, datasets: Datasets, *, progress: bool) -> Extraction:
    sets, scores = _extract_family(
        model, datasets.refusal_pairs, config, name="refusal", prefix="", progress=progress
    )
    key = set_key(config.extraction.method, config.extraction.site)
    selected = select_layer(
        scores[key], n_layers=model.n_layers, max_layer_fraction=config.extraction.max_layer_fraction
    )
    effects: list[LayerEffect] = []
    cosines: tuple[LayerCosine, ...] = ()
    selection: dict[str, Any] | None = None
    chosen: LayerEffect | LayerCosine | None = None
    _, heldout = split_pairs(datasets.refusal_pairs, config)
    # What both rules that steer to choose are given: the held-out pairs, never evaluation sets.
    candidates: dict[str, Any] = dict(
        harmful=heldout.positives,
        harmless=heldout.negatives,
        max_layer_fraction=config.extraction.max_layer_fraction,
        batch_size=config.extraction.batch_size,
        max_candidates=config.extraction.selection_candidates,
        max_prompts=config.extraction.selection_prompts,
        progress=progress,
    )
    if config.extraction.selection == "effect":
        effects = layer_effects(model, sets[key], scores[key], site=config.extraction.site, **candidates)
        choice = choose_layer(effects, max_kl=config.extraction.max_kl)
        selection, chosen = choice.as_record(), choice.chosen
    elif config.extraction.selection == "cosine":
        scan = layer_cosines(model, sets[key], scores[key], **candidates)
        cosine_choice = choose_by_cosine(scan)
        selection, chosen, cosines = cosine_choice.as_record(), cosine_choice.chosen, scan.cosines
    if chosen is not None:
        selected = next(
            s for s in scores[key] if s.layer == chosen.layer and s.position == chosen.position
        )
    honesty_key, honesty_selected = None, None
    if datasets.honesty_pairs is not None:
        honesty_sets, honesty_scores = _extract_family(
            model, datasets.honesty_pairs, config, name="honesty", prefix="honesty_", progress=progress
        )
        sets.update(honesty_sets)
        scores.update(honesty_scores)
        honesty_key = set_key(config.extraction.method, config.extraction.site, "honesty_")
        honesty_selected = select_layer(
            scores[honesty_key], n_layers=model.n_layers,
            max_layer_fraction=config.extraction.max_layer_fraction,
        )
    return Extraction(
        sets, scores, key, selected, honesty_key, honesty_selected, tuple(effects), selection, cosines
    )


def save_extraction(extraction: Extraction, directory: Path, *, key: str | None = None) -> None:
    """Write every set, ``scores.csv``, ``layer_effects.csv`` or ``layer_cosines.csv`` and,
    last, ``selected.json``.

    ``key`` (:func:`extraction_key`) is recorded in ``selected.json`` for ``run`` to check.
    """
    for name, direction_set in extraction.sets.items():
        direction_set.save(directory / name)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["set", *LayerScore.__dataclass_fields__])
    writer.writeheader()
    for name, rows in extraction.scores.items():
        for score in rows:
            writer.writerow({"set": name, **score.as_row()})
    atomic_write_bytes(directory / "scores.csv", buffer.getvalue().encode())
    for name, candidates in (("layer_effects.csv", extraction.effects), ("layer_cosines.csv", extraction.cosines)):
        if not candidates:
            continue
        buffer = io.StringIO()
        candidate_rows = [candidate.as_row() for candidate in candidates]
        writer = csv.DictWriter(buffer, fieldnames=list(candidate_rows[0]))
        writer.writeheader()
        writer.writerows(candidate_rows)
        atomic_write_bytes(directory / name, buffer.getvalue().encode())
    selected: dict[str, Any] = {
        "set": extraction.selected_key,
        **extraction.selected.as_row(),
        "rule": extraction.rule,
    }
    if extraction.selection is not None:
        selected["selection"] = extraction.selection
    if extraction.honesty_key and extraction.honesty_selected:
        selected["honesty"] = {"set": extraction.honesty_key, **extraction.honesty_selected.as_row()}
    if key is not None:
        selected["extraction_key"] = key
    write_json(directory / "selected.json", selected)


def _read_csv(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            missing = [name for name in required if name not in (reader.fieldnames or [])]
    except FileNotFoundError as error:
        raise DataError(f"{path} is missing: re-run `refusal-dir extract`") from error
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{path} is unreadable ({short_message(error)}): re-run `refusal-dir extract`") from error
    if missing:
        raise DataError(f"{path} lacks the column(s) {', '.join(missing)}: re-run `refusal-dir extract`")
    if not rows:
        raise DataError(f"{path} has no rows: re-run `refusal-dir extract`")
    return rows


def _parse_rows(path: Path, rows: list[dict[str, str]], parse: Callable[[dict[str, str]], Any]) -> list[Any]:
    parsed = []
    for number, row in enumerate(rows, start=2):
        try:
            parsed.append(parse(row))
        except (TypeError, ValueError) as error:
            raise DataError(f"{path} line {number} is malformed ({short_message(error)}): re-run `refusal-dir extract`") from error
    return parsed


def _score(row: dict[str, str]) -> tuple[str, LayerScore]:
    probe = row["probe_accuracy"]
    return row["set"], LayerScore(
        position=row["position"],
        layer=int(row["layer"]),
        separation_accuracy=float(row["separation_accuracy"]),
        auroc=float(row["auroc"]),
        effect_size=float(row["effect_size"]),
        probe_accuracy=float(probe) if probe else None,
    )


def _effect(row: dict[str, str]) -> LayerEffect:
    return LayerEffect(
        position=row["position"],
        layer=int(row["layer"]),
        separation_accuracy=float(row["separation_accuracy"]),
        ablation_kl=float(row["ablation_kl"]),
        bypass=float(row["bypass"]),
        induce=float(row["induce"]),
    )


def _cosine(row: dict[str, str]) -> LayerCosine:
    return LayerCosine(
        position=row["position"],
        layer=int(row["layer"]),
        separation_accuracy=float(row["separation_accuracy"]),
        comply_cosine=float(row["comply_cosine"]),
        refuse_cosine=float(row["refuse_cosine"]),
    )


def _selection_record(record: Any, where: str, directory: Path, *, need_layer: bool = True) -> dict[str, Any]:
    """Validate one selection record: ``set`` names a direction set inside ``directory``."""
    fix = "re-run `refusal-dir extract`"
    if not isinstance(record, dict):
        raise DataError(f"{where} must hold a JSON object, not {type(record).__name__}: {fix}")
    missing = [k for k in ("set", "layer", "position") if k not in record]
    if missing:
        raise DataError(f"{where} lacks the key(s) {', '.join(missing)}: {fix}")
    name, layer, position = record["set"], record["layer"], record["position"]
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or Path(name).is_absolute()
    ):
        raise DataError(f"{where}: set {name!r} must name a direction set inside {directory}: {fix}")
    if not (directory / name).is_dir():
        raise DataError(f"{where}: set {name!r} is not a folder of {directory}: {fix}")
    layer_ok = (layer is None and not need_layer) or (isinstance(layer, int) and not isinstance(layer, bool) and layer >= 0)
    if not layer_ok:
        raise DataError(f"{where}: layer {layer!r} must be an integer >= 0: {fix}")
    if not isinstance(position, str):
        raise DataError(f"{where}: position {position!r} must be a name: {fix}")
    return record


def read_selected(directory: Path) -> dict[str, Any]:
    """``directory/selected.json``, validated (one-line :class:`DataError` when it is not)."""
    path = Path(directory) / "selected.json"
    try:
        record = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError as error:
        raise DataError(f"{path.parent} has no selected.json: pass the output of `refusal-dir extract`") from error
    except (OSError, ValueError) as error:
        raise DataError(f"{path} is corrupt ({short_message(error)}): re-run `refusal-dir extract`") from error
    _selection_record(record, str(path), path.parent)
    if record.get("honesty") is not None:
        _selection_record(record["honesty"], f"{path} (honesty)", path.parent)
    return record


def load_extraction(directory: Path, *, model: HookedModel | None = None) -> Extraction:
    """Read back what :func:`save_extraction` wrote, validating every file.

    With ``model``, every set must fit it (:meth:`DirectionSet.check_fits`); without, only the
    files are checked (call :func:`check_extraction_fits` once the model is loaded).
    """
    directory = Path(directory)
    selected = read_selected(directory)
    scores: dict[str, list[LayerScore]] = {}
    score_path = directory / "scores.csv"
    score_rows = _read_csv(score_path, ["set", "position", "layer", "separation_accuracy", "auroc", "effect_size", "probe_accuracy"])
    for name, score in _parse_rows(score_path, score_rows, _score):
        scores.setdefault(name, []).append(score)
    for name in scores:
        _selection_record({"set": name, "layer": 0, "position": ""}, str(score_path), directory)
    sets = {name: DirectionSet.load(directory / name, model=model) for name in scores}

    def pick(record: dict[str, Any], where: str) -> LayerScore:
        chosen = next(
            (s for s in scores.get(record["set"], []) if s.layer == record["layer"] and s.position == record["position"]),
            None,
        )
        if chosen is None:
            raise DataError(
                f"{where}: set {record['set']!r} layer {record['layer']} position "
                f"{record['position']!r} has no row in scores.csv: re-run `refusal-dir extract`"
            )
        return chosen

    honesty = selected.get("honesty")
    effects: list[LayerEffect] = []
    effects_path = directory / "layer_effects.csv"
    if effects_path.exists() or selected.get("rule") == "effect":
        effect_rows = _read_csv(effects_path, ["position", "layer", "separation_accuracy", "ablation_kl", "bypass", "induce"])
        effects = _parse_rows(effects_path, effect_rows, _effect)
    cosines: list[LayerCosine] = []
    cosines_path = directory / "layer_cosines.csv"
    if cosines_path.exists() or selected.get("rule") == "cosine":
        cosine_rows = _read_csv(cosines_path, ["position", "layer", "separation_accuracy", "comply_cosine", "refuse_cosine"])
        cosines = _parse_rows(cosines_path, cosine_rows, _cosine)
    where = str(directory / "selected.json")
    return Extraction(
        sets=sets,
        scores=scores,
        selected_key=selected["set"],
        selected=pick(selected, where),
        honesty_key=honesty["set"] if honesty else None,
        honesty_selected=pick(honesty, where) if honesty else None,
        effects=tuple(effects),
        selection=selected.get("selection") if isinstance(selected.get("selection"), dict) else None,
        cosines=tuple(cosines),
    )


def check_pairs_match(extraction: Extraction, datasets: Datasets, *, directions_dir: Path) -> None:
    """Refuse rebuilt refusal pairs that are not the ones the directions were extracted from.

    ``evaluate`` and ``tune`` rebuild the held-out pairs (the conditional gate's threshold, the
    tuning threshold) from the config; other pairs would hand them prompts the directions were
    trained on. Checked against the steering set's ``prompt_set_hash`` (skipped when empty:
    directions computed outside the pipeline record none).
    """
    recorded = extraction.steering_set.meta.prompt_set_hash
    rebuilt = datasets.refusal_pairs.content_hash()
    if recorded and recorded != rebuilt:
        raise DataError(
            f"the directions in {directions_dir} were extracted from other refusal pairs "
            f"(hash {recorded}) than this config gives (hash {rebuilt}): pass the --pairs-file "
            "(or --config) that `refusal-dir extract` used"
        )


def check_extraction_fits(extraction: Extraction, model: HookedModel) -> None:
    for direction_set in extraction.sets.values():
        direction_set.check_fits(model)


def extraction_directory(path: Path) -> Path:
    """The folder holding ``selected.json``: ``path`` itself or its ``directions`` folder."""
    path = Path(path)
    if str(path).strip() == "":
        raise DataError("--directions-dir is empty: pass the output of `refusal-dir extract`")
    if (path / "directions" / "selected.json").exists() or (path / "directions").is_dir():
        return path / "directions"
    return path


def load_selected(directions_dir: Path, *, model: HookedModel | None = None) -> tuple[DirectionSet, dict[str, Any]]:
    """The steering DirectionSet and its selection record from an extraction directory.

    ``directions_dir`` may be the ``directions`` folder of a run, the run folder itself, or one
    DirectionSet folder (then its best layer is taken from a sibling ``selected.json`` if any).
    """
    directions_dir = Path(directions_dir)
    for candidate in (directions_dir, directions_dir / "directions"):
        if (candidate / "selected.json").exists():
            selected = read_selected(candidate)
            return DirectionSet.load(candidate / selected["set"], model=model), selected
    direction_set = DirectionSet.load(directions_dir, model=model)
    return direction_set, {"set": directions_dir.name, "layer": None, "position": direction_set.meta.positions[-1]}


def extraction_prompts(datasets: Datasets, config: Config) -> dict[str, list[str]]:
    prompts = {
        f"data.refusal_pairs ({config.data.refusal_pairs})": datasets.refusal_pairs.positives
        + datasets.refusal_pairs.negatives
    }
    if datasets.honesty_pairs is not None:
        prompts[f"data.honesty_pairs ({config.data.honesty_pairs})"] = (
            datasets.honesty_pairs.positives + datasets.honesty_pairs.negatives
        )
    return prompts


def load_saved_extraction(output_dir: Path, config: Config, model: HookedModel, datasets: Datasets) -> Extraction:
    """A run's own saved directions, refused unless extracted under this config, model and pairs."""
    directory = Path(output_dir) / "directions"
    try:
        recorded = read_selected(directory).get("extraction_key")
        if recorded == extraction_key(config, model, datasets):
            return load_extraction(directory, model=model)
    except (DataError, DirectionMismatchError) as error:
        raise OutputDirError(f"{error}; or pass --fresh to start this run over") from error
    raise OutputDirError(
        f"{directory} was extracted under another config, model or pair set than this run "
        "(or by an interrupted re-extraction): pass --fresh to start over there, or choose a "
        "new --output-dir"
    )
