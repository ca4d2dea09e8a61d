"""The staged pipeline: extract -> select layer -> sweep -> report.

This module holds the resumable sweep and :func:`run`; the output-directory guard (a different
config is refused) is :mod:`refusal_dir.run_dir`, the checks run before the expensive stages
:mod:`refusal_dir.run_checks` (both re-exported here). The prompt sets are read by
:mod:`refusal_dir.datasets`, stage 1 (directions and the selected layer, ``OUT/directions``)
is :mod:`refusal_dir.extraction`, the layer-selection rules are :mod:`refusal_dir.selection`,
``report.md`` is written by :mod:`refusal_dir.report`.

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

import csv
import hashlib
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from refusal_dir.conditional import Condition, fit_condition
from refusal_dir.config import SPEED_ONLY_SETTINGS, Config
from refusal_dir.datasets import Datasets, load_datasets, mc_formatter, split_pairs
from refusal_dir.directions import DirectionSet, weights_fingerprint
from refusal_dir.errors import ConfigError, OutputDirError, short_message
from refusal_dir.extraction import (
    Extraction,
    check_activation_store,
    extract,
    extraction_prompts,
    load_saved_extraction,
)
from refusal_dir.generation import (
    GenerationSettings,
)
from refusal_dir.model import HookedModel, load_model
from refusal_dir.outdir import (
    atomic_write_bytes,
    check_output_dir,
    lock_output_dir,
    write_error,
    write_json,
)
from refusal_dir.report import write_report
from refusal_dir.run_checks import check_prompt_lengths as check_prompt_lengths
from refusal_dir.run_checks import check_steering_layer as check_steering_layer
from refusal_dir.run_checks import context_length as context_length
from refusal_dir.run_checks import evaluation_prompts as evaluation_prompts
from refusal_dir.run_dir import check_resumable as check_resumable
from refusal_dir.run_dir import config_changes as config_changes
from refusal_dir.run_dir import open_output_dir as open_output_dir
from refusal_dir.run_dir import prepare_output_dir as prepare_output_dir
from refusal_dir.run_dir import record_config as record_config
from refusal_dir.steer import PROMPT_ALPHAS, PromptInstructions, Steer
from refusal_dir.sweep import GROUPS, RESULT_FIELDS, SweepOptions, with_unsteered
from refusal_dir.sweep import sweep as run_sweep

RESULTS_FORMAT = 3
"""Bumped when the rows a sweep part holds change meaning or columns; part of the resume key, so
parts written by an older refusal_dir are recomputed rather than mixed in (2: anchored judge,
"answered" metric, Wilson intervals, paired differences, stratified subsamples; 3: Newcombe
intervals of paired rate differences, topic-resampled look-alike rows, ce_harmless, the prompt
method)."""


# ----------------------------------------------------------------------------------------------
# Stage 2: the sweep
# ----------------------------------------------------------------------------------------------


def swept_alphas(config: Config) -> tuple[float, ...]:
    """``steering.alphas``, with :data:`UNSTEERED_ALPHA` first when it is not among them.

    The unsteered model is always evaluated: it is what each row's paired difference is from.
    """
    return with_unsteered(config.steering.alphas)


METRIC_GROUPS = GROUPS


def sweep_options(config: Config) -> SweepOptions:
    """How the run's sweep measures (``evaluation`` and ``generation`` settings)."""
    return SweepOptions(
        judge=config.evaluation.judge,
        generation=GenerationSettings(
            max_new_tokens=config.generation.max_new_tokens, batch_size=config.generation.batch_size
        ),
        mmlu_scoring=config.evaluation.mmlu_scoring,
        mmlu_formatter=mc_formatter(config),
        answer_kl_tokens=config.evaluation.answer_kl_tokens,
        bootstrap_resamples=config.evaluation.bootstrap_resamples,
        seed=config.evaluation.seed,
    )


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

    def steer(self, method: str, layer: int, position: str, *, directions: DirectionSet | None = None) -> Steer:
        """The run's :class:`Steer` for ``method`` (``directions``: another set, e.g. honesty).

        ``steering.apply_to`` says where an addition acts; an ablation acts everywhere."""
        steering = self.config.steering
        if method == "prompt":
            return Steer("prompt", instructions=PromptInstructions(steering.prompt_induce, steering.prompt_remove, steering.prompt_as))
        return Steer(
            method, self.extraction.steering_set if directions is None else directions,
            layer=layer, token=position, site=self.config.extraction.site, unit=steering.unit,
            apply_to="all" if method == "ablation" else steering.apply_to,
            condition=self.condition(layer, position) if method == "conditional" else None,
        )


def _group_rows(ctx: SweepContext, method: str, group: str, layer: int, position: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One (method, metric group) of the run: its rows and samples (:func:`refusal_dir.sweep.sweep`).

    The ``prompt`` method's rows are :data:`PROMPT_ALPHAS`; honesty rows (``honesty_<method>``)
    steer with the honesty direction, for addition and ablation only."""
    datasets, options = ctx.datasets, sweep_options(ctx.config)
    if group == "honesty":
        extraction = ctx.extraction
        if method in ("conditional", "prompt") or extraction.honesty_key is None or extraction.honesty_selected is None or not datasets.claims:
            return [], []
        selected = extraction.honesty_selected
        steer = ctx.steer(method, selected.layer, selected.position, directions=extraction.sets[extraction.honesty_key])
        result = run_sweep(
            ctx.model, steer, swept_alphas(ctx.config), claims=datasets.claims, metrics=[group],
            options=options, label=f"honesty_{method}", progress=ctx.progress,
        )
        return result.rows, result.samples
    result = run_sweep(
        ctx.model, ctx.steer(method, layer, position),
        PROMPT_ALPHAS if method == "prompt" else swept_alphas(ctx.config),
        harmful=datasets.harmful_eval, benign=datasets.benign_eval, mmlu=datasets.mmlu,
        answers=datasets.harmless_answers or (), metrics=[group],
        topics={"harmful": datasets.harmful_topics, "benign": datasets.benign_topics, "answers": datasets.harmless_answer_topics},
        benign_categories=datasets.benign_categories, options=options, progress=ctx.progress,
    )
    return result.rows, result.samples


def write_samples(parts: Sequence[dict[str, Any]], output_dir: Path) -> None:
    """``samples.jsonl``: every generation of the sweep, its prompt and how it was judged."""
    lines = [
        json.dumps(sample, ensure_ascii=False)
        for part in parts
        if isinstance(part.get("samples"), list)
        for sample in part["samples"]
    ]
    atomic_write_bytes(output_dir / "samples.jsonl", "".join(line + "\n" for line in lines).encode())


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
    settings = config.key_dict()
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
            f"sweep part {path} is corrupt ({short_message(error)}): delete it to recompute that part, "
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
        write_json(output_dir / "resume.json", {**key, "digest": digest})
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
                write_json(part, finished[-1])
                rows += group_rows
        write_results(rows, output_dir)
        write_samples(finished, output_dir)
    return rows


def write_results(rows: list[dict[str, Any]], output_dir: Path) -> None:
    write_json(output_dir / "results.json", rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(RESULT_FIELDS))
    writer.writeheader()
    for row in rows:
        writer.writerow({name: row[name] for name in RESULT_FIELDS})
    atomic_write_bytes(output_dir / "results.csv", buffer.getvalue().encode())


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
    check_activation_store(config, output_dir)
    if not fresh:
        check_resumable(output_dir, config)
    datasets = load_datasets(config)
    notify = on_stage or (lambda stage: None)
    notify("loading model")
    if model is None:
        model = load_model(config.model.name, **config.model.load_options())
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
