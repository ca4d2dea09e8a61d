"""The staged pipeline: extract -> select layer -> sweep -> report.

Each stage writes its own artefacts inside the output directory the user gave, atomically:

```
OUT/config.resolved.yaml        the settings the run used (a different config is refused)
OUT/directions/<method>_<site>/ one DirectionSet per method and site (safetensors + JSON)
OUT/directions/honesty_<method>_<site>/  the honesty direction (when evaluation.honesty)
OUT/directions/scores.csv       per-layer scores of every set; selected.json: the chosen one
OUT/sweep/parts/*.json          one file per finished (method, metric group): resume points
OUT/results.json, results.csv   tidy rows: method, layer, alpha, metric, value, ci_low, ci_high, n,
                                diff, diff_ci_low, diff_ci_high (paired difference from alpha 0)
OUT/samples.jsonl               every generation: set, method, alpha, prompt, completion, verdicts
OUT/report.md                   the results table (figures: OUT/figures/*.html via the CLI)
```

A crash, Ctrl-C or kill loses at most the (method, metric group) in progress: the next run with
the same output directory and config resumes from the finished parts. A part is reused only
when it was written under the same *resume key* (``OUT/resume.json``): the config (less
speed-only settings), the model id and a sample of its weights, the directions (their path
and content) and the content of every prompt set; anything else is refused with one line.
Saved directions are reused by ``run`` only when extracted under the same config, weights and
pairs. Output-directory safety (marker, lock, atomic writes, what ``--fresh`` deletes) is in
:mod:`refusal_dir.outdir`.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import math
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import yaml
from torch import Tensor

from refusal_dir import prompts as prompt_sets
from refusal_dir.activations import Activations, collect_activations
from refusal_dir.conditional import Condition, conditional_addition, fit_condition
from refusal_dir.config import Config
from refusal_dir.directions import DirectionSet, compute_directions, weights_fingerprint
from refusal_dir.errors import ConfigError, DataError, DirectionMismatchError, OutputDirError
from refusal_dir.evaluation import judges, metrics, stats
from refusal_dir.generation import (
    GenerationSettings,
    generate,
    iter_next_token_logits,
    next_token_logits,
)
from refusal_dir.interventions import Intervention, ablation, addition
from refusal_dir.model import HookedModel, load_model
from refusal_dir.outdir import (
    atomic_write_bytes,
    check_output_dir,
    claim_output_dir,
    display_path,
    lock_output_dir,
    staging_dir,
    swap_in,
    write_error,
)
from refusal_dir.prompts import AnsweredInstruction, Claim, MCQuestion, PairSet
from refusal_dir.selection import (
    LayerEffect,
    LayerScore,
    choose_layer,
    layer_effects,
    score_layers,
    select_layer,
)

logger = logging.getLogger(__name__)

RESULT_FIELDS = (
    "method", "layer", "alpha", "metric", "value", "ci_low", "ci_high", "n",
    "diff", "diff_ci_low", "diff_ci_high",
)
"""The columns of a result row. ``ci_low``/``ci_high``: 95% Wilson interval for a rate, 95%
bootstrap interval for the mean of a continuous metric. ``diff``: the paired difference from the
unsteered model (alpha 0) on the same prompts, with its 95% paired bootstrap interval."""

RESULTS_FORMAT = 2
"""Bumped when the rows a sweep part holds change meaning or columns; part of the resume key, so
parts written by an older refusal_dir are recomputed rather than mixed in (2: anchored judge,
"answered" metric, Wilson intervals, paired differences, stratified subsamples)."""

UNSTEERED_ALPHA = 0.0
"""The coefficient at which every method is the unsteered model: the reference of ``diff``."""

PROMPT_ALPHAS = (-1.0, UNSTEERED_ALPHA, 1.0)
"""The rows of the ``prompt`` method, whatever ``steering.alphas``: -1 asks the model to answer
everything (``steering.prompt_remove``), 0 is the plain prompt, +1 asks it to refuse
(``steering.prompt_induce``)."""


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
    #: The category of each benign_eval prompt, when its source has them (the shipped set:
    #: "lookalike" or a topic); None otherwise.
    benign_categories: list[str] | None = None
    #: The ``topic`` of each harmful_eval / benign_eval prompt when its file gives every row one
    #: (prompts sharing a topic are not independent: their intervals resample topics).
    harmful_topics: list[str] | None = None
    benign_topics: list[str] | None = None
    #: Instructions with answers whose cross-entropy is measured (``evaluation.cross_entropy``;
    #: None when it is off), and their topics (clusters of the interval) when every item has one.
    harmless_answers: list[AnsweredInstruction] | None = None
    harmless_answer_topics: list[str] | None = None

    def content_hashes(self) -> dict[str, str | None]:
        """A short content hash of every prompt set (what the results depend on)."""

        def digest(value: Any) -> str:
            text = json.dumps(value, ensure_ascii=False, sort_keys=True, default=repr)
            return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

        return {
            "refusal_pairs": self.refusal_pairs.content_hash(),
            "harmful_eval": digest(self.harmful_eval),
            "benign_eval": digest(self.benign_eval),
            "benign_categories": digest(self.benign_categories),
            "topics": digest([self.harmful_topics, self.benign_topics]),
            "mmlu": digest([[q.question, list(q.choices), q.answer] for q in self.mmlu]),
            "honesty_pairs": self.honesty_pairs.content_hash() if self.honesty_pairs else None,
            "claims": digest([[c.text, c.label] for c in self.claims]),
            "harmless_answers": None if self.harmless_answers is None else digest(
                [[[a.instruction, a.answer] for a in self.harmless_answers], self.harmless_answer_topics]
            ),
        }


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


def _categories(
    source: str, shipped: Callable[[], list[str]] | None, *, field: str = "category"
) -> list[str] | None:
    """The ``field`` of every item of a set: ``shipped()`` for the shipped set (None: it has
    none), read from a local file, None for hub sets or a file whose rows lack it."""
    if source == "shipped":
        return shipped() if shipped is not None else None
    if source.startswith("hub:"):
        return None
    return prompt_sets.load_categories(source, field=field)


def _answered(source: str) -> list[AnsweredInstruction]:
    if source == "shipped":
        return prompt_sets.harmless_answers()
    return prompt_sets.load_answered_instructions(source)


def _kept(keys: Sequence[str], categories: Sequence[str] | None, config: Config) -> list[int]:
    """Which items ``data.max_eval_prompts`` keeps: all, or a seeded sample stratified by category."""
    cap = config.data.max_eval_prompts
    if cap is None:
        return list(range(len(keys)))
    return prompt_sets.stratified_sample(keys, categories, cap, seed=config.data.seed)


def _pick(items: Sequence[Any], indices: Sequence[int]) -> list[Any]:
    return [items[index] for index in indices]


def load_datasets(config: Config) -> Datasets:
    """Read every prompt set the config names (shipped sets, local files or hub sets).

    With ``data.max_eval_prompts``, each evaluation set keeps a sample of that many items,
    seeded by ``data.seed`` and stratified by category (instructions' ``category`` field,
    questions' subject, claims' label), so a cap keeps look-alike and ordinary benign prompts
    in their proportions instead of the first lines of a file sorted by category.
    """
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
    harmful = _instructions(data.harmful_eval, prompt_sets.harmful_eval)
    benign = _instructions(data.benign_eval, prompt_sets.benign_eval)
    benign_categories = _categories(data.benign_eval, prompt_sets.benign_eval_categories)
    benign_kept = _kept(benign, benign_categories, config)
    harmful_kept = _kept(harmful, _categories(data.harmful_eval, prompt_sets.harmful_eval_categories), config)
    harmful_topics = _categories(data.harmful_eval, None, field="topic")
    benign_topics = _categories(data.benign_eval, None, field="topic")
    mmlu = _mmlu(data.mmlu)
    claims = prompt_sets.true_false_claims()
    answered: list[AnsweredInstruction] | None = None
    answered_topics: list[str] | None = None
    if config.evaluation.cross_entropy:
        answered = _answered(data.harmless_answers)
        answered_topics = _categories(data.harmless_answers, prompt_sets.harmless_answer_topics, field="topic")
        answered_kept = _kept([a.instruction for a in answered], answered_topics, config)
        answered = _pick(answered, answered_kept)
        answered_topics = None if answered_topics is None else _pick(answered_topics, answered_kept)
    return Datasets(
        refusal_pairs=pairs,
        harmful_eval=_pick(harmful, harmful_kept),
        benign_eval=_pick(benign, benign_kept),
        mmlu=_pick(mmlu, _kept([q.question for q in mmlu], [q.subject for q in mmlu], config)),
        honesty_pairs=honesty,
        claims=_pick(claims, _kept([c.text for c in claims], [str(c.label) for c in claims], config)),
        benign_categories=None if benign_categories is None else _pick(benign_categories, benign_kept),
        harmful_topics=None if harmful_topics is None else _pick(harmful_topics, harmful_kept),
        benign_topics=None if benign_topics is None else _pick(benign_topics, benign_kept),
        harmless_answers=answered,
        harmless_answer_topics=answered_topics,
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


def _short(error: BaseException) -> str:
    text = str(error).strip().replace("\n", " ")
    return text[:160] or type(error).__name__


def check_resumable(output_dir: Path, config: Config) -> None:
    """Refuse (read-only, before anything is loaded) a directory holding another config's results."""
    resolved = Path(output_dir) / "config.resolved.yaml"
    if not resolved.is_file():
        return
    try:
        previous = yaml.safe_load(resolved.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise OutputDirError(
            f"{resolved} is corrupt ({_short(error)}): pass --fresh to start over there, or "
            "choose a new --output-dir"
        ) from error
    if not isinstance(previous, dict):
        raise OutputDirError(
            f"{resolved} is corrupt (not a mapping of sections): pass --fresh to start over "
            "there, or choose a new --output-dir"
        )
    changed = config_changes(previous, config.to_dict())
    if changed:
        raise OutputDirError(
            f"{output_dir} holds results from a different config ({', '.join(changed)} "
            "changed): pass --fresh to start over there, or choose a new --output-dir"
        )


def record_config(output_dir: Path, config: Config) -> None:
    atomic_write_bytes(Path(output_dir) / "config.resolved.yaml", config.to_yaml().encode())


@contextlib.contextmanager
def open_output_dir(
    output_dir: Path,
    config: Config,
    *,
    fresh: bool = False,
    overwrite_config: bool = False,
    protect: Iterable[Path | str] = (),
) -> Iterator[Path]:
    """Claim the output directory for a run and hold its lock until the block ends.

    Validates it (:func:`refusal_dir.outdir.check_output_dir`), refuses one that holds
    results of another config, then with ``fresh`` empties it (a refusal-dir directory only).
    Call it after every other input was validated. ``overwrite_config`` (extraction) skips
    the config comparison and leaves recording the config to the caller.
    """
    with claim_output_dir(output_dir, fresh=fresh, protect=protect) as directory:
        if not overwrite_config:
            if not fresh:
                check_resumable(directory, config)
            if not (directory / "config.resolved.yaml").exists():
                record_config(directory, config)
        yield directory


def prepare_output_dir(
    output_dir: Path,
    config: Config,
    *,
    fresh: bool = False,
    overwrite_config: bool = False,
    protect: Iterable[Path | str] = (),
) -> Path:
    """:func:`open_output_dir` without holding the lock afterwards (each stage takes it again)."""
    with open_output_dir(
        output_dir, config, fresh=fresh, overwrite_config=overwrite_config, protect=protect
    ) as directory:
        return directory


# ----------------------------------------------------------------------------------------------
# Checks before the expensive stages
# ----------------------------------------------------------------------------------------------


def check_steering_layer(config: Config, model: HookedModel) -> None:
    """Steering settings that depend on the model: the layer, and (``prompt`` method with
    ``steering.prompt_as: system``) a chat template with a system role."""
    layer = config.steering.layer
    if layer is not None and not 0 <= layer < model.n_layers:
        raise ConfigError(
            f"steering.layer {layer} is out of range: the model has layers 0..{model.n_layers - 1}"
        )
    if "prompt" in config.steering.methods and config.steering.prompt_as == "system":
        model.format_prompts(["Hi"], system=config.steering.prompt_induce)


def context_length(model: HookedModel) -> int | None:
    """Tokens the model can attend to (its position embeddings and tokenizer limit), if known."""
    limits = []
    text_config = model.hf.config.get_text_config()
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(text_config, name, None)
        if isinstance(value, int) and value > 0:
            limits.append(value)
            break
    tokenizer_limit = getattr(model.tokenizer, "model_max_length", None)
    if isinstance(tokenizer_limit, int) and 0 < tokenizer_limit < 10**9:
        limits.append(tokenizer_limit)
    return min(limits) if limits else None


def check_prompt_lengths(
    model: HookedModel, prompt_sets: Mapping[str, Sequence[str]], *, max_new_tokens: int
) -> None:
    """Refuse prompts whose chat-formatted tokens plus ``max_new_tokens`` exceed the context.

    Nothing is truncated: a longer prompt would be run past the positions the model was
    trained on and give garbage without an error.
    """
    limit = context_length(model)
    if limit is None:
        return
    for name, prompts in prompt_sets.items():
        if not prompts:
            continue
        texts = model.format_prompts(list(prompts))
        encoded = model.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        for index, ids in enumerate(encoded):
            if len(ids) + max_new_tokens > limit:
                raise DataError(
                    f"{name} item {index + 1} is {len(ids)} tokens long with the chat template; "
                    f"with {max_new_tokens} new tokens that exceeds the model's context of "
                    f"{limit} tokens: shorten or remove it"
                )


def evaluation_prompts(datasets: Datasets, config: Config) -> dict[str, list[str]]:
    """Every evaluation prompt by set name, as the model sees it (questions formatted)."""
    formatter = mc_formatter(config)
    prompts = {
        f"data.harmful_eval ({config.data.harmful_eval})": datasets.harmful_eval,
        f"data.benign_eval ({config.data.benign_eval})": datasets.benign_eval,
        f"data.mmlu ({config.data.mmlu})": [formatter(q) for q in datasets.mmlu],
    }
    if config.evaluation.honesty:
        prompts["true/false claims"] = [prompt_sets.format_claim_prompt(c) for c in datasets.claims]
    if "prompt" in config.steering.methods:
        for name in ("prompt_induce", "prompt_remove"):
            instruction = getattr(config.steering, name)
            for set_name, texts in list(prompts.items())[:3]:
                prompts[f"{set_name} after steering.{name}"] = [f"{instruction}\n\n{t}" for t in texts]
    if datasets.harmless_answers is not None:
        # The answer is read after the instruction: both must fit (checked as one prompt).
        prompts[f"data.harmless_answers ({config.data.harmless_answers})"] = [
            f"{a.instruction}\n{a.answer}" for a in datasets.harmless_answers
        ]
    return prompts


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


def _write_json(path: Path, payload: Any) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise write_error(path, error) from error
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
    selection: dict[str, Any] | None = None
    """Which rule chose the layer (:meth:`LayerSelection.as_record`); None: by separation."""

    @property
    def steering_set(self) -> DirectionSet:
        return self.sets[self.selected_key]


def _collect_split(
    model: HookedModel, pairs: PairSet, config: Config, *, progress: bool, label: str
) -> tuple[Activations, Activations, Activations, Activations, list[str]]:
    """Train and held-out activations of both sides, and each held-out pair's group."""
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
                sets[key], held_pos, held_neg, train_positive=train_pos, train_negative=train_neg,
                groups=groups,
            )
    return sets, scores


