"""Choose the steering layer from activations alone: cosine similarity, after COSMIC.

COSMIC (Siu et al., ACL Findings 2025, "Generalized Refusal Direction Identification in LLM
Activations") chooses the refusal direction and its layer without reading what the model says:
no refusal tokens, no judge, no logits. A direction is good when removing it makes harmful
prompts look harmless inside the model, and adding it makes harmless prompts look harmful.
Every candidate (token, layer) in the first ``max_layer_fraction`` of the layers is tried on
validation prompts (the held-out extraction pairs, never the evaluation sets), all candidates in
one batched pass, on at most ``max_prompts`` prompts of each kind:

1. **Where to look.** The unsteered harmful and harmless mean activations (the set's site, every
   token label of the set's rule, concatenated) are compared at every layer; the
   ``measured_fraction`` of the layers (at least one) where their cosine similarity is lowest,
   where the two kinds differ most (late layers, in practice), are the measured layers.
2. **Score.** For a candidate with unit direction ``u`` and raw vector ``v``:

   * ``comply_cosine``: ablate ``u`` at every layer (stream) on the harmful prompts; the cosine
     of their mean activation with the unsteered harmless mean, averaged over the measured
     layers;
   * ``refuse_cosine``: add ``v`` at the candidate's layer (every position) to the harmless
     prompts; the cosine of their mean with the unsteered harmful mean, averaged likewise;
   * ``cosine_score = (comply_cosine + refuse_cosine) / 2``.

3. **Rule** (:func:`choose_by_cosine`): the largest ``cosine_score`` (ties: separation accuracy,
   then the earlier layer). A candidate that does nothing scores the ``baseline`` (the cosine of
   the unsteered means over the measured layers), recorded beside the choice: when no candidate
   beats it, a warning says no direction moves one kind towards the other (rule ``none-moves``;
   else ``cosine``).

Activations are read with the forward pass stopped after the last measured layer: no
unembedding, no generation. What this rule does not see, and the effect rule
(:mod:`~refusal_dir.selection.effect`) does, is the cost on harmless outputs (ablation KL).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from refusal_dir.activations import collect_activations
from refusal_dir.directions import DirectionSet
from refusal_dir.errors import ConfigError, DataError
from refusal_dir.interventions import Intervention, check_rows, steer
from refusal_dir.model import HookedModel
from refusal_dir.selection import candidates as each
from refusal_dir.selection.separation import LayerScore

logger = logging.getLogger(__name__)

#: COSMIC's share of the layers the score is measured at.
MEASURED_FRACTION = 0.1


@dataclass(frozen=True)
class LayerCosine:
    position: str
    layer: int
    separation_accuracy: float
    comply_cosine: float
    """Ablated harmful mean vs the harmless mean (higher: ablation makes harmful look harmless)."""
    refuse_cosine: float
    """Harmless mean with the addition vs the harmful mean (higher: addition makes it look harmful)."""

    @property
    def cosine_score(self) -> float:
        return (self.comply_cosine + self.refuse_cosine) / 2

    def as_row(self) -> dict[str, object]:
        return {**asdict(self), "cosine_score": self.cosine_score}


@dataclass(frozen=True)
class CosineScan:
    """What :func:`layer_cosines` measured: every candidate, where, and the do-nothing score."""

    cosines: tuple[LayerCosine, ...]
    measured_layers: tuple[int, ...]
    baseline: float


@dataclass(frozen=True)
class CosineSelection:
    """The candidate :func:`choose_by_cosine` picked, and which step of its rule fired."""

    chosen: LayerCosine
    rule: str
    """``cosine`` or ``none-moves`` (module docstring)."""
    measured_layers: tuple[int, ...]
    baseline: float

    def describe(self) -> str:
        where = ", ".join(str(layer) for layer in self.measured_layers)
        if self.rule == "none-moves":
            return (
                f"none-moves: no candidate's cosine score beats the unsteered {self.baseline:.4f} at "
                f"layers {where}; largest cosine score"
            )
        return (
            f"cosine: largest cosine score (ablated harmful vs harmless mean, steered harmless vs "
            f"harmful mean) at layers {where}, where the unsteered means differ most "
            f"(unsteered cosine {self.baseline:.4f})"
        )

    def as_record(self) -> dict[str, object]:
        return {
            "rule": self.rule,
            "measured_layers": list(self.measured_layers),
            "baseline": self.baseline,
            "description": self.describe(),
        }


def _cosines(first: Tensor, second: Tensor) -> Tensor:
    """Cosine per layer of ``... x tokens x layers x d_model`` means, the token labels
    concatenated: ``... x layers``."""
    first, second = first.double().transpose(-2, -3), second.double().transpose(-2, -3)
    first, second = first.flatten(-2), second.flatten(-2)
    return torch.nn.functional.cosine_similarity(first, second, dim=-1)


def _means(
    model: HookedModel,
    prompts: Sequence[str],
    *,
    site: str,
    token: str,
    layers: Sequence[int],
    batch_size: int,
    interventions: Sequence[Intervention] = (),
    progress: bool = False,
) -> Tensor:
    """``prompts x tokens x layers x d_model`` activations of ``prompts`` under the interventions
    (per-row coefficients: one row per prompt), read at ``layers`` of ``site``."""
    check_rows(interventions, len(prompts))
    chunks = []
    with torch.no_grad(), steer(model, *interventions) as state:
        for start in tqdm(range(0, len(prompts), batch_size), disable=not progress, leave=False):
            rows = slice(start, min(start + batch_size, len(prompts)))
            state.start(rows)
            acts = collect_activations(
                model, list(prompts[rows]), sites=(site,), token=token, layers=layers,
                batch_size=batch_size, progress=False,
            )
            chunks.append(acts.site(site))
    return torch.cat(chunks)


def layer_cosines(
    model: HookedModel,
    directions: DirectionSet,
    scores: Sequence[LayerScore],
    *,
    harmful: Sequence[str],
    harmless: Sequence[str],
    max_layer_fraction: float = 0.8,
    measured_fraction: float = MEASURED_FRACTION,
    alpha: float = 1.0,
    batch_size: int = 16,
    max_candidates: int | None = None,
    max_prompts: int = 16,
    progress: bool = False,
) -> CosineScan:
    """Every eligible candidate's comply and refuse cosines (module docstring), batched."""
    if not harmful or not harmless:
        raise DataError("layer selection needs harmful and harmless validation prompts")
    if not 0 < measured_fraction <= 1:
        raise ConfigError(f"measured_fraction must be in (0, 1], got {measured_fraction}")
    candidates = each.eligible(
        model, directions, scores, max_layer_fraction=max_layer_fraction, max_candidates=max_candidates
    )
    harmful, harmless = list(harmful)[:max_prompts], list(harmless)[:max_prompts]
    site, n = directions.meta.site, len(candidates)

    def means(prompts: Sequence[str], layers: Sequence[int], interventions: Sequence[Intervention] = ()) -> Tensor:
        return _means(
            model, prompts, site=site, token=directions.meta.position, layers=layers, batch_size=batch_size,
            interventions=interventions, progress=progress and bool(interventions),
        )

    harmful_mean = means(harmful, range(model.n_layers)).double().mean(0)
    harmless_mean = means(harmless, range(model.n_layers)).double().mean(0)
    unsteered = _cosines(harmful_mean, harmless_mean)
    n_measured = max(1, math.ceil(measured_fraction * model.n_layers))
    measured = sorted(int(i) for i in torch.argsort(unsteered)[:n_measured])
    ablated = means(each.repeated(harmful, n), measured, each.ablations(directions, candidates, len(harmful)))
    added = means(
        each.repeated(harmless, n), measured,
        each.additions(directions, candidates, len(harmless), alpha=alpha, site=site),
    )
    ablated_means = ablated.double().view(n, len(harmful), *ablated.shape[1:]).mean(1)
    added_means = added.double().view(n, len(harmless), *added.shape[1:]).mean(1)
    comply = _cosines(ablated_means, harmless_mean[:, measured]).mean(-1)
    refuse = _cosines(added_means, harmful_mean[:, measured]).mean(-1)
    cosines = tuple(
        LayerCosine(
            position=c.position,
            layer=c.layer,
            separation_accuracy=c.separation_accuracy,
            comply_cosine=float(comply[i]),
            refuse_cosine=float(refuse[i]),
        )
        for i, c in enumerate(candidates)
    )
    return CosineScan(cosines, tuple(measured), float(unsteered[measured].mean()))


