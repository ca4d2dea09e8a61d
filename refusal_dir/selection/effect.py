"""Choose the steering layer by what the direction does, not only by how well it separates.

A direction can separate harmful from harmless prompts and still be useless or destructive to
steer with. On a real chat model (Qwen2.5-Coder-0.5B-Instruct) separation accuracy is 1.0 at
most layers, and a layer whose ablation barely changes harmless outputs can still do nothing to
refusal, or make it more likely (layer 5 there: KL 0.012, bypass -0.14); on a public harmful
set the layers that remove refusal had KL 0.15-0.23, over a fixed 0.1 cut. Following
Arditi et al. (2024), every candidate (position, layer) in the first ``max_layer_fraction`` of
the layers is tried on validation prompts (the held-out extraction pairs, never the evaluation
sets), all candidates in one batched pass, on at most ``max_prompts`` prompts of each kind:

* ``ablation_kl``: KL(unsteered || ablated) of the next-token distribution on harmless prompts;
* ``bypass``: how much ablating the direction at every layer lowers the refusal score on harmful
  prompts (baseline minus ablated; higher is better);
* ``induce``: how much adding ``alpha`` x the raw direction at that layer raises the refusal
  score on harmless prompts (higher is better).

Rule (:func:`choose_layer`), every step recorded in the :class:`LayerSelection` it returns:

1. A candidate **works** when ablation lowers and addition raises the refusal score
   (``bypass > 0`` and ``induce > 0``).
2. Among working candidates with ``ablation_kl <= max_kl``, take the largest
   ``bypass + induce`` (ties: separation accuracy, then the earlier layer). Rule ``within-kl``.
3. If no working candidate is within ``max_kl``, the KL budget is doubled until one is, and the
   same choice is made within that budget. Rule ``kl-relaxed`` (the budget used is recorded):
   the lowest-KL working layers, best steering score among them.
4. If no candidate works at all, the largest ``bypass + induce`` overall is taken and a warning
   is logged. Rule ``none-works``: the direction does not steer this model at any layer tried.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from refusal_dir.directions import DirectionSet
from refusal_dir.errors import ConfigError, DataError
from refusal_dir.evaluation.metrics import kl_divergence, refusal_score
from refusal_dir.generation import next_token_logits
from refusal_dir.interventions import Intervention
from refusal_dir.model import HookedModel
from refusal_dir.selection import candidates as each
from refusal_dir.selection.separation import LayerScore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerEffect:
    position: str
    layer: int
    separation_accuracy: float
    ablation_kl: float
    bypass: float
    induce: float

    @property
    def steering_score(self) -> float:
        return self.bypass + self.induce

    def as_row(self) -> dict[str, object]:
        return {**asdict(self), "steering_score": self.steering_score}


def layer_effects(
    model: HookedModel,
    directions: DirectionSet,
    scores: Sequence[LayerScore],
    *,
    harmful: Sequence[str],
    harmless: Sequence[str],
    max_layer_fraction: float = 0.8,
    alpha: float = 1.0,
    site: str = "resid_pre",
    batch_size: int = 16,
    max_candidates: int | None = None,
    max_prompts: int = 16,
    progress: bool = False,
) -> list[LayerEffect]:
    """Ablation KL, bypass and induce scores of every eligible candidate, batched."""
    if not harmful or not harmless:
        raise DataError("layer selection needs harmful and harmless validation prompts")
    candidates = each.eligible(
        model, directions, scores, max_layer_fraction=max_layer_fraction, max_candidates=max_candidates
    )
    harmful, harmless = list(harmful)[:max_prompts], list(harmless)[:max_prompts]
    n = len(candidates)

    def rows(items: Sequence[str]) -> list[str]:
        return each.repeated(items, n)

    def ablate(items: Sequence[str]) -> list[Intervention]:
        return each.ablations(directions, candidates, len(items))

    def add(items: Sequence[str]) -> list[Intervention]:
        return each.additions(directions, candidates, len(items), alpha=alpha, site=site)

    base_harmful = refusal_score(model, harmful, batch_size=batch_size)
    base_harmless_logits = next_token_logits(model, harmless, batch_size=batch_size)
    base_harmless = refusal_score(model, harmless, batch_size=batch_size)
    ablated_harmful = refusal_score(
        model, rows(harmful), interventions=ablate(harmful), batch_size=batch_size, progress=progress
    )
    # Compared with the unsteered logits batch by batch: memory stays one batch of logits.
    kl = kl_divergence(
        model, rows(harmless), interventions=ablate(harmless), reference_logits=base_harmless_logits,
        batch_size=batch_size, progress=progress,
    ).per_prompt
    added_harmless = refusal_score(
        model, rows(harmless), interventions=add(harmless), batch_size=batch_size, progress=progress
    )
    effects = []
    for i, candidate in enumerate(candidates):
        block_h = slice(i * len(harmful), (i + 1) * len(harmful))
        block_b = slice(i * len(harmless), (i + 1) * len(harmless))
        effects.append(
            LayerEffect(
                position=candidate.position,
                layer=candidate.layer,
                separation_accuracy=candidate.separation_accuracy,
                ablation_kl=sum(kl[block_b]) / len(kl[block_b]),
                bypass=float((base_harmful - ablated_harmful[block_h]).mean()),
                induce=float((added_harmless[block_b] - base_harmless).mean()),
            )
        )
    return effects


@dataclass(frozen=True)
class LayerSelection:
    """The candidate :func:`choose_layer` picked, and which step of its rule fired."""

    chosen: LayerEffect
    rule: str
    """``within-kl``, ``kl-relaxed`` or ``none-works`` (module docstring)."""
    kl_budget: float
    """The KL limit the choice was made within (``max_kl``, or the relaxed budget)."""
    max_kl: float
    n_working: int
    n_within: int
    """Working candidates within ``kl_budget`` (the ones the choice was made among)."""

    def describe(self) -> str:
        if self.rule == "within-kl":
            return (
                f"within-kl: largest bypass + induce among the {self.n_within} of "
                f"{self.n_working} working layers (bypass > 0, induce > 0) with ablation KL <= "
                f"{self.max_kl:g}"
            )
        if self.rule == "kl-relaxed":
            if not math.isfinite(self.kl_budget):
                return "kl-relaxed: no working layer has a finite ablation KL; largest bypass + induce"
            return (
                f"kl-relaxed: no working layer (bypass > 0, induce > 0) has ablation KL <= "
                f"{self.max_kl:g}; budget doubled to {self.kl_budget:g}, largest bypass + induce "
                f"among the {self.n_within} of {self.n_working} working layers within it"
            )
        return "none-works: no layer has bypass > 0 and induce > 0; largest bypass + induce overall"

    def as_record(self) -> dict[str, object]:
        return {
            "rule": self.rule,
            "kl_budget": self.kl_budget if math.isfinite(self.kl_budget) else None,  # strict JSON
            "max_kl": self.max_kl,
            "n_working": self.n_working,
            "n_within": self.n_within,
            "description": self.describe(),
        }


def _best(effects: Sequence[LayerEffect]) -> LayerEffect:
    scored = [e for e in effects if not math.isnan(e.steering_score)] or list(effects)
    return max(scored, key=lambda e: (e.steering_score, e.separation_accuracy, -e.layer))


def choose_layer(effects: Sequence[LayerEffect], *, max_kl: float = 0.1) -> LayerSelection:
    """The candidate chosen by the documented rule (module docstring), with the rule that fired."""
    if not effects:
        raise DataError("no layer effects to select from")
    if not max_kl > 0 or not math.isfinite(max_kl):
        raise ConfigError(f"extraction.max_kl must be a positive number, got {max_kl}")
    working = [e for e in effects if e.bypass > 0 and e.induce > 0]
    if not working:
        logger.warning(
            "no candidate layer has bypass > 0 and induce > 0: the refusal direction does not "
            "steer this model at the layers tried; taking the largest bypass + induce"
        )
        return LayerSelection(_best(effects), "none-works", math.inf, max_kl, 0, 0)
    finite = [e for e in working if math.isfinite(e.ablation_kl)]
    if not finite:  # KL cannot rank them
        return LayerSelection(_best(working), "kl-relaxed", math.inf, max_kl, len(working), len(working))
    budget, rule = max_kl, "within-kl"
    while not any(e.ablation_kl <= budget for e in finite):
        budget, rule = budget * 2, "kl-relaxed"
    within = [e for e in finite if e.ablation_kl <= budget]
    return LayerSelection(_best(within), rule, budget, max_kl, len(working), len(within))


def select_by_effect(effects: Sequence[LayerEffect], *, max_kl: float = 0.1) -> LayerEffect:
    """The candidate :func:`choose_layer` picks."""
    return choose_layer(effects, max_kl=max_kl).chosen


def effects_table(effects: Sequence[LayerEffect], *, selected: LayerEffect | None = None) -> str:
    header = f"{'position':>10} {'layer':>5} {'sep_acc':>8} {'abl_KL':>8} {'bypass':>8} {'induce':>8}"
    lines = [header, "-" * len(header)]
    for e in effects:
        mark = " *" if selected is not None and e == selected else ""
        lines.append(
            f"{e.position:>10} {e.layer:>5} {e.separation_accuracy:>8.3f} {e.ablation_kl:>8.3f} "
            f"{e.bypass:>8.2f} {e.induce:>8.2f}{mark}"
        )
    return "\n".join(lines)