def extraction_key(config: Config, model: HookedModel, datasets: Datasets) -> str:
    """What an extraction depends on: its settings, the model's weights and the pairs."""
    settings = config.to_dict()
    record = {
        "model": settings["model"],
        "data": {k: settings["data"][k] for k in ("refusal_pairs", "honesty_pairs", "heldout_fraction", "seed")},
        "extraction": settings["extraction"],
        "honesty": config.evaluation.honesty,
        "weights": weights_fingerprint(model),
        "pairs": datasets.refusal_pairs.content_hash(),
        "honesty_pairs": datasets.honesty_pairs.content_hash() if datasets.honesty_pairs else None,
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


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
    key = f"{config.extraction.method}_{config.extraction.site}"
    selected = select_layer(
        scores[key], n_layers=model.n_layers, max_layer_fraction=config.extraction.max_layer_fraction
    )
    effects: list[LayerEffect] = []
    selection: dict[str, Any] | None = None
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
            max_prompts=config.extraction.selection_prompts,
            progress=progress,
        )
        choice = choose_layer(effects, max_kl=config.extraction.max_kl)
        selection = choice.as_record()
        chosen = choice.chosen
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
    return Extraction(
        sets, scores, key, selected, honesty_key, honesty_selected, tuple(effects), selection
    )