def choose_by_cosine(scan: CosineScan) -> CosineSelection:
    """The candidate chosen by the documented rule (module docstring), with the rule that fired."""
    if not scan.cosines:
        raise DataError("no layer cosines to select from")
    scored = [c for c in scan.cosines if not math.isnan(c.cosine_score)] or list(scan.cosines)
    best = max(scored, key=lambda c: (c.cosine_score, c.separation_accuracy, -c.layer))
    rule = "cosine" if best.cosine_score > scan.baseline else "none-moves"
    if rule == "none-moves":
        logger.warning(
            "no candidate layer's cosine score beats the unsteered %.4f: no direction moves harmful "
            "and harmless activations towards each other; taking the largest cosine score",
            scan.baseline,
        )
    return CosineSelection(best, rule, scan.measured_layers, scan.baseline)


def cosines_table(cosines: Sequence[LayerCosine], *, selected: LayerCosine | None = None) -> str:
    header = f"{'position':>10} {'layer':>5} {'sep_acc':>8} {'comply':>8} {'refuse':>8} {'score':>8}"
    lines = [header, "-" * len(header)]
    for c in cosines:
        mark = " *" if selected is not None and c == selected else ""
        lines.append(
            f"{c.position:>10} {c.layer:>5} {c.separation_accuracy:>8.3f} {c.comply_cosine:>8.4f} "
            f"{c.refuse_cosine:>8.4f} {c.cosine_score:>8.4f}{mark}"
        )
    return "\n".join(lines)
