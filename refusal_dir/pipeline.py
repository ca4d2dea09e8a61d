"""The staged pipeline: extract -> select layer -> sweep -> report.

Each stage writes its own artefacts inside the output directory the user gave, atomically:

```
OUT/config.resolved.yaml        the settings the run used (a different config is refused)
OUT/directions/<method>_<site>/ one DirectionSet per method and site (safetensors + JSON)
OUT/directions/honesty_<method>_<site>/  the honesty direction (when evaluation.honesty)
OUT/directions/scores.csv       per-layer scores of every set; selected.json: the chosen one
OUT/sweep/parts/*.json          one file per finished (method, metric group): resume points
OUT/results.json, results.csv   tidy rows: method, layer, alpha, metric, value, ci_low, ci_high, n
OUT/report.md                   the results table (figures: OUT/figures/*.html via the CLI)
```

A crash or Ctrl-C loses at most the (method, metric group) in progress: the next run with the
same output directory and config resumes from the finished parts.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from refusal_dir import prompts as prompt_sets
from refusal_dir.activations import Activations, collect_activations
from refusal_dir.conditional import Condition, conditional_addition, fit_condition
from refusal_dir.config import Config
from refusal_dir.directions import DirectionSet, atomic_write_bytes, compute_directions
from refusal_dir.errors import ConfigError, DataError, OutputDirError
from refusal_dir.evaluation import judges, metrics, stats
from refusal_dir.evaluation.selection import LayerEffect, layer_effects, select_by_effect
from refusal_dir.generation import GenerationSettings, generate, next_token_logits
from refusal_dir.interventions import Intervention, ablation, addition
from refusal_dir.model import HookedModel, load_model
from refusal_dir.prompts import Claim, MCQuestion, PairSet
from refusal_dir.scoring import LayerScore, score_layers, select_layer

logger = logging.getLogger(__name__)

RESULT_FIELDS = ("method", "layer", "alpha", "metric", "value", "ci_low", "ci_high", "n")


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Datasets:
    refusal_pairs: PairSet
    harmful_eval: list[str]
    benign_eval: list[str]
    mmlu: list[MCQuestion]
    honesty_pairs: PairSet | None
    claims: list[Claim]


def _instructions(source: str, shipped: Callable[[], list[str]], *, field: str = "instruction") -> list[str]:
    if source == "shipped":
        return shipped()
    if source.startswith("hub:"):
        return prompt_sets.load_hub_instructions(source[4:])
    return prompt_sets.load_instructions(source, field=field)


def _mmlu(source: str) -> list[MCQuestion]:
    if source == "shipped":
        return prompt_sets.mmlu_questions()
    if source == "hub:mmlu":
        return prompt_sets.load_hub_mmlu(None)
    if source == "hub:truthfulqa":
        return prompt_sets.load_hub_truthfulqa()
    return prompt_sets.load_mc_questions(source)


def load_datasets(config: Config) -> Datasets:
    """Read every prompt set the config names (shipped sets, local files or hub sets)."""
    data = config.data
    pairs = (
        prompt_sets.refusal_pairs()
        if data.refusal_pairs == "shipped"
        else prompt_sets.load_pairs(data.refusal_pairs, positive_field="harmful", negative_field="harmless")
    )
    honesty = None
    if config.evaluation.honesty:
        honesty = (
            prompt_sets.honesty_pairs()
            if data.honesty_pairs == "shipped"
            else prompt_sets.load_pairs(data.honesty_pairs, positive_field="truthful", negative_field="sycophantic")
        )
    cap = data.max_eval_prompts
    return Datasets(
        refusal_pairs=pairs,
        harmful_eval=_instructions(data.harmful_eval, prompt_sets.harmful_eval)[:cap],
        benign_eval=_instructions(data.benign_eval, prompt_sets.benign_eval)[:cap],
        mmlu=_mmlu(data.mmlu)[:cap],
        honesty_pairs=honesty,
        claims=prompt_sets.true_false_claims()[:cap],
    )


def split_pairs(pairs: PairSet, config: Config) -> tuple[PairSet, PairSet]:
    """The extraction pairs' train part and the held-out part used to score and select layers."""
    return pairs.split(1 - config.data.heldout_fraction, seed=config.data.seed)