def save_extraction(extraction: Extraction, directory: Path, *, key: str | None = None) -> None:
    """Write every set, ``scores.csv``, ``layer_effects.csv`` and, last, ``selected.json``.

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
    if extraction.effects:
        buffer = io.StringIO()
        effect_rows = [effect.as_row() for effect in extraction.effects]
        writer = csv.DictWriter(buffer, fieldnames=list(effect_rows[0]))
        writer.writeheader()
        writer.writerows(effect_rows)
        atomic_write_bytes(directory / "layer_effects.csv", buffer.getvalue().encode())
    selected: dict[str, Any] = {
        "set": extraction.selected_key,
        **extraction.selected.as_row(),
        "rule": "effect" if extraction.effects else "separation",
    }
    if extraction.selection is not None:
        selected["selection"] = extraction.selection
    if extraction.honesty_key and extraction.honesty_selected:
        selected["honesty"] = {"set": extraction.honesty_key, **extraction.honesty_selected.as_row()}
    if key is not None:
        selected["extraction_key"] = key
    _write_json(directory / "selected.json", selected)


def _read_csv(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            missing = [name for name in required if name not in (reader.fieldnames or [])]
    except FileNotFoundError as error:
        raise DataError(f"{path} is missing: re-run `refusal-dir extract`") from error
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{path} is unreadable ({_short(error)}): re-run `refusal-dir extract`") from error
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
            raise DataError(f"{path} line {number} is malformed ({_short(error)}): re-run `refusal-dir extract`") from error
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
        raise DataError(f"{path} is corrupt ({_short(error)}): re-run `refusal-dir extract`") from error
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
                apply_to=config.steering.positions, token=position,
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
                apply_to=config.steering.positions,
                token=position,
            )
        ]
    if method == "ablation":
        return [ablation(direction_set, layer=layer, token=position, alpha=list(alphas))]
    if method == "prompt":
        raise ConfigError("the prompt method steers with instructions, not a direction: use prompted_texts")
    raise ConfigError(f"unknown steering method {method!r}: choose addition, ablation or conditional")


def swept_alphas(config: Config) -> tuple[float, ...]:
    """``steering.alphas``, with :data:`UNSTEERED_ALPHA` first when it is not among them.

    The unsteered model is always evaluated: it is what each row's paired difference is from.
    """
    alphas = config.steering.alphas
    return alphas if UNSTEERED_ALPHA in alphas else (UNSTEERED_ALPHA, *alphas)


def prompt_instructions(config: Config) -> dict[float, str | None]:
    """The instruction of each :data:`PROMPT_ALPHAS` row (None: the plain prompt)."""
    return {-1.0: config.steering.prompt_remove, UNSTEERED_ALPHA: None, 1.0: config.steering.prompt_induce}


def prompted_texts(
    model: HookedModel, prompts: Sequence[str], instructions: Sequence[str | None], *, config: Config
) -> list[str]:
    """Each prompt chat-formatted with its row's instruction (None: as every method formats it).

    ``steering.prompt_as: user`` puts ``"{instruction}\n\n{prompt}"`` in the user turn (every
    template); ``system`` makes the instruction the system prompt, after the model's own if it
    has one (a template without a system role raises :class:`ConfigError`).
    """
    texts = []
    for prompt, instruction in zip(prompts, instructions, strict=True):
        if instruction is None:
            texts += model.format_prompts([prompt])
        elif config.steering.prompt_as == "user":
            texts += model.format_prompts([f"{instruction}\n\n{prompt}"])
        else:
            own = model.system_prompt
            system = instruction if not own else f"{own}\n\n{instruction}"
            texts += model.format_prompts([prompt], system=system)
    return texts


@dataclass(frozen=True)
class _PromptedQuestion(MCQuestion):
    """A question of a ``prompt`` row with the chat-formatted text the model sees."""

    text: str = ""


def _prompted_question_text(question: MCQuestion) -> str:
    """The formatter of the ``prompt`` method's questions: each is a :class:`_PromptedQuestion`."""
    return cast(_PromptedQuestion, question).text


