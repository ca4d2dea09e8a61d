"""Operating-point search: layer x alpha x method under a capability limit.

Every evaluation set is split in two, deterministically: a validation half used for every
choice, and a held-out half used only to report the chosen point (tested: selection never sees
a held-out prompt). Methods: ``addition`` (alpha x raw direction at the layer), ``ablation``
(strength alpha at every layer, with the layer's direction) and ``conditional`` (addition gated
per row by the direction at the layer, threshold fit on the validation half of the extraction
pairs' held-out prompts).

For each candidate (method, layer, alpha) on validation: refusal rate on harmful prompts,
helpfulness on benign prompts, MMLU-style accuracy and KL(unsteered || steered) on benign
prompts. The Pareto frontier keeps the points no other point beats on all four at once. The
chosen point maximizes refusal subject to ``MMLU drop <= max_mmlu_drop`` (in accuracy points,
e.g. 0.01 = 1 point), ``KL <= max_kl`` and ``helpfulness drop <= max_helpfulness_drop``; ties go
to the lower KL. With no point within the limits, the unsteered model is chosen.

Every point is measured on the same validation items as the baseline, so each drop is a mean
*paired* difference. ``Limits.check`` says what must stay within a limit:

* ``"mean"`` (default): the drop itself (the point estimate);
* ``"bound"``: the upper end of the drop's 95% interval (Newcombe's paired interval for the
  MMLU and helpfulness rates, the bootstrap for the mean KL): "we are confident the loss is at
  most the limit". Strict on small sets: with a few dozen questions the upper bound of a paired
  MMLU drop is several points even when no answer changes, so a 0.01 limit admits nothing.

The held-out report gives each chosen metric with its interval (Wilson for rates, bootstrap for
KL) and the paired difference from the baseline on the same held-out items with its interval
(Newcombe for rates, paired bootstrap for KL; ``heldout["difference"]``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from refusal_dir.conditional import Condition, fit_condition
from refusal_dir.directions import DirectionSet
from refusal_dir.errors import ConfigError, DataError
from refusal_dir.evaluation import stats
from refusal_dir.generation import GenerationSettings
from refusal_dir.model import HookedModel
from refusal_dir.prompts import MCQuestion, format_mc_prompt
from refusal_dir.steer import Steer
from refusal_dir.sweep import SweepOptions, sweep

TUNE_METHODS = ("addition", "ablation", "conditional")

BINARY_METRICS = frozenset({"refusal", "helpfulness", "mmlu"})
"""Per-item 0/1 metrics (rates: Wilson intervals); ``kl`` is continuous (bootstrap)."""


LIMIT_CHECKS = ("mean", "bound")


@dataclass(frozen=True)
class Limits:
    max_mmlu_drop: float = 0.01
    max_kl: float = 0.1
    max_helpfulness_drop: float = 1.0
    #: ``mean``: the paired drop must stay within each limit; ``bound``: its 95% upper bound.
    check: str = "mean"

    def __post_init__(self) -> None:
        for name in ("max_mmlu_drop", "max_kl", "max_helpfulness_drop"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"limit {name} must be a finite number >= 0, got {value!r}")
        if self.check not in LIMIT_CHECKS:
            raise ConfigError(f"limit check {self.check!r} is not one of {', '.join(LIMIT_CHECKS)} (--limits-on)")


@dataclass(frozen=True)
class EvalSplit:
    harmful: list[str]
    benign: list[str]
    mmlu: list[MCQuestion]


@dataclass(frozen=True)
class Point:
    method: str
    layer: int
    alpha: float
    refusal: float
    helpfulness: float
    mmlu: float
    kl: float
    #: Upper 95% bounds of the paired drops from the baseline on the same items (MMLU and
    #: helpfulness: Newcombe; KL: bootstrap of the mean); None for the baseline itself.
    mmlu_drop_high: float | None = None
    helpfulness_drop_high: float | None = None
    kl_high: float | None = None

    def as_row(self) -> dict[str, Any]:
        return asdict(self)


def split_half(items: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """Even indices for validation, odd ones held out (deterministic, balanced in order)."""
    return list(items[0::2]), list(items[1::2])


class Evaluator:
    """The four metrics of a (method, layer) at many alphas: one :func:`refusal_dir.sweep.sweep`
    per call (batched over alphas), with the substring judge."""

    def __init__(
        self,
        model: HookedModel,
        directions: DirectionSet,
        *,
        token: str | int | None = None,
        settings: GenerationSettings,
        apply_to: str = "all",
        site: str = "resid_pre",
        unit: str = "raw",
        mmlu_scoring: str = "letter",
        mmlu_formatter: Callable[[MCQuestion], str] = format_mc_prompt,
        conditions: dict[int, Condition] | None = None,
        on_prompts: Callable[[Sequence[str]], None] | None = None,
    ) -> None:
        self.model, self.directions, self.token, self.apply_to = model, directions, token, apply_to
        self.site, self.unit = site, unit
        self.options = SweepOptions(
            judge="substring", generation=settings, mmlu_scoring=mmlu_scoring, mmlu_formatter=mmlu_formatter,
        )
        self.conditions = conditions or {}
        self.on_prompts = on_prompts or (lambda prompts: None)

    def steer(self, method: str, layer: int) -> Steer:
        if method not in TUNE_METHODS:
            raise ConfigError(f"unknown method {method!r}: choose one of {', '.join(TUNE_METHODS)}")
        return Steer(
            method, self.directions, layer=layer, token=self.token, site=self.site, unit=self.unit,
            apply_to="all" if method == "ablation" else self.apply_to,
            condition=self.conditions.get(layer) if method == "conditional" else None,
        )

    def per_item(self, method: str, layer: int, alphas: Sequence[float], split: EvalSplit) -> dict[str, list[list[float]]]:
        """Per-item values of every metric, one list per alpha."""
        for texts in (split.harmful, split.benign, [self.options.mmlu_formatter(q) for q in split.mmlu]):
            self.on_prompts([text for _ in alphas for text in texts])
        result = sweep(
            self.model, self.steer(method, layer), alphas,
            harmful=split.harmful, benign=split.benign, mmlu=split.mmlu,
            metrics=("harmful_generation", "benign_generation", "kl", "mmlu"), options=self.options,
        )
        names = {"refusal": "refusal_harmful", "helpfulness": "answered_benign", "kl": "kl_benign", "mmlu": "mmlu_accuracy"}
        return {
            metric: [list(result.values[name][float(alpha)]) for alpha in alphas] for metric, name in names.items()
        }

    def points(
        self, method: str, layer: int, alphas: Sequence[float], split: EvalSplit,
        *, baseline: dict[str, list[float]] | None = None,
    ) -> list[Point]:
        """The points of ``alphas``; with ``baseline`` (its per-item values on the same items)
        each point also carries the upper bounds of its paired drops."""
        values = self.per_item(method, layer, alphas, split)
        points = []
        for i, alpha in enumerate(alphas):
            means = (sum(values[m][i]) / len(values[m][i]) for m in ("refusal", "helpfulness", "mmlu", "kl"))
            bounds: dict[str, float] = {}
            if baseline is not None:
                bounds = {
                    "mmlu_drop_high": stats.paired_rate_diff_interval(baseline["mmlu"], values["mmlu"][i])[1],
                    "helpfulness_drop_high": stats.paired_rate_diff_interval(baseline["helpfulness"], values["helpfulness"][i])[1],
                    "kl_high": stats.bootstrap_ci(values["kl"][i])[1],
                }
            points.append(Point(method, layer, float(alpha), *means, **bounds))
        return points


def pareto_front(points: Sequence[Point]) -> list[Point]:
    """Points not dominated on (refusal up, helpfulness up, MMLU up, KL down)."""

    def key(p: Point) -> tuple[float, float, float, float]:
        return (p.refusal, p.helpfulness, p.mmlu, -p.kl)

    front = []
    for p in points:
        dominated = any(
            all(a >= b for a, b in zip(key(q), key(p))) and key(q) != key(p) for q in points
        )
        if not dominated:
            front.append(p)
    return front


def _within(p: Point, baseline: Point, limits: Limits) -> bool:
    if limits.check == "bound":
        if p.mmlu_drop_high is None or p.helpfulness_drop_high is None or p.kl_high is None:
            raise ConfigError("limits checked on bounds need points measured with their baseline's items")
        drops = (p.mmlu_drop_high, p.kl_high, p.helpfulness_drop_high)
    else:
        drops = (baseline.mmlu - p.mmlu, p.kl, baseline.helpfulness - p.helpfulness)
    mmlu_drop, kl, helpfulness_drop = drops
    return (
        mmlu_drop <= limits.max_mmlu_drop + 1e-12
        and kl <= limits.max_kl
        and helpfulness_drop <= limits.max_helpfulness_drop + 1e-12
    )


def choose(points: Sequence[Point], baseline: Point, limits: Limits) -> Point:
    """Max refusal within the limits (module docstring); the baseline if nothing qualifies."""
    allowed = [p for p in points if _within(p, baseline, limits)]
    if not allowed:
        return baseline
    return max(allowed, key=lambda p: (p.refusal, -p.kl, p.mmlu))


@dataclass(frozen=True)
class TuneResult:
    baseline: Point
    points: list[Point]
    front: list[Point]
    chosen: Point
    heldout: dict[str, Any]


def tune(
    model: HookedModel,
    directions: DirectionSet,
    *,
    layers: Sequence[int],
    alphas: Sequence[float],
    methods: Sequence[str] = TUNE_METHODS,
    validation: EvalSplit,
    heldout: EvalSplit,
    condition_positive: Sequence[str] = (),
    condition_negative: Sequence[str] = (),
    limits: Limits | None = None,
    token: str | int | None = None,
    settings: GenerationSettings | None = None,
    apply_to: str = "all",
    site: str = "resid_pre",
    unit: str = "raw",
    mmlu_scoring: str = "letter",
    mmlu_formatter: Callable[[MCQuestion], str] = format_mc_prompt,
    bootstrap_resamples: int = 2000,
    on_prompts: Callable[[Sequence[str]], None] | None = None,
    on_event: Callable[[str], None] | None = None,
) -> TuneResult:
    """Search on ``validation``, choose under ``limits``, report the choice on ``heldout``.

    ``token``: the direction-set label steered with; ``apply_to``: where an addition acts."""
    limits = limits or Limits()
    settings = settings or GenerationSettings(max_new_tokens=32)
    notify = on_event or (lambda event: None)
    for method in methods:
        if method not in TUNE_METHODS:
            raise ConfigError(f"unknown method {method!r}: choose one of {', '.join(TUNE_METHODS)}")
    if not layers or not alphas:
        raise ConfigError("tune needs at least one layer and one alpha")
    if not validation.harmful or not validation.benign or not validation.mmlu:
        raise DataError("the validation split is empty: use larger evaluation sets")
    conditions: dict[int, Condition] = {}
    if "conditional" in methods:
        if not condition_positive or not condition_negative:
            raise DataError("conditional steering needs validation prompts to fit its threshold")
        conditions = {
            layer: fit_condition(model, directions, layer=layer, positive=condition_positive, negative=condition_negative, position=token)
            for layer in layers
        }
    evaluator = Evaluator(
        model, directions, token=token, settings=settings, apply_to=apply_to, site=site, unit=unit,
        mmlu_scoring=mmlu_scoring, mmlu_formatter=mmlu_formatter, conditions=conditions, on_prompts=on_prompts,
    )
    notify("search")
    baseline_values = {metric: v[0] for metric, v in evaluator.per_item("addition", layers[0], [0.0], validation).items()}
    baseline = Point(
        "none", -1, 0.0, *(sum(baseline_values[m]) / len(baseline_values[m]) for m in ("refusal", "helpfulness", "mmlu", "kl"))
    )
    points: list[Point] = []
    for method in methods:
        for layer in layers:
            notify(f"search {method} layer {layer}")
            points += evaluator.points(method, layer, alphas, validation, baseline=baseline_values)
    front = pareto_front(points)
    chosen = choose(points, baseline, limits)
    notify("selected")
    per_item: dict[str, dict[str, list[float]]] = {}
    for label, point in (("baseline", baseline), ("chosen", chosen)):
        method = "addition" if point.method == "none" else point.method
        layer = layers[0] if point.method == "none" else point.layer
        values = evaluator.per_item(method, layer, [point.alpha], heldout)
        per_item[label] = {metric: v[0] for metric, v in values.items()}
    heldout_report = heldout_comparison(per_item, bootstrap_resamples=bootstrap_resamples)
    return TuneResult(baseline, points, front, chosen, heldout_report)


def heldout_comparison(
    per_item: dict[str, dict[str, list[float]]], *, bootstrap_resamples: int = 2000
) -> dict[str, Any]:
    """The held-out report of ``{"baseline": values, "chosen": values}`` (per-item values of each
    metric on the same items): each metric's mean with its interval (Wilson for the 0/1 metrics,
    bootstrap otherwise), and under ``"difference"`` chosen minus baseline with its paired
    interval (Newcombe's for rates, a paired bootstrap otherwise)."""
    report: dict[str, Any] = {
        label: {
            metric: {
                "value": sum(v) / len(v),
                "ci": stats.mean_interval(v, binary=metric in BINARY_METRICS, n_resamples=bootstrap_resamples),
                "n": len(v),
            }
            for metric, v in values.items()
        }
        for label, values in per_item.items()
    }
    report["difference"] = {
        metric: {
            "value": (sum(chosen_values) - sum(per_item["baseline"][metric])) / len(chosen_values),
            "ci": (
                stats.paired_rate_diff_interval(chosen_values, per_item["baseline"][metric])
                if metric in BINARY_METRICS
                else stats.paired_bootstrap_diff(chosen_values, per_item["baseline"][metric], n_resamples=bootstrap_resamples)
            ),
            "n": len(chosen_values),
        }
        for metric, chosen_values in per_item["chosen"].items()
    }
    return report


def tune_table(result: TuneResult) -> str:
    lines = [
        "| method | layer | alpha | refusal | helpfulness | MMLU | KL | frontier |",
        "|---|---|---|---|---|---|---|---|",
    ]
    front = set(result.front)
    for p in [result.baseline, *result.points]:
        mark = ("chosen " if p == result.chosen else "") + ("*" if p in front else "")
        lines.append(
            f"| {p.method} | {p.layer} | {p.alpha:+.2f} | {p.refusal:.2f} | {p.helpfulness:.2f} | "
            f"{p.mmlu:.2f} | {p.kl:.3f} | {mark} |"
        )
    return "\n".join(lines)
