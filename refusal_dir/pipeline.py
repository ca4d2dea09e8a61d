"""The staged pipeline: extract -> select layer -> sweep -> report.

This module holds the output-directory guard (a different config is refused), the checks run
before the expensive stages, the resumable sweep and :func:`run`. The prompt sets are read by
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

import contextlib
import csv
import hashlib
import io
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import yaml
from torch import Tensor

from refusal_dir import prompts as prompt_sets
from refusal_dir.conditional import Condition, conditional_addition, fit_condition
from refusal_dir.config import Config
from refusal_dir.datasets import Datasets, load_datasets, mc_formatter, split_pairs
from refusal_dir.directions import DirectionSet, weights_fingerprint
from refusal_dir.errors import ConfigError, DataError, OutputDirError, short_message
from refusal_dir.evaluation import judges, metrics, stats
from refusal_dir.extraction import Extraction, extract, extraction_prompts, load_saved_extraction
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
    lock_output_dir,
    write_error,
    write_json,
)
from refusal_dir.prompts import MCQuestion
from refusal_dir.report import write_report

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


def check_resumable(output_dir: Path, config: Config) -> None:
    """Refuse (read-only, before anything is loaded) a directory holding another config's results."""
    resolved = Path(output_dir) / "config.resolved.yaml"
    if not resolved.is_file():
        return
    try:
        previous = yaml.safe_load(resolved.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise OutputDirError(
            f"{resolved} is corrupt ({short_message(error)}): pass --fresh to start over there, or "
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