def _prompted_kl(
    model: HookedModel, texts: Sequence[str], reference: Tensor, *, progress: bool
) -> list[float]:
    """KL(unprompted || prompted) of the next token, row ``i`` against ``reference[i % n]``
    (the unprompted logits of the distinct prompts), one batch of logits at a time."""
    values: list[float] = []
    chunks = iter_next_token_logits(model, texts, apply_chat_template=False, progress=progress)
    try:
        for rows, logits in chunks:
            base = reference[torch.arange(rows.start, rows.stop) % reference.shape[0]]
            values += [float(value) for value in metrics.kl_from_logits(base, logits)]
    finally:
        chunks.close()
    return values


def _rows_for(
    values_per_alpha: dict[float, list[float]],
    *,
    method: str,
    layer: int | None,
    metric: str,
    binary: bool,
    config: Config,
    clusters: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """One row per alpha: the mean over items with its interval, and the paired difference from
    the :data:`UNSTEERED_ALPHA` row on the same items.

    ``binary``: the values are 0/1 judgements (a rate: Wilson interval, and Newcombe's paired
    interval for the difference); otherwise continuous (bootstrap, and a paired bootstrap for the
    difference). With ``clusters`` (the items' topics) the intervals resample whole clusters,
    widened for rates to the analytic interval on as many observations as there are clusters.
    """
    resamples, seed = config.evaluation.bootstrap_resamples, config.evaluation.seed
    unsteered = values_per_alpha[UNSTEERED_ALPHA]
    rows = []
    for alpha, values in values_per_alpha.items():
        low, high = stats.mean_interval(
            values, binary=binary, n_resamples=resamples, seed=seed, clusters=clusters
        )
        if alpha == UNSTEERED_ALPHA:
            diff_low, diff_high = 0.0, 0.0  # the unsteered row against itself: 0 by construction
        elif binary:
            diff_low, diff_high = stats.paired_rate_diff_interval(
                values, unsteered, n_resamples=resamples, seed=seed, clusters=clusters
            )
        else:
            diff_low, diff_high = stats.paired_bootstrap_diff(
                values, unsteered, n_resamples=resamples, seed=seed, clusters=clusters
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
                "diff": float(sum(values) - sum(unsteered)) / len(values),
                "diff_ci_low": diff_low,
                "diff_ci_high": diff_high,
            }
        )
    return rows


def _split(values: Sequence[Any], alphas: Sequence[float], n: int) -> dict[float, list[Any]]:
    return {alpha: list(values[i * n : (i + 1) * n]) for i, alpha in enumerate(alphas)}


