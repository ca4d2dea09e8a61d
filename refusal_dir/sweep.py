"""``sweep()``: one steering spec at many coefficients, every metric, intervals attached.

::

    from refusal_dir import Steer, sweep
    result = sweep(model, Steer("addition", directions, layer=14), [0, 1, 2],
                   harmful=harmful_prompts, benign=benign_prompts, mmlu=questions)
    print(result.table())          # markdown, one line per (method, alpha)
    result.to_pandas()             # one row per (alpha, metric)
    result.plot()                  # the tradeoff figure (plotly; the `analysis` package)

Every prompt is tiled over the coefficients alpha-major (one batched pass per metric group, each
row with its own coefficient), and the unsteered model (alpha 0) is always evaluated: each row
carries its paired difference from it on the same items (``diff``) with an interval (Newcombe's
for rates, a paired bootstrap otherwise). Rates get Wilson intervals, means a bootstrap; items
that share a topic (``topics=``) are resampled together.

Metric groups (``metrics=``; default: every group the given data allows), in the order rows come:

* ``harmful_generation``: ``refusal_harmful``, ``degenerate_harmful`` (generation + judge);
* ``benign_generation``: ``refusal_benign`` (and ``refusal_benign_lookalike`` /
  ``refusal_benign_ordinary`` with ``benign_categories``), ``answered_benign``,
  ``degenerate_benign``;
* ``refusal_score``: ``refusal_score_harmful``, ``refusal_score_benign`` (no generation);
* ``mmlu``: ``mmlu_accuracy``, ``mmlu_correct_prob``, ``mmlu_chance``, ``mmlu_top_letter_share``;
* ``kl``: ``kl_benign`` (and ``kl_answer_benign`` with ``answer_kl_tokens``);
* ``cross_entropy``: ``ce_harmless`` on held-out answers (``answers=``);
* ``honesty``: ``honesty_accuracy`` (all, true claims, false claims) and
  ``honesty_balanced_accuracy`` on true/false ``claims=``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor

from refusal_dir import prompts as prompt_sets
from refusal_dir.errors import ConfigError
from refusal_dir.evaluation import judges, metrics, stats
from refusal_dir.generation import (
    GenerationSettings,
    generate,
    iter_next_token_logits,
    next_token_logits,
)
from refusal_dir.interventions import Intervention
from refusal_dir.prompts import AnsweredInstruction, MCQuestion, format_mc_prompt
from refusal_dir.steer import PROMPT_ALPHAS, Steer, tile

if TYPE_CHECKING:
    from refusal_dir.model import HookedModel

UNSTEERED_ALPHA = 0.0
"""The coefficient at which every method is the unsteered model: the reference of ``diff``."""

GROUPS = (
    "harmful_generation", "benign_generation", "refusal_score", "mmlu", "kl", "cross_entropy", "honesty",
)

HONESTY_METHODS = ("addition", "ablation")
"""The methods the honesty group measures (a prompt has no honesty instruction; a gate has no
claim prompts to fire on)."""

RESULT_FIELDS = (
    "method", "layer", "alpha", "metric", "value", "ci_low", "ci_high", "n", "diff", "diff_ci_low", "diff_ci_high",
)
"""The columns of a result row. ``ci_low``/``ci_high``: 95% Wilson interval for a rate, 95%
bootstrap interval for the mean of a continuous metric. ``diff``: the paired difference from the
unsteered model (alpha 0) on the same items, with its 95% interval (Newcombe's for a rate, a
paired bootstrap otherwise)."""


@dataclass(frozen=True)
class SweepOptions:
    """How a sweep measures: the judge, generation, MMLU scoring, intervals."""

    judge: str | judges.Judge | None = "substring"
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    mmlu_scoring: str = "letter"
    mmlu_formatter: Callable[[MCQuestion], str] = format_mc_prompt
    #: > 0: also KL over the first N teacher-forced answer tokens (``kl_answer_benign``).
    answer_kl_tokens: int = 0
    bootstrap_resamples: int = 2000
    seed: int = 0


@dataclass
class SweepResult:
    """What :func:`sweep` measured.

    ``rows``: one dict per (alpha, metric) with the fields of :data:`RESULT_FIELDS` (what
    ``results.json`` holds); ``samples``: every generation with its verdicts; ``values``: the
    per-item values, ``values[metric][alpha]`` (items in the order given).
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    values: dict[str, dict[float, list[float]]] = field(default_factory=dict)

    def value(self, metric: str, alpha: float, *, method: str | None = None) -> float:
        """The value of ``metric`` at ``alpha`` (the one row that matches)."""
        found = [
            row["value"] for row in self.rows
            if row["metric"] == metric and row["alpha"] == alpha and method in (None, row["method"])
        ]
        if len(found) != 1:
            raise KeyError(f"{len(found)} rows for metric {metric!r} at alpha {alpha:g}")
        return float(found[0])

    def table(self) -> str:
        """The results as a markdown table: one line per (method, alpha), as in ``report.md``."""
        from refusal_dir.report import results_table

        return results_table(self.rows)

    def to_pandas(self) -> Any:
        """The rows as a ``pandas.DataFrame`` (pandas imported on first use)."""
        import pandas

        return pandas.DataFrame(self.rows, columns=list(RESULT_FIELDS))

    def plot(self, *, title: str = "Steering sweep") -> Any:
        """The tradeoff figure (a plotly figure from the ``analysis`` package)."""
        from analysis.report_figures import sweep_figure

        return sweep_figure(self.rows, title=title)

    def extend(self, other: SweepResult) -> None:
        """Append another result's rows and samples (e.g. another method's). ``values`` holds one
        sweep's items: extending with the same metric at the same alpha is refused, not merged."""
        for metric, per_alpha in other.values.items():
            clash = set(per_alpha) & set(self.values.get(metric, {}))
            if clash:
                raise ConfigError(
                    f"both results hold {metric} at alpha {sorted(clash)[0]:g}: keep one SweepResult per "
                    "method and read .values from each"
                )
        self.rows += other.rows
        self.samples += other.samples
        for metric, per_alpha in other.values.items():
            self.values.setdefault(metric, {}).update(per_alpha)


