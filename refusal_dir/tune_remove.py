"""``tune --objective remove``: search ablation kernels that remove refusal at the least cost.

The search is heretic's (Optuna's multi-objective TPE over the parameters of an
:class:`~refusal_dir.abliteration.AblationPoint`, co-minimizing refusal on harmful prompts and
the first-token KL on harmless ones), with what a measurement needs around it:

* **seeded and reproducible**: the sampler is seeded and the model is run greedily, so the same
  seed gives the same trials, parameters and values;
* **batched**: ``candidates_per_batch`` points are asked of the sampler at once and measured in
  one batched pass, each batch row with its own kernel (the run-time ablation takes one point per
  row); the sampler's constant liar keeps the points of one batch apart;
* **anchored**: with ``anchor_layer`` (``tune`` passes the layer holding the selected direction
  among the ablated ones, :func:`ablation_directions`) the first trial
  ablates that layer's direction at weight 1 on every write of every layer, with the search's
  options: the strong edit, expected to remove most refusal, from which the sampler looks for
  cheaper ones (heretic starts from random points only);
* **constraints**: the MMLU-style accuracy and the answered rate on benign prompts may drop at
  most ``max_mmlu_drop`` / ``max_helpfulness_drop`` from the unedited model (paired, on the same
  items); a point beyond either is infeasible (an Optuna constraint) and never chosen;
* **validation / held out**: every evaluation set is split as ``tune`` splits it
  (:func:`refusal_dir.tune.split_half`); the search sees the validation half only, and the chosen
  point is measured again on the held-out half beside the unedited model on the same items, with
  paired intervals (:func:`refusal_dir.tune.heldout_comparison`).

The chosen point is the feasible trial of least KL among those with validation refusal at most
``max_refusal``; when none reaches it, the feasible trial of least refusal (then least KL). With
no feasible trial the unedited model (the zero point) is chosen. Search spaces:

* ``heretic``: heretic's ranges (direction index in the last 40-90% of the layers or each layer's
  own; peak weight 0.8-1.5 in the last 40% of the layers; minimum weight a fraction of the peak;
  reach 1 to 60% of the layers);
* ``wide``: the same shape over every layer and peak weights from 0 (for small models, whose
  refusal may live early).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from refusal_dir.abliteration import AblationOptions, AblationPoint, Kernel, kernel_ablation
from refusal_dir.architectures import WRITE_KINDS
from refusal_dir.directions import DirectionSet
from refusal_dir.errors import ConfigError, DataError
from refusal_dir.evaluation import judges, metrics
from refusal_dir.extraction import set_key
from refusal_dir.generation import GenerationSettings, generate, next_token_logits
from refusal_dir.interventions import repeat_rows
from refusal_dir.prompts import MCQuestion, format_mc_prompt
from refusal_dir.tune import EvalSplit, heldout_comparison

if TYPE_CHECKING:
    import optuna

    from refusal_dir.extraction import Extraction
    from refusal_dir.model import HookedModel

logger = logging.getLogger(__name__)

SEARCH_SPACES = ("heretic", "wide")
DIRECTION_SITES = ("auto", "resid_post", "resid_pre")
OBJECTIVES = ("refusal", "kl")
CONSTRAINED = ("mmlu", "helpfulness")


# ----------------------------------------------------------------------------------------------
# What is searched
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchSpace:
    """The ranges of a point's parameters, as fractions of the last layer index."""

    name: str = "heretic"

    def __post_init__(self) -> None:
        if self.name not in SEARCH_SPACES:
            raise ConfigError(f"unknown search space {self.name!r}: choose one of {', '.join(SEARCH_SPACES)}")

    def ranges(self, n_layers: int) -> dict[str, tuple[float, float]]:
        """Each float parameter's range (``min_weight`` is a fraction of the peak)."""
        last = max(n_layers - 1, 1)
        wide = self.name == "wide"
        return {
            "direction_index": (0.0, float(last)) if wide else (0.4 * last, 0.9 * last),
            "max_weight_position": (0.0, float(last)) if wide else (0.6 * last, float(last)),
            "max_weight": (0.0, 1.5) if wide else (0.8, 1.5),
            "min_weight": (0.0, 1.0),
            "min_weight_distance": (1.0, max(1.0, (1.0 if wide else 0.6) * last)),
        }

    def suggest(self, trial: optuna.trial.BaseTrial, n_layers: int) -> AblationPoint:
        ranges = self.ranges(n_layers)
        scope = trial.suggest_categorical("direction_scope", ["global", "per layer"])
        index = trial.suggest_float("direction_index", *ranges["direction_index"])
        kernels = []
        for kind in WRITE_KINDS:
            peak = trial.suggest_float(f"{kind}.max_weight", *ranges["max_weight"])
            kernels.append(Kernel(
                max_weight=peak,
                max_weight_position=trial.suggest_float(f"{kind}.max_weight_position", *ranges["max_weight_position"]),
                min_weight=trial.suggest_float(f"{kind}.min_weight", *ranges["min_weight"]) * peak,
                min_weight_distance=trial.suggest_float(f"{kind}.min_weight_distance", *ranges["min_weight_distance"]),
            ))
        return AblationPoint(kernels[0], kernels[1], index if scope == "global" else None)

    def anchor(self, n_layers: int, layer: int) -> dict[str, Any]:
        """The parameters that ablate ``layer``'s direction at weight 1 on every write the space
        can reach, the peak placed so that its reach covers the most layers (all of them in both
        spaces). A layer outside the space's direction range is clamped into it; one that is not
        a layer of the model is a ConfigError."""
        if not 0 <= layer < n_layers:
            raise ConfigError(f"anchor layer {layer} is not a layer of this model (0 to {n_layers - 1})")
        ranges = self.ranges(n_layers)

        def clamp(name: str, value: float) -> float:
            low, high = ranges[name]
            return min(max(value, low), high)

        params: dict[str, Any] = {"direction_scope": "global", "direction_index": clamp("direction_index", float(layer))}
        for kind in WRITE_KINDS:
            params[f"{kind}.max_weight"] = clamp("max_weight", 1.0)
            params[f"{kind}.max_weight_position"] = clamp("max_weight_position", (n_layers - 1) / 2)
            params[f"{kind}.min_weight"] = 1.0
            params[f"{kind}.min_weight_distance"] = ranges["min_weight_distance"][1]
        return params


