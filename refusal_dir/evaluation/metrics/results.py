"""What a metric takes and gives back: the result types, and the check of the item list
every metric makes first."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from refusal_dir.errors import DataError
from refusal_dir.evaluation.stats import wilson_interval


@dataclass(frozen=True)
class RateResult:
    """A rate over prompts: ``value = successes / n``, with the per-item judgements.

    ``breakdown`` counts why items failed where a metric reports it (:func:`answered_rate`).
    """

    value: float
    n: int
    successes: int
    per_item: list[bool]
    completions: list[str]
    breakdown: dict[str, int] = field(default_factory=dict)

    def interval(self, confidence: float = 0.95) -> tuple[float, float]:
        """Wilson score interval of the rate."""
        return wilson_interval(self.successes, self.n, confidence)


@dataclass(frozen=True)
class AccuracyResult:
    """Multiple-choice accuracy with per-question predictions, beside what guessing would get.

    ``predictions[i]`` indexes ``questions[i].choices``; ``correct_probs[i]`` is the probability
    of the correct choice normalized over the question's choices (letters or options).

    ``chance`` is the accuracy of a uniform guess (the mean of ``1 / len(choices)``: 0.25 for
    four choices). ``letter_shares[k]`` is the share of questions answered with position ``k``
    (A, B, ...); ``top_letter_share`` is the largest of them: near 1 the model answers one
    letter whatever the question, and its accuracy is the share of questions whose answer
    sits there, not knowledge.
    """

    value: float
    n: int
    correct: int
    per_item: list[bool]
    predictions: list[int]
    correct_probs: list[float]
    mean_correct_prob: float
    scoring: str
    chance: float
    letter_shares: list[float]
    top_letter_share: float

    def interval(self, confidence: float = 0.95) -> tuple[float, float]:
        """Wilson score interval of the accuracy."""
        return wilson_interval(self.correct, self.n, confidence)

    def chance_in_interval(self, confidence: float = 0.95) -> bool:
        """Whether the accuracy's Wilson interval contains ``chance`` (no evidence of skill)."""
        low, high = self.interval(confidence)
        return low <= self.chance <= high


@dataclass(frozen=True)
class KLResult:
    """Mean and per-prompt KL(P_unsteered || P_steered) of the next-token distribution (nats)."""

    value: float
    n: int
    per_prompt: list[float]


@dataclass(frozen=True)
class CrossEntropyResult:
    """Cross-entropy of given answers, teacher forced (nats per answer token).

    ``per_item[i]`` is the mean of ``-log p`` over the tokens of answer ``i`` (``n_tokens[i]``
    of them); ``value`` is the mean over items (what a sweep reports, with intervals over
    items); ``token_mean`` weighs every token alike (the mean over all answer tokens).
    """

    value: float
    n: int
    per_item: list[float]
    n_tokens: list[int]
    token_mean: float


def check_items(items: Sequence[Any], what: str) -> None:
    if isinstance(items, str):
        raise DataError(f"{what} must be a list, not one string")
    if len(items) == 0:
        raise DataError(f"the {what} list is empty: pass at least one")