def _subgroup_rows(
    values_per_alpha: dict[float, list[float]],
    groups: Mapping[str, Sequence[bool]],
    *,
    method: str,
    layer: int | None,
    config: Config,
    clusters: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Rows of a rate over subgroups of the items: metric name -> one keep-flag per item.

    ``clusters``: the items' topics (one per item); each subgroup's intervals resample its own
    items' topics. An empty subgroup has no rows."""
    rows: list[dict[str, Any]] = []
    for metric, keep in groups.items():
        if not any(keep):
            continue
        subset = {
            alpha: [value for value, kept in zip(values, keep, strict=True) if kept]
            for alpha, values in values_per_alpha.items()
        }
        kept_clusters = (
            None if clusters is None else [c for c, kept in zip(clusters, keep, strict=True) if kept]
        )
        rows += _rows_for(
            subset, method=method, layer=layer, metric=metric, binary=True, config=config,
            clusters=kept_clusters,
        )
    return rows


def _lookalike_rows(ctx: SweepContext, refused: dict[float, list[float]], *, method: str, layer: int | None) -> list[dict[str, Any]]:
    """Over-refusal on benign prompts worded like harmful ones, and on the others, apart."""
    categories = ctx.datasets.benign_categories
    if categories is None or prompt_sets.LOOKALIKE_CATEGORY not in categories:
        return []
    lookalike = [category == prompt_sets.LOOKALIKE_CATEGORY for category in categories]
    groups = {
        "refusal_benign_lookalike": lookalike,
        "refusal_benign_ordinary": [not flag for flag in lookalike],
    }
    return _subgroup_rows(
        refused, groups, method=method, layer=layer, config=ctx.config, clusters=ctx.datasets.benign_topics
    )


METRIC_GROUPS = ("harmful_generation", "benign_generation", "refusal_score", "mmlu", "kl", "cross_entropy", "honesty")


@dataclass
class SweepContext:
    model: HookedModel
    config: Config
    datasets: Datasets
    extraction: Extraction
    progress: bool = True
    #: Where the directions were read from (``evaluate --directions-dir``); None: the run's own.
    directions_dir: Path | None = None

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


def _group_rows(ctx: SweepContext, method: str, group: str, layer: int, position: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Compute one (method, metric group) for every alpha in one batched pass.

    The ``prompt`` method has no direction: its rows (:data:`PROMPT_ALPHAS`) are the texts of
    :func:`prompted_texts`, formatted here and run without interventions; its rows' layer is
    None.
    """
    alphas = PROMPT_ALPHAS if method == "prompt" else swept_alphas(ctx.config)
    direction_set = ctx.extraction.steering_set
    judge = judges.resolve_judge(ctx.config.evaluation.judge)
    templated = method != "prompt"  # else the rows are chat-formatted with their instruction
    row_layer = layer if templated else None

    formatter = mc_formatter(ctx.config)

    def per_row(items: Sequence[Any]) -> tuple[list[Any], list[Intervention]]:
        rows = [item for _ in alphas for item in items]
        if not templated:
            instruction = prompt_instructions(ctx.config)
            instructions = [instruction[alpha] for alpha in alphas for _ in items]
            if not isinstance(items[0], MCQuestion):
                return prompted_texts(ctx.model, rows, instructions, config=ctx.config), []
            texts = prompted_texts(ctx.model, [formatter(q) for q in rows], instructions, config=ctx.config)
            return [
                _PromptedQuestion(q.question, q.choices, q.answer, q.subject, text=text)
                for q, text in zip(rows, texts, strict=True)
            ], []
        coefficients = [alpha for alpha in alphas for _ in items]
        gate_prompts = [formatter(item) if isinstance(item, MCQuestion) else item for item in rows]
        interventions = steering_interventions(
            direction_set, method=method, layer=layer, position=position, alphas=coefficients,
            config=ctx.config, model=ctx.model, gate_prompts=gate_prompts,
            condition=ctx.condition(layer, position) if method == "conditional" else None,
        )
        return rows, interventions

    def rows_of(
        metric: str, values: Sequence[float], n: int, *, binary: bool, clusters: Sequence[str] | None = None
    ) -> list[dict[str, Any]]:
        return _rows_for(
            _split(values, alphas, n), method=method, layer=row_layer, metric=metric, binary=binary,
            config=ctx.config, clusters=clusters,
        )

    samples: list[dict[str, Any]] = []
    if group in ("harmful_generation", "benign_generation"):
        items = ctx.datasets.harmful_eval if group == "harmful_generation" else ctx.datasets.benign_eval
        prompts, interventions = per_row(items)
        completions = generate(
            ctx.model, prompts, interventions=interventions, settings=ctx.settings(),
            progress=ctx.progress, apply_chat_template=templated,
        )
        asked = [item for _ in alphas for item in items]  # judged without any added instruction
        refused_flags, degenerate_flags, answered_flags = judges.judge_completions(asked, completions, judge=judge)
        refused = [float(x) for x in refused_flags]
        degenerate = [float(x) for x in degenerate_flags]
        samples = _samples(group, method, alphas, asked, completions, refused_flags, judge=judge)
        if not templated:
            for sample in samples:
                sample["instruction"] = prompt_instructions(ctx.config)[sample["alpha"]]
        if group == "harmful_generation":
            topics = ctx.datasets.harmful_topics
            return (
                rows_of("refusal_harmful", refused, len(items), binary=True, clusters=topics)
                + rows_of("degenerate_harmful", degenerate, len(items), binary=True, clusters=topics)
            ), samples
        answered = [float(x) for x in answered_flags]
        topics = ctx.datasets.benign_topics
        return (
            rows_of("refusal_benign", refused, len(items), binary=True, clusters=topics)
            + _lookalike_rows(ctx, _split(refused, alphas, len(items)), method=method, layer=row_layer)
            + rows_of("answered_benign", answered, len(items), binary=True, clusters=topics)
            + rows_of("degenerate_benign", degenerate, len(items), binary=True, clusters=topics)
        ), samples
    if group == "refusal_score":
        # The refusal tokens as they start the reply after the template, for every method.
        tokens = metrics.refusal_token_ids(ctx.model)
        prompts, interventions = per_row(ctx.datasets.harmful_eval)
        harmful = metrics.refusal_score(
            ctx.model, prompts, interventions=interventions, refusal_tokens=tokens,
            apply_chat_template=templated, progress=ctx.progress,
        ).tolist()
        prompts, interventions = per_row(ctx.datasets.benign_eval)
        benign = metrics.refusal_score(
            ctx.model, prompts, interventions=interventions, refusal_tokens=tokens,
            apply_chat_template=templated, progress=ctx.progress,
        ).tolist()
        return (
            rows_of("refusal_score_harmful", harmful, len(ctx.datasets.harmful_eval), binary=False, clusters=ctx.datasets.harmful_topics)
            + rows_of("refusal_score_benign", benign, len(ctx.datasets.benign_eval), binary=False, clusters=ctx.datasets.benign_topics)
        ), samples
    if group == "mmlu":
        questions, interventions = per_row(ctx.datasets.mmlu)
        result = metrics.mmlu_accuracy(
            ctx.model,
            questions,
            interventions=interventions,
            scoring=ctx.config.evaluation.mmlu_scoring,  # type: ignore[arg-type]
            formatter=formatter if templated else _prompted_question_text,
            apply_chat_template=templated,
            option_prefix=ctx.model.reply_prefix,
            progress=ctx.progress,
        )
        n = len(ctx.datasets.mmlu)
        top_letter = [
            float(flag) for block in _split(result.predictions, alphas, n).values()
            for flag in metrics.top_letter_flags(block)
        ]
        return (
            rows_of("mmlu_accuracy", [float(x) for x in result.per_item], n, binary=True)
            + rows_of("mmlu_correct_prob", result.correct_probs, n, binary=False)
            + rows_of("mmlu_chance", metrics.chance_levels(questions), n, binary=False)
            + rows_of("mmlu_top_letter_share", top_letter, n, binary=True)
        ), samples
    if group == "kl":
        reference = next_token_logits(ctx.model, ctx.datasets.benign_eval, progress=ctx.progress)
        prompts, interventions = per_row(ctx.datasets.benign_eval)
        if templated:
            kl = metrics.kl_divergence(
                ctx.model, prompts, interventions=interventions, reference_logits=reference,
                progress=ctx.progress,
            ).per_prompt
        else:
            kl = _prompted_kl(ctx.model, prompts, reference, progress=ctx.progress)
        rows = rows_of("kl_benign", kl, len(ctx.datasets.benign_eval), binary=False, clusters=ctx.datasets.benign_topics)
        n_tokens = ctx.config.evaluation.answer_kl_tokens
        if n_tokens and templated:  # the prompt method's answer KL is not measured
            answer = metrics.answer_kl(
                ctx.model, prompts, interventions=interventions, n_tokens=n_tokens,
                batch_size=ctx.config.generation.batch_size, progress=ctx.progress,
            )
            rows += rows_of("kl_answer_benign", answer.per_prompt, len(ctx.datasets.benign_eval), binary=False, clusters=ctx.datasets.benign_topics)
        return rows, samples
    if group == "cross_entropy":
        corpus = ctx.datasets.harmless_answers or []
        if templated:
            instructions, interventions = per_row([item.instruction for item in corpus])
        elif ctx.config.steering.prompt_as == "user":  # the answer after the prompted request
            instruction = prompt_instructions(ctx.config)
            instructions = [
                item.instruction if instruction[alpha] is None else f"{instruction[alpha]}\n\n{item.instruction}"
                for alpha in alphas for item in corpus
            ]
            interventions = []
        else:  # one system prompt per row is not supported by format_chat: not measured
            return [], samples
        cross_entropy = metrics.answer_cross_entropy(
            ctx.model, instructions, [item.answer for _ in alphas for item in corpus],
            interventions=interventions, progress=ctx.progress,
        )
        return rows_of("ce_harmless", cross_entropy.per_item, len(corpus), binary=False, clusters=ctx.datasets.harmless_answer_topics), samples
    if group == "honesty":
        return ([] if method in ("conditional", "prompt") else _honesty_rows(ctx, method)), samples
    raise ConfigError(f"unknown metric group {group!r}")


def _samples(
    group: str,
    method: str,
    alphas: Sequence[float],
    prompts: Sequence[str],
    completions: Sequence[str],
    refused: Sequence[bool],
    *,
    judge: judges.Judge | None = None,
) -> list[dict[str, Any]]:
    """Every generation of a group with its verdicts, for ``samples.jsonl``.

    ``refused`` is the verdict of the configured ``judge``; when that is not the phrase judge,
    each sample also carries the phrase judge's verdict (``refused_substring``) and the judge's
    name (``judge``), from which the report's agreement table is computed."""
    n = len(prompts) // len(alphas)
    extra: list[dict[str, Any]] = [{} for _ in prompts]
    if judge is not None and not isinstance(judge, judges.SubstringJudge):
        phrase = judges.SubstringJudge()(list(prompts), list(completions))
        name = judges.judge_name(judge)
        extra = [{"refused_substring": bool(flag), "judge": name} for flag in phrase]
    return [
        {
            "set": group.removesuffix("_generation"),
            "method": method,
            "alpha": alphas[index // n],
            "prompt": prompt,
            "completion": completion,
            "refused": bool(flag),
            **extra[index],
            "degenerate": judges.degeneration(completion, prompt=prompt),
        }
        for index, (prompt, completion, flag) in enumerate(zip(prompts, completions, refused, strict=True))
    ]


def write_samples(parts: Sequence[dict[str, Any]], output_dir: Path) -> None:
    """``samples.jsonl``: every generation of the sweep, its prompt and how it was judged."""
    lines = [
        json.dumps(sample, ensure_ascii=False)
        for part in parts
        if isinstance(part.get("samples"), list)
        for sample in part["samples"]
    ]
    atomic_write_bytes(output_dir / "samples.jsonl", "".join(line + "\n" for line in lines).encode())


def _honesty_rows(ctx: SweepContext, method: str) -> list[dict[str, Any]]:
    """Honesty accuracy under the honesty direction (seed 004's true/false claims)."""
    extraction = ctx.extraction
    if extraction.honesty_key is None or extraction.honesty_selected is None or not ctx.datasets.claims:
        return []
    direction_set = extraction.sets[extraction.honesty_key]
    layer, position = extraction.honesty_selected.layer, extraction.honesty_selected.position
    alphas = swept_alphas(ctx.config)
    claims = [claim for _ in alphas for claim in ctx.datasets.claims]
    coefficients = [alpha for alpha in alphas for _ in ctx.datasets.claims]
    interventions = steering_interventions(
        direction_set, method=method, layer=layer, position=position, alphas=coefficients, config=ctx.config
    )
    result = metrics.honesty_accuracy(ctx.model, claims, interventions=interventions, progress=ctx.progress)
    n = len(ctx.datasets.claims)
    correct = _split([float(x) for x in result["per_item"]], alphas, n)
    labels = [claim.label for claim in ctx.datasets.claims]
    groups = {
        "honesty_accuracy": [True] * len(labels),
        "honesty_accuracy_true_claims": labels,
        "honesty_accuracy_false_claims": [not label for label in labels],
    }
    rows = _subgroup_rows(correct, groups, method=f"honesty_{method}", layer=layer, config=ctx.config)
    if len(set(labels)) == 2:  # balanced: the mean of the true-claim and false-claim accuracies
        weights = metrics.balanced_weights(labels)
        weighted = {alpha: [w * c for w, c in zip(weights, values, strict=True)] for alpha, values in correct.items()}
        rows += _rows_for(
            weighted, method=f"honesty_{method}", layer=layer, metric="honesty_balanced_accuracy",
            binary=False, config=ctx.config,
        )
    return rows


def _extraction_digest(extraction: Extraction) -> str:
    """A content hash of the directions a sweep steers with and of what was selected."""
    digest = hashlib.sha256()
    for name in sorted(extraction.sets):
        digest.update(name.encode())
        digest.update(extraction.sets[name].directions.numpy().tobytes())
        digest.update(extraction.sets[name].norms.numpy().tobytes())
    chosen = [extraction.selected_key, extraction.selected.as_row(), extraction.honesty_key]
    if extraction.honesty_selected is not None:
        chosen.append(extraction.honesty_selected.as_row())
    digest.update(json.dumps(chosen, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def results_config_digest(config: Config) -> str:
    """Hash of the config less :data:`SPEED_ONLY_SETTINGS` (what the results depend on)."""
    settings = config.to_dict()
    for key in SPEED_ONLY_SETTINGS:
        section, _, name = key.partition(".")
        settings[section].pop(name, None)
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def resume_key(ctx: SweepContext) -> dict[str, Any]:
    """Everything a sweep part depends on; a part is reused only under the same key."""
    directions = str(ctx.directions_dir.resolve()) if ctx.directions_dir is not None else "directions"
    return {
        "results_format": RESULTS_FORMAT,
        "config": results_config_digest(ctx.config),
        "model_id": ctx.model.model_id,
        "weights": weights_fingerprint(ctx.model),
        "chat": _chat_digest(ctx.model),
        "directions_dir": directions,
        "directions": _extraction_digest(ctx.extraction),
        "data": ctx.datasets.content_hashes(),
    }


def _chat_digest(model: Any) -> str:
    """The prompt format: chat template, system prompt, thinking switch, vocabulary size."""
    chat = {
        "template": model.chat_template,
        "system_prompt": model.system_prompt,
        "enable_thinking": model.enable_thinking,
        "vocabulary": len(model.tokenizer),
    }
    return hashlib.sha256(json.dumps(chat, sort_keys=True).encode()).hexdigest()[:16]


def _key_digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _key_changes(previous: Any, current: dict[str, Any]) -> list[str]:
    if not isinstance(previous, dict):
        return ["resume key"]
    changed = []
    for name, value in current.items():
        if name == "data" and isinstance(previous.get("data"), dict):
            changed += [f"data {k}" for k in value if previous["data"].get(k) != value[k]]
        elif previous.get(name) != value:
            changed.append(
                {
                    "weights": "model weights",
                    "directions": "direction content",
                    "chat": "chat template",
                    "results_format": "result format of refusal_dir",
                }.get(name, name)
            )
    return changed or ["resume key"]


def _load_part(path: Path, *, fields: Sequence[str] = ()) -> dict[str, Any]:
    """A sweep part whose rows are mappings holding ``fields`` (none: a part of an older result
    format can be read for its key)."""
    try:
        part = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as error:
        raise OutputDirError(
            f"sweep part {path} is corrupt ({_short(error)}): delete it to recompute that part, "
            "or pass --fresh"
        ) from error
    if not isinstance(part, dict) or not isinstance(part.get("rows"), list) or not all(
        isinstance(row, dict) and set(fields) <= set(row) for row in part["rows"]
    ):
        raise OutputDirError(
            f"sweep part {path} is corrupt (not a part written by refusal-dir): delete it to "
            "recompute that part, or pass --fresh"
        )
    return part


def _read_part(path: Path) -> dict[str, Any]:
    return _load_part(path, fields=RESULT_FIELDS)


def _check_parts(parts: Path, key: dict[str, Any], digest: str, output_dir: Path) -> None:
    """Refuse parts written under another resume key (another config, model, directions, data
    or result format)."""
    stale = []
    for path in sorted(parts.glob("*.json")):
        if _load_part(path).get("key") != digest:
            stale.append(path.name)
    if not stale:
        return
    try:
        previous = json.loads((output_dir / "resume.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        previous = None
    raise OutputDirError(
        f"{output_dir} holds sweep parts computed under another run ({', '.join(_key_changes(previous, key))} "
        f"changed; {len(stale)} part(s)): pass --fresh to start over there, or choose a new --output-dir"
    )


def sweep(
    ctx: SweepContext,
    output_dir: Path,
    *,
    on_group: Callable[[str, str], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every (method, metric group), reusing the ones already finished in ``output_dir``.

    Holds the directory's lock. Finished parts are reused only when they were written under
    this sweep's :func:`resume_key`; otherwise the sweep is refused before anything is computed.
    """
    output_dir = Path(output_dir)
    layer = ctx.config.steering.layer
    if layer is None:
        layer = ctx.extraction.selected.layer
    if not 0 <= layer < ctx.model.n_layers:
        raise ConfigError(f"steering.layer {layer} is out of range: the model has layers 0..{ctx.model.n_layers - 1}")
    position = ctx.extraction.selected.position
    enabled = {"honesty": ctx.config.evaluation.honesty, "cross_entropy": ctx.datasets.harmless_answers is not None}
    groups = [g for g in METRIC_GROUPS if enabled.get(g, True)]
    with lock_output_dir(output_dir):
        parts = output_dir / "sweep" / "parts"
        try:
            parts.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise write_error(parts, error) from error
        key = resume_key(ctx)
        digest = _key_digest(key)
        _check_parts(parts, key, digest, output_dir)
        _write_json(output_dir / "resume.json", {**key, "digest": digest})
        rows: list[dict[str, Any]] = []
        finished: list[dict[str, Any]] = []
        for method in ctx.config.steering.methods:
            for group in groups:
                part = parts / f"{method}__{group}.json"
                if part.exists():
                    finished.append(_read_part(part))
                    rows += finished[-1]["rows"]
                    continue
                if on_group is not None:
                    on_group(method, group)
                group_rows, samples = _group_rows(ctx, method, group, layer, position)
                finished.append({"key": digest, "rows": group_rows, "samples": samples})
                _write_json(part, finished[-1])
                rows += group_rows
        write_results(rows, output_dir)
        write_samples(finished, output_dir)
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
    ("answered_benign", "answered (benign)"),
    ("mmlu_accuracy", "MMLU-style acc."),
    ("kl_benign", "KL (benign)"),
    ("ce_harmless", "CE (harmless answers)"),
    ("refusal_score_harmful", "refusal score (harmful)"),
)

TABLE_DIFFS = (
    ("refusal_harmful", "Δ refusal (harmful)"),
    ("answered_benign", "Δ answered (benign)"),
    ("mmlu_accuracy", "Δ MMLU"),
)
"""Metrics whose paired difference from alpha 0 gets its own column."""


def _cell(row: dict[str, Any] | None, *, diff: bool = False) -> str:
    if row is None:
        return "-"
    names = ("diff", "diff_ci_low", "diff_ci_high") if diff else ("value", "ci_low", "ci_high")
    value, low, high = (row.get(name, math.nan) for name in names)
    if any(not isinstance(x, int | float) or math.isnan(x) for x in (value, low, high)):
        return "-"
    sign = "+" if diff else ""
    return f"{value:{sign}.2f} [{low:{sign}.2f}, {high:{sign}.2f}]"


def results_table(rows: list[dict[str, Any]]) -> str:
    """The Markdown results table: one line per (method, alpha), 95% intervals in brackets.

    Rates carry Wilson intervals, means of continuous values bootstrap intervals; the Δ columns
    are paired differences from alpha 0 (the unsteered model) on the same prompts.
    """
    index = {(r["method"], r["alpha"], r["metric"]): r for r in rows}
    keys = sorted({(r["method"], r["alpha"]) for r in rows if not r["method"].startswith("honesty_")})
    labels = [label for _, label in TABLE_METRICS] + [label for _, label in TABLE_DIFFS]
    header = "| method | layer | alpha | " + " | ".join(labels) + " |"
    lines = [header, "|" + "---|" * (3 + len(labels))]
    layers = {(r["method"], r["alpha"]): "-" if r["layer"] is None else r["layer"] for r in rows}
    for method, alpha in keys:
        cells = [_cell(index.get((method, alpha, metric))) for metric, _ in TABLE_METRICS]
        cells += [_cell(index.get((method, alpha, metric)), diff=True) for metric, _ in TABLE_DIFFS]
        lines.append(f"| {method} | {layers[(method, alpha)]} | {alpha:+.2f} | " + " | ".join(cells) + " |")
    honesty = sorted({(r["method"], r["alpha"]) for r in rows if r["method"].startswith("honesty_")})
    if honesty:
        lines += ["", "| honesty method | layer | alpha | accuracy | balanced accuracy | true claims | false claims |", "|---|---|---|---|---|---|---|"]
        for method, alpha in honesty:
            cells = [
                _cell(index.get((method, alpha, metric)))
                for metric in ("honesty_accuracy", "honesty_balanced_accuracy", "honesty_accuracy_true_claims", "honesty_accuracy_false_claims")
            ]
            lines.append(f"| {method} | {layers[(method, alpha)]} | {alpha:+.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chance_warnings(rows: list[dict[str, Any]]) -> list[str]:
    """One warning per method whose unsteered (alpha 0) MMLU-style interval contains chance.

    Such an accuracy cannot show that steering costs capability: the model was guessing.
    """
    index = {(r["method"], r["alpha"], r["metric"]): r for r in rows}
    warnings = []
    for (method, alpha, metric), row in sorted(index.items()):
        chance = index.get((method, alpha, "mmlu_chance"))
        if metric != "mmlu_accuracy" or alpha != 0.0 or chance is None:
            continue
        if row["ci_low"] <= chance["value"] <= row["ci_high"]:
            warnings.append(
                f"{method}: the unsteered MMLU-style accuracy {row['value']:.2f} "
                f"[{row['ci_low']:.2f}, {row['ci_high']:.2f}] contains chance "
                f"({chance['value']:.2f}); capability changes under steering are not measurable"
            )
    return warnings


def write_report(rows: list[dict[str, Any]], output_dir: Path, *, extraction: Extraction | None, model_id: str, command: str) -> Path:
    lines = [
        f"# refusal_dir results: {display_path(model_id)}",
        "",
        f"Command: `{command}`",
        "",
    ]
    for warning in chance_warnings(rows):
        logger.warning(warning)
        lines += [f"**Warning**: {warning}.", ""]
    if extraction is not None:
        s = extraction.selected
        lines += [
            f"Steering direction: `{extraction.selected_key}`, position `{s.position}`, layer {s.layer} "
            f"(held-out separation accuracy {s.separation_accuracy:.2f}, AUROC {s.auroc:.2f}).",
            "",
        ]
        if extraction.effects:
            from refusal_dir.selection import effects_table

            chosen = next(
                (e for e in extraction.effects if (e.layer, e.position) == (s.layer, s.position)), None
            )
            rule = (extraction.selection or {}).get("description", "effect")
            lines += [
                f"Layer selection rule that fired: {rule}. Every candidate, measured on the "
                "held-out extraction pairs (`*`: selected; also in `directions/layer_effects.csv`):",
                "",
                "```",
                effects_table(extraction.effects, selected=chosen),
                "```",
                "",
            ]
    lines += [
        "Rates are shares of prompts with 95% Wilson intervals; KL and refusal scores are means "
        "with 95% bootstrap intervals. Δ columns: the paired difference from alpha 0 (the "
        "unsteered model) on the same prompts, with a 95% paired bootstrap interval. `addition`: alpha x "
        "the raw mean-difference vector added at the layer; `ablation`: directional ablation of "
        "strength alpha at every layer (1 removes the component, 0 is the unsteered model); "
        "`conditional`: the addition applied only to prompts whose projection at the layer passes a "
        "threshold fit on the held-out extraction pairs; `prompt` (no direction, no layer): alpha +1 "
        "asks for a refusal in words (`steering.prompt_induce`), -1 asks for an answer "
        "(`steering.prompt_remove`), 0 is the plain prompt.",
        "",
        results_table(rows),
        "",
        "Every generation behind these rates, with its prompt and how it was judged: "
        "[`samples.jsonl`](samples.jsonl).",
        "",
    ]
    lines += judge_agreement_section(output_dir / "samples.jsonl")
    path = output_dir / "report.md"
    atomic_write_bytes(path, "\n".join(lines).encode())
    return path


def judge_agreement_section(samples_path: Path) -> list[str]:
    """The report's agreement of a model judge with the phrase judge, per set, from the
    ``refused`` and ``refused_substring`` verdicts of ``samples.jsonl`` (no lines when the run
    used the phrase judge)."""
    from refusal_dir.evaluation.agreement import agreement_markdown, agreement_rows

    try:
        samples = [json.loads(line) for line in samples_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, ValueError):
        return []
    judged = [s for s in samples if isinstance(s, dict) and "refused_substring" in s]
    if not judged:
        return []
    name = str(judged[0].get("judge", "model judge"))
    rows = agreement_rows(judged, [s["refused"] for s in judged], [s["refused_substring"] for s in judged])
    return [
        f"## Judge agreement: `{name}` against the phrase judge (`substring`)",
        "",
        "The rates above use the model judge. Counts of completions by the two verdicts, the "
        "share on which they agree, and Cohen's kappa (agreement beyond chance; `-`: undefined, "
        "one verdict throughout). Where they disagree, read the completions in `samples.jsonl`; "
        "`refusal-dir rejudge` adds the table per (method, alpha).",
        "",
        agreement_markdown(rows, judge="model", conditions=False),
        "",
    ]


def run(
    config: Config,
    output_dir: Path,
    *,
    fresh: bool = False,
    progress: bool = True,
    command: str = "refusal-dir run",
    on_stage: Callable[[str], None] | None = None,
    model: HookedModel | None = None,
    finish: Callable[[Path, list[dict[str, Any]], Extraction], None] | None = None,
) -> tuple[list[dict[str, Any]], Extraction]:
    """extract -> select layer -> sweep -> report, resuming from finished parts.

    ``finish(output_dir, rows, extraction)`` runs last, still holding the directory's lock
    (the CLI writes its figures there).

    Every input is validated (the output directory, the config against the one recorded there,
    the prompt sets, the model, the steering layer, the prompt lengths) before the directory is
    claimed, locked and, with ``fresh``, emptied.
    """
    output_dir = Path(output_dir)
    check_output_dir(output_dir, fresh=fresh)
    if not fresh:
        check_resumable(output_dir, config)
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
    check_steering_layer(config, model)
    check_prompt_lengths(model, extraction_prompts(datasets, config), max_new_tokens=0)
    check_prompt_lengths(
        model, evaluation_prompts(datasets, config), max_new_tokens=config.generation.max_new_tokens
    )
    with open_output_dir(output_dir, config, fresh=fresh) as output_dir:
        if (output_dir / "directions" / "selected.json").exists():
            notify("loading saved directions")
            extraction = load_saved_extraction(output_dir, config, model, datasets)
        else:
            notify("extracting directions")
            extraction = extract(model, config, datasets, output_dir, progress=progress)
        ctx = SweepContext(model, config, datasets, extraction, progress)
        rows = sweep(ctx, output_dir, on_group=lambda method, group: notify(f"sweep: {method} / {group}"))
        write_report(rows, output_dir, extraction=extraction, model_id=model.model_id, command=command)
        if finish is not None:
            finish(output_dir, rows, extraction)
    return rows, extraction


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
