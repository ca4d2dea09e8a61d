"""Score every (position, layer) by how well its direction separates held-out pairs.

For each candidate direction ``u`` (unit) and held-out matched pairs ``(p_i, n_i)``:

* ``separation_accuracy``: fraction of pairs with ``p_i @ u > n_i @ u``, ties counting one half
  (chance = 0.5; a direction that cannot tell the pairs apart scores exactly 0.5); with pair
  groups (:attr:`~refusal_dir.prompts.ContrastPair.group`, e.g. honesty pairs whose user is
  right or wrong) the mean of the per-group fractions (balanced accuracy), so a direction
  that separates only one kind (agreeing with the user) scores 0.5 (:func:`separation_accuracy`);
* ``auroc``: area under the ROC curve of the projections, positives against negatives;
* ``effect_size``: Cohen's d of the projections (mean gap over pooled standard deviation);
* ``probe_accuracy``: held-out accuracy of a logistic probe trained on the training activations
  of that layer (how much linearly decodable information the layer holds, direction aside).

Best-layer rule (:func:`select_layer`): ignore the last ``1 - max_layer_fraction`` of the layers
(20% by default: late-layer directions mostly act on the unembedding, as in Arditi et al. 2024),
then take the highest separation accuracy, ties broken by AUROC, then by effect size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from refusal_dir.activations import ActivationReader
from refusal_dir.directions import DirectionSet
from refusal_dir.errors import ConfigError, DataError


@dataclass(frozen=True)
class LayerScore:
    position: str
    layer: int
    separation_accuracy: float
    auroc: float
    effect_size: float
    probe_accuracy: float | None

    def as_row(self) -> dict[str, object]:
        return asdict(self)


def _cohens_d(positive: torch.Tensor, negative: torch.Tensor) -> float:
    pooled = math.sqrt((float(positive.var(unbiased=False)) + float(negative.var(unbiased=False))) / 2)
    gap = float(positive.mean() - negative.mean())
    return gap / pooled if pooled > 0 else (math.inf if gap > 0 else 0.0)


def _probe_accuracy(
    train_pos: torch.Tensor, train_neg: torch.Tensor, test_pos: torch.Tensor, test_neg: torch.Tensor
) -> float:
    features = torch.cat([train_pos, train_neg]).double()
    center, scale = features.mean(dim=0), features.std(dim=0).clamp_min(1e-8)
    probe = LogisticRegression(C=1.0, max_iter=2000)
    probe.fit(((features - center) / scale).numpy(), [1] * len(train_pos) + [0] * len(train_neg))
    test = (torch.cat([test_pos, test_neg]).double() - center) / scale
    labels = [1] * len(test_pos) + [0] * len(test_neg)
    return float(probe.score(test.numpy(), labels))


def separation_accuracy(
    projected_positive: torch.Tensor,
    projected_negative: torch.Tensor,
    groups: Sequence[str] | None = None,
) -> float:
    """Share of pairs whose positive projects higher, ties one half; balanced over ``groups``.

    With ``groups`` (one name per pair) it is the mean over the groups of each group's share,
    so every kind of pair weighs the same whatever its count.
    """
    wins = (projected_positive > projected_negative).double()
    wins += 0.5 * (projected_positive == projected_negative).double()
    if groups is None or len(set(groups)) < 2:
        return float(wins.mean())
    if len(groups) != len(wins):
        raise DataError(f"{len(groups)} group names for {len(wins)} held-out pairs: give one per pair")
    shares = []
    for name in sorted(set(groups)):
        members = torch.tensor([group == name for group in groups])
        shares.append(float(wins[members].mean()))
    return sum(shares) / len(shares)


def score_layers(
    directions: DirectionSet,
    heldout_positive: ActivationReader,
    heldout_negative: ActivationReader,
    *,
    train_positive: ActivationReader | None = None,
    train_negative: ActivationReader | None = None,
    groups: Sequence[str] | None = None,
) -> list[LayerScore]:
    """Score every (position, layer) of ``directions`` on held-out matched pairs.

    ``groups`` names each held-out pair's kind; the separation accuracy is then balanced over
    the kinds (:func:`separation_accuracy`). AUROC, effect size and the probe pool all pairs.
    """
    site = directions.meta.site
    if heldout_positive.n_prompts != heldout_negative.n_prompts:
        raise DataError(
            f"held-out pairs are unequal: {heldout_positive.n_prompts} positive and "
            f"{heldout_negative.n_prompts} negative prompts"
        )
    if heldout_positive.n_prompts == 0:
        raise DataError("no held-out pairs to score layers on: hold out at least one pair")
    if groups is not None and len(groups) != heldout_positive.n_prompts:
        raise DataError(
            f"{len(groups)} group names for {heldout_positive.n_prompts} held-out pairs: "
            "give one per pair"
        )
    with_probe = train_positive is not None and train_negative is not None
    scores = []
    for p, label in enumerate(directions.meta.positions):
        for layer in range(directions.n_layers):
            unit = directions.directions[p, layer].double()
            held_pos = heldout_positive.column(site, p, layer).double()
            held_neg = heldout_negative.column(site, p, layer).double()
            proj_pos, proj_neg = held_pos @ unit, held_neg @ unit
            separation = separation_accuracy(proj_pos, proj_neg, groups)
            projections = torch.cat([proj_pos, proj_neg]).numpy()
            labels = [1] * len(proj_pos) + [0] * len(proj_neg)
            probe = None
            if with_probe:
                assert train_positive is not None and train_negative is not None
                probe = _probe_accuracy(
                    train_positive.column(site, p, layer),
                    train_negative.column(site, p, layer),
                    held_pos,
                    held_neg,
                )
            scores.append(
                LayerScore(
                    position=label,
                    layer=layer,
                    separation_accuracy=separation,
                    auroc=float(roc_auc_score(labels, projections)),
                    effect_size=_cohens_d(proj_pos, proj_neg),
                    probe_accuracy=probe,
                )
            )
    return scores


def select_layer(
    scores: list[LayerScore], *, n_layers: int, max_layer_fraction: float = 0.8
) -> LayerScore:
    """The best (position, layer) by the documented rule (see the module docstring)."""
    if not 0 < max_layer_fraction <= 1:
        raise ConfigError(
            f"max_layer_fraction must be in (0, 1], got {max_layer_fraction}"
        )
    limit = max(1, math.floor(max_layer_fraction * n_layers))
    eligible = [score for score in scores if score.layer < limit]
    if not eligible:
        raise DataError("no layer scores to select from: score the layers first")
    return max(
        eligible,
        key=lambda s: (s.separation_accuracy, s.auroc, s.effect_size, -s.layer),
    )


def format_score_table(scores: list[LayerScore], *, selected: LayerScore | None = None) -> str:
    """A fixed-width text table of the scores, the selected row marked with ``*``."""
    header = f"{'position':>10} {'layer':>5} {'sep_acc':>8} {'auroc':>6} {'cohen_d':>8} {'probe':>6}"
    lines = [header, "-" * len(header)]
    for score in scores:
        probe = "" if score.probe_accuracy is None else f"{score.probe_accuracy:.3f}"
        mark = " *" if selected is not None and score == selected else ""
        lines.append(
            f"{score.position:>10} {score.layer:>5} {score.separation_accuracy:>8.3f} "
            f"{score.auroc:>6.3f} {score.effect_size:>8.2f} {probe:>6}{mark}"
        )
    return "\n".join(lines)