def ablation_directions(extraction: Extraction, site: str = "auto") -> tuple[DirectionSet, int]:
    """The directions a remove search ablates, and the layer among them that holds the selected
    direction (the anchor's).

    A point ablates layer L's writes along a direction of layer L. With ``resid_post`` sets that
    is the direction of layer L's own output, its writes included (heretic's convention); with
    ``resid_pre`` it is the direction of the layer's input, one layer earlier. ``auto`` takes
    ``resid_post`` when the extraction has the steering method there, else the steering set.
    ``resid_pre`` of layer L is ``resid_post`` of layer L-1 (the same activations), so the
    selected direction is found one layer earlier among ``resid_post`` sets. At the two ends
    there is no twin and the anchor is the nearest layer instead (a different vector): a selected
    ``resid_pre`` layer 0 (the embeddings) anchors at ``resid_post`` 0, a selected ``resid_post``
    last layer at ``resid_pre`` of the last layer. A site the extraction lacks is a ConfigError
    naming the fix; ``auto`` falling back to the steering set logs a warning.
    """
    if site not in DIRECTION_SITES:
        raise ConfigError(f"unknown direction site {site!r}: choose one of {', '.join(DIRECTION_SITES)}")
    steering = extraction.steering_set
    layer = extraction.selected.layer
    want = "resid_post" if site == "auto" else site
    if steering.meta.site == want:
        return steering, layer
    name = set_key(steering.meta.method, want)
    chosen = extraction.sets.get(name)
    if chosen is None:
        if site == "auto":
            logger.warning("no %s directions in the extraction: ablating the %s ones (steering site)", name, steering.meta.site)
            return steering, layer
        raise ConfigError(
            f"the extraction has no {name} directions: extract with extraction.sites including "
            f"{want}, or pass --direction-site {steering.meta.site}"
        )
    shift = {("resid_pre", "resid_post"): -1, ("resid_post", "resid_pre"): 1}.get((steering.meta.site, want), 0)
    return chosen, min(max(layer + shift, 0), chosen.n_layers - 1)


