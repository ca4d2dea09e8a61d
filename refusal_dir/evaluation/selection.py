"""Choose the steering layer by what the direction does, not only by how well it separates.

A direction can separate harmful from harmless prompts and still be useless or destructive to
steer with: on Gemma 3 270M the best-separating late layer carries a large component shared by
all prompts, and ablating it breaks generation. Following Arditi et al. (2024), every candidate
(position, layer) in the first ``max_layer_fraction`` of the layers is tried on validation
prompts (the held-out pairs, never the evaluation sets), all candidates in one batched pass.
To bound the cost, only the ``max_candidates`` best-separating eligible candidates are tried, on
at most ``max_prompts`` prompts of each kind:

* ``ablation_kl``: KL(unsteered || ablated) of the next-token distribution on harmless prompts;
* ``bypass``: how much ablating the direction at every layer lowers the refusal score on harmful
  prompts (baseline minus ablated; higher is better);
* ``induce``: how much adding ``alpha`` x the raw direction at that layer raises the refusal
  score on harmless prompts (higher is better).

Rule (:func:`select_by_effect`): keep the candidates whose ``ablation_kl <= max_kl``; if none
qualifies keep the quarter with the lowest KL; among them take the largest ``bypass + induce``,
ties broken by separation accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from refusal_dir.directions import DirectionSet
from refusal_dir.errors import ConfigError, DataError
from refusal_dir.evaluation.metrics import kl_from_logits, refusal_score
from refusal_dir.generation import next_token_logits
from refusal_dir.interventions import Intervention, ablation, addition
from refusal_dir.model import HookedModel
from refusal_dir.scoring import LayerScore


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


def _one_hot_rows(n_candidates: int, n_prompts: int, index: int) -> list[float]:
    return [1.0 if block == index else 0.0 for block in range(n_candidates) for _ in range(n_prompts)]


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
    max_candidates: int | None = 6,
    max_prompts: int = 16,
) -> list[LayerEffect]:
    """Ablation KL, bypass and induce scores of every eligible candidate, batched."""
    if not harmful or not harmless:
        raise DataError("layer selection needs harmful and harmless validation prompts")
    limit = max(1, math.floor(max_layer_fraction * model.n_layers))
    # A zero direction (e.g. resid_pre[0] at a template token every prompt shares) cannot steer.
    candidates = [
        s for s in scores if s.layer < limit and abs(directions.norm(s.layer, s.position)) > 1e-6
    ]
    if not candidates:
        raise ConfigError(
            "no candidate layers with a non-zero direction: raise extraction.max_layer_fraction"
        )
    if max_candidates is not None:
        ranked = sorted(candidates, key=lambda s: (s.separation_accuracy, s.auroc), reverse=True)
        kept = ranked[:max_candidates]
        candidates = [s for s in candidates if s in kept]
    harmful, harmless = list(harmful)[:max_prompts], list(harmless)[:max_prompts]
    n = len(candidates)

    def rows(items: Sequence[str]) -> list[str]:
        return [item for _ in candidates for item in items]

    # Candidate i acts on its own block of rows only: a one-hot per-row coefficient per candidate.
    def ablate(items: Sequence[str]) -> list[Intervention]:
        return [
            ablation(directions, direction_layer=c.layer, position=c.position, strength=_one_hot_rows(n, len(items), i))
            for i, c in enumerate(candidates)
        ]

    def add(items: Sequence[str]) -> list[Intervention]:
        return [
            addition(directions, layer=c.layer, position=c.position, site=site, alpha=[alpha * x for x in _one_hot_rows(n, len(items), i)])
            for i, c in enumerate(candidates)
        ]

    base_harmful = refusal_score(model, harmful, batch_size=batch_size)
    base_harmless_logits = next_token_logits(model, harmless, batch_size=batch_size)
    base_harmless = refusal_score(model, harmless, batch_size=batch_size)
    ablated_harmful = refusal_score(model, rows(harmful), interventions=ablate(harmful), batch_size=batch_size)
    ablated_harmless = next_token_logits(model, rows(harmless), interventions=ablate(harmless), batch_size=batch_size)
    added_harmless = refusal_score(model, rows(harmless), interventions=add(harmless), batch_size=batch_size)
    kl = kl_from_logits(base_harmless_logits.repeat(n, 1), ablated_harmless)
    effects = []
    for i, candidate in enumerate(candidates):
        block_h = slice(i * len(harmful), (i + 1) * len(harmful))
        block_b = slice(i * len(harmless), (i + 1) * len(harmless))
        effects.append(
            LayerEffect(
                position=candidate.position,
                layer=candidate.layer,
                separation_accuracy=candidate.separation_accuracy,
                ablation_kl=float(kl[block_b].mean()),
                bypass=float((base_harmful - ablated_harmful[block_h]).mean()),
                induce=float((added_harmless[block_b] - base_harmless).mean()),
            )
        )
    return effects


def select_by_effect(effects: Sequence[LayerEffect], *, max_kl: float = 0.1) -> LayerEffect:
    """The candidate chosen by the documented rule (module docstring)."""
    if not effects:
        raise DataError("no layer effects to select from")
    if not max_kl > 0:
        raise ConfigError(f"max_kl must be > 0, got {max_kl}")
    eligible = [e for e in effects if e.ablation_kl <= max_kl]
    if not eligible:
        ranked = sorted(effects, key=lambda e: e.ablation_kl)
        eligible = ranked[: max(1, len(ranked) // 4)]
    return max(eligible, key=lambda e: (e.steering_score, e.separation_accuracy, -e.layer))


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