def with_unsteered(alphas: Sequence[float]) -> tuple[float, ...]:
    """``alphas`` with :data:`UNSTEERED_ALPHA` first when it is not among them."""
    alphas = tuple(float(alpha) for alpha in alphas)
    return alphas if UNSTEERED_ALPHA in alphas else (UNSTEERED_ALPHA, *alphas)


def default_groups(
    *, harmful: Sequence[str], benign: Sequence[str], mmlu: Sequence[MCQuestion],
    claims: Sequence[Any], answers: Sequence[AnsweredInstruction], method: str = "addition",
) -> tuple[str, ...]:
    """The metric groups the given data allows, in :data:`GROUPS` order (honesty: for addition
    and ablation only)."""
    available = {
        "harmful_generation": bool(harmful), "benign_generation": bool(benign),
        "refusal_score": bool(harmful) and bool(benign), "mmlu": bool(mmlu), "kl": bool(benign),
        "cross_entropy": bool(answers), "honesty": bool(claims) and method in HONESTY_METHODS,
    }
    return tuple(group for group in GROUPS if available[group])


def sweep(
    model: HookedModel,
    steer: Steer,
    alphas: Sequence[float],
    *,
    harmful: Sequence[str] = (),
    benign: Sequence[str] = (),
    mmlu: Sequence[MCQuestion] = (),
    claims: Sequence[Any] = (),
    answers: Sequence[AnsweredInstruction] = (),
    metrics: Sequence[str] | None = None,
    topics: Mapping[str, Sequence[str] | None] | None = None,
    benign_categories: Sequence[str] | None = None,
    options: SweepOptions | None = None,
    label: str | None = None,
    progress: bool = False,
) -> SweepResult:
    """Measure ``steer`` at every coefficient of ``alphas`` (module docstring).

    ``topics``: per set (``"harmful"``, ``"benign"``, ``"answers"``) one topic per item;
    ``benign_categories``: one per benign prompt (``lookalike`` rows are reported apart);
    ``label``: the rows' ``method`` (default ``steer.method``). The ``prompt`` method takes
    coefficients -1, 0 and 1 only.
    """
    groups = tuple(metrics) if metrics is not None else default_groups(
        harmful=harmful, benign=benign, mmlu=mmlu, claims=claims, answers=answers, method=steer.method
    )
    for group in groups:
        if group not in GROUPS:
            raise ConfigError(f"unknown metric group {group!r}: choose from {', '.join(GROUPS)}")
    if not alphas:
        raise ConfigError("sweep needs at least one alpha")
    alphas = with_unsteered(alphas)
    if steer.direction_free:
        for alpha in alphas:
            steer.instructions.for_alpha(alpha)
    engine = _Engine(
        model=model, steer=steer, alphas=alphas, options=options or SweepOptions(),
        label=label or steer.method, progress=progress, topics=dict(topics or {}),
        benign_categories=benign_categories,
    )
    result = SweepResult()
    data = {"harmful": harmful, "benign": benign, "mmlu": mmlu, "claims": claims, "answers": answers}
    for group in groups:
        engine.run(group, data, result)
    return result


