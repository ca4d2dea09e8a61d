"""Evaluation metrics under interventions: refusal, answered rate, MMLU, KL, cross-entropy,
honesty.

Every function takes a :class:`~refusal_dir.model.HookedModel` and the interventions to apply
(none: the unsteered model), so a notebook can compare conditions with the same call::

    base = refusal_rate(model, harmful)
    steered = refusal_rate(model, harmful, interventions=[ablation(directions, layer=9)])

Per-row coefficients (``addition(..., alpha=[...])``) index the prompts, questions or claims
passed in, as everywhere in the package: row ``i`` uses coefficient ``i``.

Prompts are instructions: the chat template is applied here unless
``apply_chat_template=False``. Generation is greedy
(:class:`~refusal_dir.generation.GenerationSettings` defaults).

One module an idea, every public name re-exported here:

* :mod:`~refusal_dir.evaluation.metrics.results`: the result types;
* :mod:`~refusal_dir.evaluation.metrics.tokens`: refusal-start, answer-letter and special
  token ids;
* :mod:`~refusal_dir.evaluation.metrics.rates`: refusal and answered rates, refusal score;
* :mod:`~refusal_dir.evaluation.metrics.choice`: multiple-choice and honesty accuracy;
* :mod:`~refusal_dir.evaluation.metrics.divergence`: KL to the unsteered model, answer KL and
  answer cross-entropy;
* :mod:`~refusal_dir.evaluation.metrics.forcing`: teacher-forced answer batches.
"""

from __future__ import annotations

from refusal_dir.evaluation.metrics.choice import (
    balanced_weights,
    chance_levels,
    honesty_accuracy,
    mmlu_accuracy,
    top_letter_flags,
)
from refusal_dir.evaluation.metrics.divergence import (
    answer_cross_entropy,
    answer_kl,
    kl_divergence,
    kl_from_logits,
)
from refusal_dir.evaluation.metrics.rates import (
    answered_rate,
    helpfulness,
    refusal_rate,
    refusal_score,
)
from refusal_dir.evaluation.metrics.results import (
    AccuracyResult,
    CrossEntropyResult,
    KLResult,
    RateResult,
)
from refusal_dir.evaluation.metrics.tokens import (
    DEFAULT_REFUSAL_STARTS,
    LETTER_VARIANTS,
    letter_token_ids,
    refusal_token_ids,
    special_token_ids,
)

__all__ = [
    "DEFAULT_REFUSAL_STARTS",
    "LETTER_VARIANTS",
    "AccuracyResult",
    "CrossEntropyResult",
    "KLResult",
    "RateResult",
    "answer_cross_entropy",
    "answer_kl",
    "answered_rate",
    "balanced_weights",
    "chance_levels",
    "helpfulness",
    "honesty_accuracy",
    "kl_divergence",
    "kl_from_logits",
    "letter_token_ids",
    "mmlu_accuracy",
    "refusal_rate",
    "refusal_score",
    "refusal_token_ids",
    "special_token_ids",
    "top_letter_flags",
]