@dataclass(frozen=True)
class RemoveLimits:
    """The refusal to reach and what may be lost (drops in rate points, paired)."""

    max_refusal: float = 0.1
    max_mmlu_drop: float = 0.01
    max_helpfulness_drop: float = 1.0

    def __post_init__(self) -> None:
        for name in ("max_refusal", "max_mmlu_drop", "max_helpfulness_drop"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be a number >= 0, got {value!r}")

    def drop_limits(self) -> dict[str, float]:
        """The constrained metric -> how far it may drop from the unedited model."""
        return {"mmlu": self.max_mmlu_drop, "helpfulness": self.max_helpfulness_drop}


@dataclass(frozen=True)
class SearchSettings:
    """How long and where to search, and what to reach (the CLI's ``--trials``, ``--seed``,
    ``--candidates-per-batch``, ``--search-space`` and the limits)."""

    trials: int = 48
    seed: int = 0
    candidates_per_batch: int = 8
    space: SearchSpace = SearchSpace()
    limits: RemoveLimits = RemoveLimits()
    anchor_layer: int | None = None
    """When set, the first trial ablates this layer's direction at weight 1 everywhere
    (:meth:`SearchSpace.anchor`): the search starts from the strong edit and looks for cheaper
    ones around it (``tune`` passes the layer of :func:`ablation_directions`; ``--no-anchor``: none)."""

    def __post_init__(self) -> None:
        if self.trials < 1 or self.candidates_per_batch < 1:
            raise ConfigError(
                f"trials and candidates per batch must be >= 1, got {self.trials} and {self.candidates_per_batch}"
            )

    def as_record(self) -> dict[str, Any]:
        return {
            "trials": self.trials, "seed": self.seed, "candidates_per_batch": self.candidates_per_batch,
            "search_space": self.space.name, "anchor_layer": self.anchor_layer,
            "limits": {"max_refusal": self.limits.max_refusal, "max_mmlu_drop": self.limits.max_mmlu_drop,
                       "max_helpfulness_drop": self.limits.max_helpfulness_drop},
        }


# ----------------------------------------------------------------------------------------------
# Measuring many points at once
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measured:
    """One point's per-item values on one split: ``refusal`` (harmful), ``kl`` (benign, first
    token), and where measured ``helpfulness`` (answered, benign) and ``mmlu`` (correct)."""

    values: dict[str, list[float]]

    def mean(self, metric: str) -> float:
        items = self.values[metric]
        return sum(items) / len(items)


class PointEvaluator:
    """Measures a list of points in batched passes, one point per batch row (candidate-major)."""

    def __init__(
        self,
        model: HookedModel,
        directions: DirectionSet,
        *,
        options: AblationOptions | None = None,
        harmless_means: torch.Tensor | None = None,
        settings: GenerationSettings | None = None,
        judge: judges.Judge | str = "substring",
        measure: Sequence[str] = ("mmlu", "helpfulness"),
        mmlu_scoring: str = "letter",
        mmlu_formatter: Callable[[MCQuestion], str] = format_mc_prompt,
    ) -> None:
        unknown = set(measure) - set(CONSTRAINED)
        if unknown:
            raise ConfigError(f"unknown measured metric(s) {sorted(unknown)}: choose from {', '.join(CONSTRAINED)}")
        self.model, self.directions, self.options = model, directions, options or AblationOptions()
        self.harmless_means = harmless_means
        self.settings = settings or GenerationSettings(max_new_tokens=32)
        self.judge = judges.resolve_judge(judge)
        self.measure = tuple(measure)
        self.mmlu_scoring, self.mmlu_formatter = mmlu_scoring, mmlu_formatter
        self._reference: dict[tuple[str, ...], torch.Tensor] = {}

    def _intervention(self, points: Sequence[AblationPoint], n_items: int) -> list[Any]:
        """One kernel per point, each repeated over its ``n_items`` consecutive rows."""
        per_point = kernel_ablation(self.directions, points, options=self.options, harmless_means=self.harmless_means)
        return repeat_rows([per_point], [n_items] * len(points))

    def _reference_logits(self, benign: Sequence[str]) -> torch.Tensor:
        key = tuple(benign)
        if key not in self._reference:
            self._reference[key] = next_token_logits(
                self.model, list(benign), batch_size=self.settings.batch_size, progress=False,
                share_prefix=self.settings.share_prefix,
            )
        return self._reference[key]

    def _generated(self, points: Sequence[AblationPoint], prompts: Sequence[str]) -> tuple[list[bool], list[bool]]:
        rows = [prompt for _ in points for prompt in prompts]
        completions = generate(
            self.model, rows, interventions=self._intervention(points, len(prompts)), settings=self.settings,
            progress=False,
        )
        refused, _, answered = judges.judge_completions(rows, completions, judge=self.judge)
        return refused, answered

    def per_item(self, points: Sequence[AblationPoint], split: EvalSplit) -> list[Measured]:
        """Per-item values of every point on ``split`` (one batched pass per metric)."""
        if not points:
            raise ConfigError("no points to measure")
        if not split.harmful or not split.benign:
            raise DataError("the split has no harmful or no benign prompts: use larger evaluation sets")
        values: dict[str, list[float]] = {}
        refused, _ = self._generated(points, split.harmful)
        values["refusal"] = [float(x) for x in refused]
        benign = list(split.benign)
        kl = metrics.kl_divergence(
            self.model, [prompt for _ in points for prompt in benign],
            interventions=self._intervention(points, len(benign)),
            reference_logits=self._reference_logits(benign), batch_size=self.settings.batch_size,
            share_prefix=self.settings.share_prefix,
        ).per_prompt
        values["kl"] = [float(x) for x in kl]
        if "helpfulness" in self.measure:
            _, answered = self._generated(points, benign)
            values["helpfulness"] = [float(x) for x in answered]
        if "mmlu" in self.measure and split.mmlu:
            questions = [question for _ in points for question in split.mmlu]
            scored = metrics.mmlu_accuracy(
                self.model, questions, interventions=self._intervention(points, len(split.mmlu)),
                scoring=self.mmlu_scoring,  # type: ignore[arg-type]
                formatter=self.mmlu_formatter, option_prefix=self.model.reply_prefix,
                batch_size=self.settings.batch_size, share_prefix=self.settings.share_prefix,
            )
            values["mmlu"] = [float(x) for x in scored.per_item]
        per_point = []
        for i in range(len(points)):
            per_point.append(Measured({
                metric: items[i * len(items) // len(points): (i + 1) * len(items) // len(points)]
                for metric, items in values.items()
            }))
        return per_point


# ----------------------------------------------------------------------------------------------
# The search
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trial:
    """One searched point with its validation means and feasibility."""

    number: int
    point: AblationPoint
    refusal: float
    kl: float
    helpfulness: float | None
    mmlu: float | None
    feasible: bool

    def as_row(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "trial": self.number, "refusal": self.refusal, "kl": self.kl,
            "helpfulness": self.helpfulness, "mmlu": self.mmlu, "feasible": self.feasible,
            "direction_index": self.point.direction_index,
        }
        for kind in WRITE_KINDS:
            for name, value in self.point.kernel(kind).to_dict().items():
                row[f"{kind}.{name}"] = value
        return row


@dataclass
class RemoveResult:
    baseline: Trial
    trials: list[Trial]
    front: list[Trial]
    chosen: Trial
    heldout: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)


def _excess(measured: Measured, baseline: Measured, limits: RemoveLimits) -> dict[str, float]:
    """Per measured constrained metric: its drop from the baseline minus its limit (> 0: beyond)."""
    return {
        metric: baseline.mean(metric) - measured.mean(metric) - limit
        for metric, limit in limits.drop_limits().items() if metric in measured.values
    }


def _trial(number: int, point: AblationPoint, measured: Measured, excess: dict[str, float]) -> Trial:
    means = {metric: measured.mean(metric) for metric in measured.values}
    feasible = all(value <= 1e-12 for value in excess.values())
    return Trial(number, point, means["refusal"], means["kl"], means.get("helpfulness"), means.get("mmlu"), feasible)


def pareto_front(trials: Sequence[Trial]) -> list[Trial]:
    """The feasible trials no other feasible trial beats on refusal and KL at once."""
    feasible = [t for t in trials if t.feasible]
    return sorted(
        (
            t for t in feasible
            if not any(
                (o.refusal <= t.refusal and o.kl <= t.kl) and (o.refusal < t.refusal or o.kl < t.kl)
                for o in feasible
            )
        ),
        key=lambda t: (t.refusal, t.kl, t.number),
    )


def choose(trials: Sequence[Trial], baseline: Trial, limits: RemoveLimits) -> Trial:
    """The module docstring's rule."""
    feasible = [t for t in trials if t.feasible]
    if not feasible:
        return baseline
    reached = [t for t in feasible if t.refusal <= limits.max_refusal + 1e-12]
    if reached:
        return min(reached, key=lambda t: (t.kl, t.refusal, t.number))
    return min(feasible, key=lambda t: (t.refusal, t.kl, t.number))


def _sampler(seed: int, n_trials: int) -> optuna.samplers.BaseSampler:
    import optuna

    # Constraints come from each trial's set_constraint (values > 0 are infeasible).
    return optuna.samplers.TPESampler(
        seed=seed, multivariate=True, constant_liar=True, n_startup_trials=max(1, min(10, n_trials // 3)),
    )


def search_trials(
    evaluator: PointEvaluator,
    n_layers: int,
    *,
    validation: EvalSplit,
    search: SearchSettings,
    on_event: Callable[[str], None] | None = None,
) -> tuple[Trial, list[Trial], Measured]:
    """The baseline (zero point) and every trial on ``validation``; also the baseline's items."""
    import optuna

    notify = on_event or (lambda event: None)
    limits = search.limits
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=_sampler(search.seed, search.trials))
    if search.anchor_layer is not None:
        study.enqueue_trial(search.space.anchor(n_layers, search.anchor_layer))
    base_items = evaluator.per_item([AblationPoint.zero()], validation)[0]
    baseline = _trial(-1, AblationPoint.zero(), base_items, {})
    done: list[Trial] = []
    while len(done) < search.trials:
        asked = [study.ask() for _ in range(min(search.candidates_per_batch, search.trials - len(done)))]
        points = [search.space.suggest(trial, n_layers) for trial in asked]
        for trial, point, measured in zip(asked, points, evaluator.per_item(points, validation), strict=True):
            excess = _excess(measured, base_items, limits)
            for metric, value in excess.items():
                trial.set_constraint(f"{metric}_drop", value)
            result = _trial(trial.number, point, measured, excess)
            study.tell(trial, [result.refusal, result.kl])
            done.append(result)
        best = min(done, key=lambda t: (not t.feasible, t.refusal, t.kl))
        notify(f"trials {len(done)}/{search.trials}: best refusal {best.refusal:.2f} at KL {best.kl:.4f}")
    return baseline, done, base_items


def tune_remove(
    model: HookedModel,
    directions: DirectionSet,
    *,
    validation: EvalSplit,
    heldout: EvalSplit,
    search: SearchSettings | None = None,
    options: AblationOptions | None = None,
    harmless_means: torch.Tensor | None = None,
    settings: GenerationSettings | None = None,
    judge: judges.Judge | str = "substring",
    mmlu_scoring: str = "letter",
    mmlu_formatter: Callable[[MCQuestion], str] = format_mc_prompt,
    bootstrap_resamples: int = 2000,
    on_event: Callable[[str], None] | None = None,
) -> RemoveResult:
    """Search on ``validation``, choose (module docstring), report on ``heldout``."""
    search = search or SearchSettings()
    options = options or AblationOptions()
    limits = search.limits
    measure = tuple(
        metric for metric, limit in limits.drop_limits().items() if limit < 1.0
    )
    if "mmlu" in measure and not (validation.mmlu and heldout.mmlu):
        raise DataError("an MMLU limit needs MMLU-style questions in both halves: use a larger MMLU set")
    evaluator = PointEvaluator(
        model, directions, options=options, harmless_means=harmless_means, settings=settings, judge=judge,
        measure=measure, mmlu_scoring=mmlu_scoring, mmlu_formatter=mmlu_formatter,
    )
    baseline, done, _ = search_trials(evaluator, model.n_layers, validation=validation, search=search, on_event=on_event)
    chosen = choose(done, baseline, limits)
    notify = on_event or (lambda event: None)
    notify("held-out check")
    base_held = evaluator.per_item([AblationPoint.zero()], heldout)[0]  # alone: the model exactly
    chosen_held = evaluator.per_item([chosen.point], heldout)[0]
    report = heldout_comparison(
        {"baseline": base_held.values, "chosen": chosen_held.values}, bootstrap_resamples=bootstrap_resamples
    )
    record = {
        **search.as_record(),
        "options": {"projected": options.projected, "norm_preserving": options.norm_preserving, "token": options.token},
        "share_prefix": evaluator.settings.share_prefix,
    }
    return RemoveResult(baseline, done, pareto_front(done), chosen, report, settings=record)