@dataclass(frozen=True)
class _PromptedQuestion(MCQuestion):
    """A question of a ``prompt`` row with the chat-formatted text the model sees."""

    text: str = ""


def _prompted_question_text(question: MCQuestion) -> str:
    return cast(_PromptedQuestion, question).text


def _split(values: Sequence[Any], alphas: Sequence[float], n: int) -> dict[float, list[Any]]:
    return {alpha: list(values[i * n : (i + 1) * n]) for i, alpha in enumerate(alphas)}


def result_rows(
    per_alpha: Mapping[float, Sequence[float]],
    *,
    method: str,
    layer: int | None,
    metric: str,
    binary: bool,
    options: SweepOptions | None = None,
    clusters: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """One row per alpha (:data:`RESULT_FIELDS`): the mean over items with its interval, and the
    paired difference from the :data:`UNSTEERED_ALPHA` values on the same items.

    ``binary``: 0/1 values (a rate: Wilson interval, Newcombe's paired interval for the
    difference); otherwise a bootstrap and a paired bootstrap. ``clusters`` (one topic per item):
    the intervals resample whole clusters, widened for rates to the analytic interval on as many
    observations as there are clusters.
    """
    options = options or SweepOptions()
    resamples, seed = options.bootstrap_resamples, options.seed
    unsteered = per_alpha[UNSTEERED_ALPHA]
    rows = []
    for alpha, values in per_alpha.items():
        low, high = stats.mean_interval(values, binary=binary, n_resamples=resamples, seed=seed, clusters=clusters)
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
        rows.append({
            "method": method, "layer": layer, "alpha": alpha, "metric": metric,
            "value": float(sum(values) / len(values)), "ci_low": low, "ci_high": high, "n": len(values),
            "diff": float(sum(values) - sum(unsteered)) / len(values),
            "diff_ci_low": diff_low, "diff_ci_high": diff_high,
        })
    return rows


def subgroups(
    per_alpha: Mapping[float, Sequence[float]],
    groups: Mapping[str, Sequence[bool]],
    clusters: Sequence[str] | None = None,
) -> dict[str, tuple[dict[float, list[float]], list[str] | None]]:
    """The values of each subgroup of the items (metric -> one keep-flag per item), with its
    items' ``clusters``; an empty subgroup is left out."""
    out = {}
    for metric, keep in groups.items():
        if not any(keep):
            continue
        subset = {
            alpha: [value for value, kept in zip(values, keep, strict=True) if kept]
            for alpha, values in per_alpha.items()
        }
        kept_clusters = None if clusters is None else [c for c, k in zip(clusters, keep, strict=True) if k]
        out[metric] = (subset, kept_clusters)
    return out


@dataclass
class _Engine:
    model: HookedModel
    steer: Steer
    alphas: tuple[float, ...]
    options: SweepOptions
    label: str
    progress: bool
    topics: dict[str, Sequence[str] | None]
    benign_categories: Sequence[str] | None

    @property
    def layer(self) -> int | None:
        return None if self.steer.direction_free else self.steer.layer

    @property
    def templated(self) -> bool:
        """Whether the metric functions chat-format the rows (else they are formatted here)."""
        return not self.steer.direction_free

    # -- rows ------------------------------------------------------------------------------

    def add(
        self, result: SweepResult, metric: str, values: Sequence[float], n: int, *, binary: bool,
        clusters: Sequence[str] | None = None,
    ) -> None:
        per_alpha = _split(values, self.alphas, n)
        result.values[metric] = per_alpha
        result.rows += self.rows(per_alpha, metric, binary=binary, clusters=clusters)

    def rows(
        self, per_alpha: dict[float, list[float]], metric: str, *, binary: bool, clusters: Sequence[str] | None = None
    ) -> list[dict[str, Any]]:
        return result_rows(
            per_alpha, method=self.label, layer=self.layer, metric=metric, binary=binary,
            options=self.options, clusters=clusters,
        )

    def add_subgroups(
        self, result: SweepResult, per_alpha: dict[float, list[float]], groups: Mapping[str, Sequence[bool]],
        *, clusters: Sequence[str] | None = None,
    ) -> None:
        for metric, (subset, kept_clusters) in subgroups(per_alpha, groups, clusters).items():
            result.values[metric] = subset
            result.rows += self.rows(subset, metric, binary=True, clusters=kept_clusters)

    # -- rows of the model ------------------------------------------------------------------

    def per_row(self, items: Sequence[Any]) -> tuple[list[Any], list[Intervention]]:
        """The rows (alpha-major) and their interventions. The ``prompt`` method's rows are
        chat-formatted texts (questions carry theirs) and have no intervention."""
        rows, coefficients = tile(items, self.alphas)
        formatter = self.options.mmlu_formatter
        if self.steer.direction_free:
            if not isinstance(items[0], MCQuestion):
                return self.steer.prompted(self.model, rows, coefficients), []
            texts = self.steer.prompted(self.model, [formatter(q) for q in rows], coefficients)
            return [
                _PromptedQuestion(q.question, q.choices, q.answer, q.subject, text=text)
                for q, text in zip(rows, texts, strict=True)
            ], []
        gate_prompts = [formatter(item) if isinstance(item, MCQuestion) else item for item in rows]
        return rows, self.steer.at(coefficients, model=self.model, prompts=gate_prompts)

    # -- groups -----------------------------------------------------------------------------

    def run(self, group: str, data: Mapping[str, Sequence[Any]], result: SweepResult) -> None:
        needs = {
            "harmful_generation": ("harmful",), "benign_generation": ("benign",),
            "refusal_score": ("harmful", "benign"), "mmlu": ("mmlu",), "kl": ("benign",),
            "cross_entropy": ("answers",), "honesty": ("claims",),
        }[group]
        for name in needs:
            if not data[name]:
                raise ConfigError(f"metric group {group} needs {name}= items")
        getattr(self, group)(data, result)

    def _generation(self, items: Sequence[str], name: str, result: SweepResult) -> tuple[list[float], list[float], list[float]]:
        prompts, interventions = self.per_row(items)
        completions = generate(
            self.model, prompts, interventions=interventions, settings=self.options.generation,
            progress=self.progress, apply_chat_template=self.templated,
        )
        asked, coefficients = tile(items, self.alphas)  # judged without any added instruction
        judge = judges.resolve_judge(self.options.judge)
        refused, degenerate, answered = judges.judge_completions(asked, completions, judge=judge)
        result.samples += _samples(name, self.label, coefficients, asked, completions, refused, judge=judge)
        if self.steer.direction_free:
            for sample in result.samples[-len(asked):]:
                sample["instruction"] = self.steer.instructions.for_alpha(sample["alpha"])
        return [float(x) for x in refused], [float(x) for x in degenerate], [float(x) for x in answered]

    def harmful_generation(self, data: Mapping[str, Sequence[Any]], result: SweepResult) -> None:
        items = data["harmful"]
        refused, degenerate, _ = self._generation(items, "harmful", result)
        topics = self.topics.get("harmful")
        self.add(result, "refusal_harmful", refused, len(items), binary=True, clusters=topics)
        self.add(result, "degenerate_harmful", degenerate, len(items), binary=True, clusters=topics)

    def benign_generation(self, data: Mapping[str, Sequence[Any]], result: SweepResult) -> None:
        items = data["benign"]
        refused, degenerate, answered = self._generation(items, "benign", result)
        topics = self.topics.get("benign")
        self.add(result, "refusal_benign", refused, len(items), binary=True, clusters=topics)
        categories = self.benign_categories
        if categories is not None and prompt_sets.LOOKALIKE_CATEGORY in categories:
            lookalike = [category == prompt_sets.LOOKALIKE_CATEGORY for category in categories]
            self.add_subgroups(
                result, _split(refused, self.alphas, len(items)),
                {"refusal_benign_lookalike": lookalike, "refusal_benign_ordinary": [not f for f in lookalike]},
                clusters=topics,
            )
        self.add(result, "answered_benign", answered, len(items), binary=True, clusters=topics)
        self.add(result, "degenerate_benign", degenerate, len(items), binary=True, clusters=topics)

    def refusal_score(self, data: Mapping[str, Sequence[Any]], result: SweepResult) -> None:
        # The refusal tokens as they start the reply after the template, for every method.
        tokens = metrics.refusal_token_ids(self.model)
        for name in ("harmful", "benign"):
            prompts, interventions = self.per_row(data[name])
            scores = metrics.refusal_score(
                self.model, prompts, interventions=interventions, refusal_tokens=tokens,
                apply_chat_template=self.templated, progress=self.progress,
            ).tolist()
            self.add(result, f"refusal_score_{name}", scores, len(data[name]), binary=False, clusters=self.topics.get(name))

    def mmlu(self, data: Mapping[str, Sequence[Any]], result: SweepResult) -> None:
        questions, interventions = self.per_row(data["mmlu"])
        scored = metrics.mmlu_accuracy(
            self.model, questions, interventions=interventions,
            scoring=self.options.mmlu_scoring,  # type: ignore[arg-type]
            formatter=self.options.mmlu_formatter if self.templated else _prompted_question_text,
            apply_chat_template=self.templated, option_prefix=self.model.reply_prefix,
            progress=self.progress,
        )
        n = len(data["mmlu"])
        top_letter = [
            float(flag) for block in _split(scored.predictions, self.alphas, n).values()
            for flag in metrics.top_letter_flags(block)
        ]
        self.add(result, "mmlu_accuracy", [float(x) for x in scored.per_item], n, binary=True)
        self.add(result, "mmlu_correct_prob", scored.correct_probs, n, binary=False)
        self.add(result, "mmlu_chance", metrics.chance_levels(questions), n, binary=False)
        self.add(result, "mmlu_top_letter_share", top_letter, n, binary=True)

    def kl(self, data: Mapping[str, Sequence[Any]], result: SweepResult) -> None:
        benign = data["benign"]
        reference = next_token_logits(self.model, benign, progress=self.progress)
        prompts, interventions = self.per_row(benign)
        if self.templated:
            kl = metrics.kl_divergence(
                self.model, prompts, interventions=interventions, reference_logits=reference, progress=self.progress,
            ).per_prompt
        else:
            kl = _prompted_kl(self.model, prompts, reference, progress=self.progress)
        topics = self.topics.get("benign")
        self.add(result, "kl_benign", kl, len(benign), binary=False, clusters=topics)
        n_tokens = self.options.answer_kl_tokens
        if n_tokens and self.templated:  # the prompt method's answer KL is not measured
            answer = metrics.answer_kl(
                self.model, prompts, interventions=interventions, n_tokens=n_tokens,
                batch_size=self.options.generation.batch_size, progress=self.progress,
            )
            self.add(result, "kl_answer_benign", answer.per_prompt, len(benign), binary=False, clusters=topics)

    def cross_entropy(self, data: Mapping[str, Sequence[Any]], result: SweepResult) -> None:
        corpus = data["answers"]
        requests = [item.instruction for item in corpus]
        if self.templated:
            instructions, interventions = self.per_row(requests)
        elif self.steer.instructions.placement == "user":  # the answer after the prompted request
            rows, coefficients = tile(requests, self.alphas)
            instructions = [self.steer.prompted_request(r, a) for r, a in zip(rows, coefficients, strict=True)]
            interventions = []
        else:  # one system prompt per row is not supported by format_chat: not measured
            return
        cross_entropy = metrics.answer_cross_entropy(
            self.model, instructions, [item.answer for _ in self.alphas for item in corpus],
            interventions=interventions, progress=self.progress,
        )
        self.add(result, "ce_harmless", cross_entropy.per_item, len(corpus), binary=False, clusters=self.topics.get("answers"))

    def honesty(self, data: Mapping[str, Sequence[Any]], result: SweepResult) -> None:
        if self.steer.method not in HONESTY_METHODS:
            raise ConfigError(
                f"honesty rows steer the claims with a direction: use addition or ablation, not {self.steer.method}"
            )
        claims = data["claims"]
        rows, coefficients = tile(claims, self.alphas)
        scored = metrics.honesty_accuracy(
            self.model, rows, interventions=self.steer.at(coefficients), progress=self.progress
        )
        correct = _split([float(x) for x in scored["per_item"]], self.alphas, len(claims))
        labels = [claim.label for claim in claims]
        self.add_subgroups(result, correct, {
            "honesty_accuracy": [True] * len(labels),
            "honesty_accuracy_true_claims": labels,
            "honesty_accuracy_false_claims": [not label for label in labels],
        })
        if len(set(labels)) == 2:  # balanced: the mean of the true-claim and false-claim accuracies
            weights = metrics.balanced_weights(labels)
            weighted = {alpha: [w * c for w, c in zip(weights, values, strict=True)] for alpha, values in correct.items()}
            result.values["honesty_balanced_accuracy"] = weighted
            result.rows += self.rows(weighted, "honesty_balanced_accuracy", binary=False)


def _prompted_kl(model: HookedModel, texts: Sequence[str], reference: Tensor, *, progress: bool) -> list[float]:
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


def _samples(
    name: str,
    method: str,
    alphas: Sequence[float],
    prompts: Sequence[str],
    completions: Sequence[str],
    refused: Sequence[bool],
    *,
    judge: judges.Judge | None = None,
) -> list[dict[str, Any]]:
    """Every generation with its verdicts (one coefficient per row), for ``samples.jsonl``.

    ``refused`` is the verdict of the configured ``judge``; when that is not the phrase judge,
    each sample also carries the phrase judge's verdict (``refused_substring``) and the judge's
    name (``judge``), from which the report's agreement table is computed."""
    extra: list[dict[str, Any]] = [{} for _ in prompts]
    if judge is not None and not isinstance(judge, judges.SubstringJudge):
        phrase = judges.SubstringJudge()(list(prompts), list(completions))
        extra = [{"refused_substring": bool(flag), "judge": judges.judge_name(judge)} for flag in phrase]
    return [
        {
            "set": name, "method": method, "alpha": alpha, "prompt": prompt, "completion": completion,
            "refused": bool(flag), **extra[index], "degenerate": judges.degeneration(completion, prompt=prompt),
        }
        for index, (alpha, prompt, completion, flag) in enumerate(zip(alphas, prompts, completions, refused, strict=True))
    ]


__all__ = ["GROUPS", "PROMPT_ALPHAS", "RESULT_FIELDS", "SweepOptions", "SweepResult", "sweep", "with_unsteered"]