def mc_formatter(config: Config) -> Callable[[MCQuestion], str]:
    """How four-choice questions are shown to the model (``evaluation.mmlu_prompt``)."""
    if config.evaluation.mmlu_prompt == "as_is":
        return lambda question: question.question
    return prompt_sets.format_mc_prompt


# ----------------------------------------------------------------------------------------------
# Output directory
# ----------------------------------------------------------------------------------------------


# Settings that change speed and memory only, never results (batched == one at a time, tested):
# a run that crashed out of memory may resume with fewer rows per call.
SPEED_ONLY_SETTINGS = ("generation.batch_size",)


def config_changes(previous: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``section.field`` names whose values differ, ignoring :data:`SPEED_ONLY_SETTINGS`."""
    changed = []
    for section in sorted(set(previous) | set(current)):
        old, new = previous.get(section) or {}, current.get(section) or {}
        if not isinstance(old, dict) or not isinstance(new, dict):
            if old != new:
                changed.append(section)
            continue
        for name in sorted(set(old) | set(new)):
            key = f"{section}.{name}"
            if key not in SPEED_ONLY_SETTINGS and old.get(name) != new.get(name):
                changed.append(key)
    return changed


def prepare_output_dir(
    output_dir: Path, config: Config, *, fresh: bool = False, overwrite_config: bool = False
) -> Path:
    """Create the output directory, refusing one that holds results of another config.

    ``fresh`` deletes the directory first; ``overwrite_config`` (extraction only) replaces the
    recorded config instead of comparing with it.
    """
    output_dir = Path(output_dir)
    resolved = output_dir / "config.resolved.yaml"
    if fresh and output_dir.exists():
        shutil.rmtree(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise OutputDirError(
            f"cannot write to output directory {output_dir} ({error.strerror or error}): "
            "choose a writable --output-dir"
        ) from error
    if resolved.exists() and not overwrite_config:
        changed = config_changes(yaml.safe_load(resolved.read_text()) or {}, config.to_dict())
        if changed:
            raise OutputDirError(
                f"{output_dir} holds results from a different config ({', '.join(changed)} "
                "changed): pass --fresh to start over there, or choose a new --output-dir"
            )
    else:
        atomic_write_bytes(resolved, config.to_yaml().encode())
    return output_dir


def _write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(payload, indent=2).encode())


# ----------------------------------------------------------------------------------------------
# Stage 1: extraction and layer selection
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Extraction:
    sets: dict[str, DirectionSet]
    scores: dict[str, list[LayerScore]]
    selected_key: str
    selected: LayerScore
    honesty_key: str | None = None
    honesty_selected: LayerScore | None = None
    effects: tuple[LayerEffect, ...] = ()

    @property
    def steering_set(self) -> DirectionSet:
        return self.sets[self.selected_key]


def _collect_split(
    model: HookedModel, pairs: PairSet, config: Config, *, progress: bool, label: str
) -> tuple[Activations, Activations, Activations, Activations, str]:
    train, heldout = split_pairs(pairs, config)
    texts_pos = train.positives + heldout.positives
    texts_neg = train.negatives + heldout.negatives
    def collect(texts: list[str], side: str) -> Activations:
        return collect_activations(
            model,
            texts,
            sites=config.extraction.sites,
            position=config.extraction.position,
            batch_size=config.extraction.batch_size,
            progress=progress,
            description=f"{label}: {side}",
        )

    positive, negative = collect(texts_pos, "positive"), collect(texts_neg, "negative")
    n_train = len(train)
    train_idx, held_idx = range(n_train), range(n_train, len(texts_pos))
    return (
        positive.select(train_idx),
        negative.select(train_idx),
        positive.select(held_idx),
        negative.select(held_idx),
        pairs.content_hash(),
    )


def _extract_family(
    model: HookedModel, pairs: PairSet, config: Config, *, name: str, prefix: str, progress: bool
) -> tuple[dict[str, DirectionSet], dict[str, list[LayerScore]]]:
    if len(pairs) < 4:
        raise DataError(f"{name} pairs: need at least 4 pairs to hold some out, got {len(pairs)}")
    train_pos, train_neg, held_pos, held_neg, digest = _collect_split(
        model, pairs, config, progress=progress, label=name
    )
    sets: dict[str, DirectionSet] = {}
    scores: dict[str, list[LayerScore]] = {}
    for method in config.extraction.methods:
        for site in config.extraction.sites:
            key = f"{prefix}{method}_{site}"
            sets[key] = compute_directions(
                train_pos,
                train_neg,
                site=site,
                method=method,
                model=model,
                position_rule=config.extraction.position,
                prompt_hash=digest,
                name=name,
            )
            scores[key] = score_layers(
                sets[key], held_pos, held_neg, train_positive=train_pos, train_negative=train_neg
            )
    return sets, scores


def extract(
    model: HookedModel, config: Config, datasets: Datasets, output_dir: Path, *, progress: bool = True
) -> Extraction:
    """Compute, score and save every direction set; select the steering (position, layer)."""
    sets, scores = _extract_family(
        model, datasets.refusal_pairs, config, name="refusal", prefix="", progress=progress
    )
    key = f"{config.extraction.method}_{config.extraction.site}"
    selected = select_layer(
        scores[key], n_layers=model.n_layers, max_layer_fraction=config.extraction.max_layer_fraction
    )
    effects: list[LayerEffect] = []
    if config.extraction.selection == "effect":
        _, heldout = split_pairs(datasets.refusal_pairs, config)
        effects = layer_effects(
            model,
            sets[key],
            scores[key],
            harmful=heldout.positives,
            harmless=heldout.negatives,
            max_layer_fraction=config.extraction.max_layer_fraction,
            site=config.extraction.site,
            batch_size=config.extraction.batch_size,
            max_candidates=config.extraction.selection_candidates,
        )
        chosen = select_by_effect(effects, max_kl=config.extraction.max_kl)
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
        honesty_key = f"honesty_{key}"
        honesty_selected = select_layer(
            scores[honesty_key], n_layers=model.n_layers,
            max_layer_fraction=config.extraction.max_layer_fraction,
        )
    result = Extraction(sets, scores, key, selected, honesty_key, honesty_selected, tuple(effects))
    save_extraction(result, output_dir / "directions")
    return result


def save_extraction(extraction: Extraction, directory: Path) -> None:
    for key, direction_set in extraction.sets.items():
        direction_set.save(directory / key)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["set", *LayerScore.__dataclass_fields__])
    writer.writeheader()
    for key, rows in extraction.scores.items():
        for score in rows:
            writer.writerow({"set": key, **score.as_row()})
    atomic_write_bytes(directory / "scores.csv", buffer.getvalue().encode())
    if extraction.effects:
        buffer = io.StringIO()
        effect_rows = [effect.as_row() for effect in extraction.effects]
        writer = csv.DictWriter(buffer, fieldnames=list(effect_rows[0]))
        writer.writeheader()
        writer.writerows(effect_rows)
        atomic_write_bytes(directory / "layer_effects.csv", buffer.getvalue().encode())
    selected = {
        "set": extraction.selected_key,
        **extraction.selected.as_row(),
        "rule": "effect" if extraction.effects else "separation",
    }
    if extraction.honesty_key and extraction.honesty_selected:
        selected["honesty"] = {"set": extraction.honesty_key, **extraction.honesty_selected.as_row()}
    _write_json(directory / "selected.json", selected)


def load_extraction(directory: Path, *, model: HookedModel) -> Extraction:
    """Read back what :func:`save_extraction` wrote (used when a run resumes)."""
    selected = json.loads((directory / "selected.json").read_text())
    scores: dict[str, list[LayerScore]] = {}
    with open(directory / "scores.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            probe = row["probe_accuracy"]
            scores.setdefault(row["set"], []).append(
                LayerScore(
                    position=row["position"],
                    layer=int(row["layer"]),
                    separation_accuracy=float(row["separation_accuracy"]),
                    auroc=float(row["auroc"]),
                    effect_size=float(row["effect_size"]),
                    probe_accuracy=float(probe) if probe else None,
                )
            )
    sets = {key: DirectionSet.load(directory / key, model=model) for key in scores}

    def pick(record: dict[str, Any]) -> LayerScore:
        return next(
            s for s in scores[record["set"]]
            if s.layer == record["layer"] and s.position == record["position"]
        )

    honesty = selected.get("honesty")
    effects: list[LayerEffect] = []
    if (directory / "layer_effects.csv").exists():
        with open(directory / "layer_effects.csv", newline="") as handle:
            for row in csv.DictReader(handle):
                effects.append(
                    LayerEffect(
                        position=row["position"],
                        layer=int(row["layer"]),
                        separation_accuracy=float(row["separation_accuracy"]),
                        ablation_kl=float(row["ablation_kl"]),
                        bypass=float(row["bypass"]),
                        induce=float(row["induce"]),
                    )
                )
    return Extraction(
        sets=sets,
        scores=scores,
        selected_key=selected["set"],
        selected=pick(selected),
        honesty_key=honesty["set"] if honesty else None,
        honesty_selected=pick(honesty) if honesty else None,
        effects=tuple(effects),
    )


def load_selected(directions_dir: Path, *, model: HookedModel | None = None) -> tuple[DirectionSet, dict[str, Any]]:
    """The steering DirectionSet and its selection record from an extraction directory.

    ``directions_dir`` may be the ``directions`` folder of a run, the run folder itself, or one
    DirectionSet folder (then its best layer is taken from a sibling ``selected.json`` if any).
    """
    directions_dir = Path(directions_dir)
    for candidate in (directions_dir, directions_dir / "directions"):
        selected_path = candidate / "selected.json"
        if selected_path.exists():
            try:
                selected = json.loads(selected_path.read_text())
            except json.JSONDecodeError as error:
                raise DataError(f"{selected_path} is corrupt ({error}): re-run `refusal-dir extract`") from error
            return DirectionSet.load(candidate / selected["set"], model=model), selected
    direction_set = DirectionSet.load(directions_dir, model=model)
    return direction_set, {"set": directions_dir.name, "layer": None, "position": direction_set.meta.positions[-1]}


# ----------------------------------------------------------------------------------------------
# Stage 2: the sweep
# ----------------------------------------------------------------------------------------------


def steering_interventions(
    direction_set: DirectionSet,
    *,
    method: str,
    layer: int,
    position: str,
    alphas: Sequence[float],
    config: Config,
    model: HookedModel | None = None,
    gate_prompts: Sequence[str] = (),
    condition: Condition | None = None,
) -> list[Intervention]:
    """One intervention whose coefficient differs per row (``alphas`` has one value per row).

    ``conditional`` also needs the model, the condition and the prompt of every row to gate.
    """
    if method == "conditional":
        if model is None or condition is None or len(gate_prompts) != len(alphas):
            raise ConfigError("conditional steering needs the model, a condition and one prompt per row")
        return [
            conditional_addition(
                model, gate_prompts, condition, direction_set, layer=layer, alpha=list(alphas),
                site=config.extraction.site, unit=config.steering.unit,
                positions=config.steering.positions, position=position,
            )
        ]
    if method == "addition":
        return [
            addition(
                direction_set,
                layer=layer,
                alpha=list(alphas),
                site=config.extraction.site,
                unit=config.steering.unit,  # type: ignore[arg-type]
                positions=config.steering.positions,
                position=position,
            )
        ]
    if method == "ablation":
        return [ablation(direction_set, direction_layer=layer, position=position, strength=list(alphas))]
    raise ConfigError(f"unknown steering method {method!r}: choose addition, ablation or conditional")


def _rows_for(
    values_per_alpha: dict[float, list[float]], *, method: str, layer: int, metric: str, config: Config
) -> list[dict[str, Any]]:
    rows = []
    for alpha, values in values_per_alpha.items():
        low, high = stats.bootstrap_ci(
            values, n_resamples=config.evaluation.bootstrap_resamples, seed=config.evaluation.seed
        )
        rows.append(
            {
                "method": method,
                "layer": layer,
                "alpha": alpha,
                "metric": metric,
                "value": float(sum(values) / len(values)),
                "ci_low": low,
                "ci_high": high,
                "n": len(values),
            }
        )
    return rows


def _split(values: Sequence[Any], alphas: Sequence[float], n: int) -> dict[float, list[Any]]:
    return {alpha: list(values[i * n : (i + 1) * n]) for i, alpha in enumerate(alphas)}


METRIC_GROUPS = ("harmful_generation", "benign_generation", "refusal_score", "mmlu", "kl", "honesty")


@dataclass
class SweepContext:
    model: HookedModel
    config: Config
    datasets: Datasets
    extraction: Extraction
    progress: bool = True

    _conditions: dict[tuple[int, str], Condition] = field(default_factory=dict)

    def condition(self, layer: int, position: str) -> Condition:
        """The gate for conditional steering, fit once on the held-out extraction pairs."""
        key = (layer, position)
        if key not in self._conditions:
            _, heldout = split_pairs(self.datasets.refusal_pairs, self.config)
            self._conditions[key] = fit_condition(
                self.model, self.extraction.steering_set, layer=layer, position=position,
                positive=heldout.positives, negative=heldout.negatives,
            )
        return self._conditions[key]

    def settings(self) -> GenerationSettings:
        return GenerationSettings(
            max_new_tokens=self.config.generation.max_new_tokens,
            batch_size=self.config.generation.batch_size,
        )


def _group_rows(ctx: SweepContext, method: str, group: str, layer: int, position: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Compute one (method, metric group) for every alpha in one batched pass."""
    alphas = ctx.config.steering.alphas
    direction_set = ctx.extraction.steering_set
    judge = judges.resolve_judge(ctx.config.evaluation.judge)

    formatter = mc_formatter(ctx.config)

    def per_row(items: Sequence[Any]) -> tuple[list[Any], list[Intervention]]:
        rows = [item for _ in alphas for item in items]
        coefficients = [alpha for alpha in alphas for _ in items]
        gate_prompts = [formatter(item) if isinstance(item, MCQuestion) else item for item in rows]
        interventions = steering_interventions(
            direction_set, method=method, layer=layer, position=position, alphas=coefficients,
            config=ctx.config, model=ctx.model, gate_prompts=gate_prompts,
            condition=ctx.condition(layer, position) if method == "conditional" else None,
        )
        return rows, interventions

    def rows_of(metric: str, values: Sequence[float], n: int) -> list[dict[str, Any]]:
        return _rows_for(_split(values, alphas, n), method=method, layer=layer, metric=metric, config=ctx.config)

    samples: dict[str, Any] = {}
    if group in ("harmful_generation", "benign_generation"):
        items = ctx.datasets.harmful_eval if group == "harmful_generation" else ctx.datasets.benign_eval
        prompts, interventions = per_row(items)
        completions = generate(ctx.model, prompts, interventions=interventions, settings=ctx.settings(), progress=ctx.progress)
        refused_flags, degenerate_flags, helpful_flags = judges.judge_completions(prompts, completions, judge=judge)
        refused = [float(x) for x in refused_flags]
        degenerate = [float(x) for x in degenerate_flags]
        samples = {str(alpha): texts[:3] for alpha, texts in _split(completions, alphas, len(items)).items()}
        if group == "harmful_generation":
            return rows_of("refusal_harmful", refused, len(items)) + rows_of("degenerate_harmful", degenerate, len(items)), samples
        helpful = [float(x) for x in helpful_flags]
        return (
            rows_of("refusal_benign", refused, len(items))
            + rows_of("helpfulness_benign", helpful, len(items))
            + rows_of("degenerate_benign", degenerate, len(items))
        ), samples
    if group == "refusal_score":
        prompts, interventions = per_row(ctx.datasets.harmful_eval)
        harmful = metrics.refusal_score(ctx.model, prompts, interventions=interventions).tolist()
        prompts, interventions = per_row(ctx.datasets.benign_eval)
        benign = metrics.refusal_score(ctx.model, prompts, interventions=interventions).tolist()
        return (
            rows_of("refusal_score_harmful", harmful, len(ctx.datasets.harmful_eval))
            + rows_of("refusal_score_benign", benign, len(ctx.datasets.benign_eval))
        ), samples
    if group == "mmlu":
        questions, interventions = per_row(ctx.datasets.mmlu)
        result = metrics.mmlu_accuracy(
            ctx.model,
            questions,
            interventions=interventions,
            scoring=ctx.config.evaluation.mmlu_scoring,  # type: ignore[arg-type]
            formatter=formatter,
        )
        n = len(ctx.datasets.mmlu)
        return (
            rows_of("mmlu_accuracy", [float(x) for x in result.per_item], n)
            + rows_of("mmlu_correct_prob", result.correct_probs, n)
        ), samples
    if group == "kl":
        reference = next_token_logits(ctx.model, ctx.datasets.benign_eval)
        prompts, interventions = per_row(ctx.datasets.benign_eval)
        kl = metrics.kl_divergence(
            ctx.model, prompts, interventions=interventions, reference_logits=reference
        )
        return rows_of("kl_benign", kl.per_prompt, len(ctx.datasets.benign_eval)), samples
    if group == "honesty":
        return ([] if method == "conditional" else _honesty_rows(ctx, method)), samples
    raise ConfigError(f"unknown metric group {group!r}")


def _honesty_rows(ctx: SweepContext, method: str) -> list[dict[str, Any]]:
    """Honesty accuracy under the honesty direction (seed 004's true/false claims)."""
    extraction = ctx.extraction
    if extraction.honesty_key is None or extraction.honesty_selected is None or not ctx.datasets.claims:
        return []
    direction_set = extraction.sets[extraction.honesty_key]
    layer, position = extraction.honesty_selected.layer, extraction.honesty_selected.position
    alphas = ctx.config.steering.alphas
    claims = [claim for _ in alphas for claim in ctx.datasets.claims]
    coefficients = [alpha for alpha in alphas for _ in ctx.datasets.claims]
    interventions = steering_interventions(
        direction_set, method=method, layer=layer, position=position, alphas=coefficients, config=ctx.config
    )
    result = metrics.honesty_accuracy(ctx.model, claims, interventions=interventions)
    n = len(ctx.datasets.claims)
    correct = [float(x) for x in result["per_item"]]
    labels = [claim.label for claim in claims]
    rows: list[dict[str, Any]] = []
    rows += _rows_for(_split(correct, alphas, n), method=f"honesty_{method}", layer=layer, metric="honesty_accuracy", config=ctx.config)
    for flag, name in ((True, "honesty_accuracy_true_claims"), (False, "honesty_accuracy_false_claims")):
        per_alpha = {
            alpha: [c for c, label in zip(values, labels[i * n : (i + 1) * n]) if label == flag]
            for i, (alpha, values) in enumerate(_split(correct, alphas, n).items())
        }
        rows += _rows_for(per_alpha, method=f"honesty_{method}", layer=layer, metric=name, config=ctx.config)
    return rows


def sweep(
    ctx: SweepContext,
    output_dir: Path,
    *,
    on_group: Callable[[str, str], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every (method, metric group), skipping the ones already finished in ``output_dir``."""
    parts = output_dir / "sweep" / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    layer = ctx.config.steering.layer
    if layer is None:
        layer = ctx.extraction.selected.layer
    if not 0 <= layer < ctx.model.n_layers:
        raise ConfigError(f"steering.layer {layer} is out of range: the model has layers 0..{ctx.model.n_layers - 1}")
    position = ctx.extraction.selected.position
    groups = [g for g in METRIC_GROUPS if g != "honesty" or ctx.config.evaluation.honesty]
    rows: list[dict[str, Any]] = []
    for method in ctx.config.steering.methods:
        for group in groups:
            part = parts / f"{method}__{group}.json"
            if part.exists():
                rows += json.loads(part.read_text())["rows"]
                continue
            if on_group is not None:
                on_group(method, group)
            group_rows, samples = _group_rows(ctx, method, group, layer, position)
            _write_json(part, {"rows": group_rows, "samples": samples})
            rows += group_rows
    write_results(rows, output_dir)
    return rows


def write_results(rows: list[dict[str, Any]], output_dir: Path) -> None:
    _write_json(output_dir / "results.json", rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(RESULT_FIELDS))
    writer.writeheader()
    for row in rows:
        writer.writerow({name: row[name] for name in RESULT_FIELDS})
    atomic_write_bytes(output_dir / "results.csv", buffer.getvalue().encode())


# ----------------------------------------------------------------------------------------------
# Stage 3: the results table
# ----------------------------------------------------------------------------------------------

TABLE_METRICS = (
    ("refusal_harmful", "refusal (harmful)"),
    ("refusal_benign", "refusal (benign)"),
    ("helpfulness_benign", "helpful (benign)"),
    ("mmlu_accuracy", "MMLU-style acc."),
    ("kl_benign", "KL (benign)"),
    ("refusal_score_harmful", "refusal score (harmful)"),
)


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "-"
    value, low, high = row["value"], row["ci_low"], row["ci_high"]
    if any(isinstance(x, float) and math.isnan(x) for x in (value, low, high)):
        return "-"
    return f"{value:.2f} [{low:.2f}, {high:.2f}]"


def results_table(rows: list[dict[str, Any]]) -> str:
    """The Markdown results table: one line per (method, alpha), 95% bootstrap CIs in brackets."""
    index = {(r["method"], r["alpha"], r["metric"]): r for r in rows}
    keys = sorted({(r["method"], r["alpha"]) for r in rows if not r["method"].startswith("honesty_")})
    header = "| method | layer | alpha | " + " | ".join(label for _, label in TABLE_METRICS) + " |"
    lines = [header, "|" + "---|" * (3 + len(TABLE_METRICS))]
    layers = {(r["method"], r["alpha"]): r["layer"] for r in rows}
    for method, alpha in keys:
        cells = [_cell(index.get((method, alpha, metric))) for metric, _ in TABLE_METRICS]
        lines.append(f"| {method} | {layers[(method, alpha)]} | {alpha:+.2f} | " + " | ".join(cells) + " |")
    honesty = sorted({(r["method"], r["alpha"]) for r in rows if r["method"].startswith("honesty_")})
    if honesty:
        lines += ["", "| honesty method | layer | alpha | accuracy | true claims | false claims |", "|---|---|---|---|---|---|"]
        for method, alpha in honesty:
            cells = [
                _cell(index.get((method, alpha, metric)))
                for metric in ("honesty_accuracy", "honesty_accuracy_true_claims", "honesty_accuracy_false_claims")
            ]
            lines.append(f"| {method} | {layers[(method, alpha)]} | {alpha:+.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(rows: list[dict[str, Any]], output_dir: Path, *, extraction: Extraction | None, model_id: str, command: str) -> Path:
    lines = [
        f"# refusal_dir results: {model_id}",
        "",
        f"Command: `{command}`",
        "",
    ]
    if extraction is not None:
        s = extraction.selected
        lines += [
            f"Steering direction: `{extraction.selected_key}`, position `{s.position}`, layer {s.layer} "
            f"(held-out separation accuracy {s.separation_accuracy:.2f}, AUROC {s.auroc:.2f}).",
            "",
        ]
    lines += [
        "Rates are means over prompts with 95% bootstrap confidence intervals. `addition`: alpha x "
        "the raw mean-difference vector added at the layer; `ablation`: directional ablation of "
        "strength alpha at every layer (1 removes the component, 0 is the unsteered model); "
        "`conditional`: the addition applied only to prompts whose projection at the layer passes a "
        "threshold fit on the held-out extraction pairs.",
        "",
        results_table(rows),
        "",
    ]
    path = output_dir / "report.md"
    atomic_write_bytes(path, "\n".join(lines).encode())
    return path


def run(
    config: Config,
    output_dir: Path,
    *,
    fresh: bool = False,
    progress: bool = True,
    command: str = "refusal-dir run",
    on_stage: Callable[[str], None] | None = None,
    model: HookedModel | None = None,
) -> tuple[list[dict[str, Any]], Extraction]:
    """extract -> select layer -> sweep -> report, resuming from finished parts."""
    output_dir = prepare_output_dir(Path(output_dir), config, fresh=fresh)
    datasets = load_datasets(config)
    notify = on_stage or (lambda stage: None)
    notify("loading model")
    if model is None:
        model = load_model(
            config.model.name,
            device=None if config.model.device == "auto" else config.model.device,
            dtype=config.model.dtype,
            revision=config.model.revision,
        )
    if (output_dir / "directions" / "selected.json").exists():
        notify("loading saved directions")
        extraction = load_extraction(output_dir / "directions", model=model)
    else:
        notify("extracting directions")
        extraction = extract(model, config, datasets, output_dir, progress=progress)
    ctx = SweepContext(model, config, datasets, extraction, progress)
    rows = sweep(ctx, output_dir, on_group=lambda method, group: notify(f"sweep: {method} / {group}"))
    write_report(rows, output_dir, extraction=extraction, model_id=model.model_id, command=command)
    return rows, extraction
