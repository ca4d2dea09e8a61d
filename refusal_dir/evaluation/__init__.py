"""Evaluation: judges, metrics under interventions, and confidence intervals.

* :mod:`~refusal_dir.evaluation.judges`: refusal judges (substring; pluggable classifiers);
* :mod:`~refusal_dir.evaluation.degenerate`: is a completion usable text at all;
  :mod:`~refusal_dir.evaluation.thinking`: a reasoning model's thinking, dropped before judging;
* :mod:`~refusal_dir.evaluation.model_judge`: model judges (``classifier:<x>``,
  ``generative:<x>``); :mod:`~refusal_dir.evaluation.agreement`: how two judges agree;
* :mod:`~refusal_dir.evaluation.metrics`: refusal rate and score, answered rate (formerly
  helpfulness), MMLU-style accuracy, KL to the unsteered model, cross-entropy of held-out
  answers, honesty accuracy;
* :mod:`~refusal_dir.evaluation.stats`: Wilson intervals for rates, bootstrap intervals for
  means and paired differences.
"""

from __future__ import annotations

from refusal_dir.evaluation.agreement import agreement_table
from refusal_dir.evaluation.judges import (
    DEGENERATION_REASONS,
    JUDGES,
    OPENING_MARKERS,
    REFUSAL_CONCESSIONS,
    REFUSAL_MARKERS,
    REFUSAL_OPENERS,
    REFUSAL_WINDOW,
    Judge,
    SubstringJudge,
    degeneration,
    get_judge,
    is_answered,
    is_helpful,
    is_refusal,
    judge_name,
    parse_judge_spec,
    resolve_judge,
    strip_thinking,
)
from refusal_dir.evaluation.metrics import (
    DEFAULT_REFUSAL_STARTS,
    LETTER_VARIANTS,
    AccuracyResult,
    CrossEntropyResult,
    KLResult,
    RateResult,
    answer_cross_entropy,
    answer_kl,
    answered_rate,
    balanced_weights,
    chance_levels,
    helpfulness,
    honesty_accuracy,
    kl_divergence,
    kl_from_logits,
    letter_token_ids,
    mmlu_accuracy,
    refusal_rate,
    refusal_score,
    refusal_token_ids,
    special_token_ids,
    top_letter_flags,
)
from refusal_dir.evaluation.model_judge import JUDGE_QUESTION, ClassifierJudge, GenerativeJudge
from refusal_dir.evaluation.stats import (
    bootstrap_ci,
    mean_interval,
    paired_bootstrap_diff,
    wilson_interval,
)

__all__ = [
    "DEFAULT_REFUSAL_STARTS",
    "DEGENERATION_REASONS",
    "JUDGES",
    "LETTER_VARIANTS",
    "OPENING_MARKERS",
    "REFUSAL_CONCESSIONS",
    "REFUSAL_MARKERS",
    "REFUSAL_OPENERS",
    "REFUSAL_WINDOW",
    "JUDGE_QUESTION",
    "AccuracyResult",
    "ClassifierJudge",
    "GenerativeJudge",
    "CrossEntropyResult",
    "Judge",
    "KLResult",
    "RateResult",
    "SubstringJudge",
    "agreement_table",
    "answer_cross_entropy",
    "answer_kl",
    "answered_rate",
    "balanced_weights",
    "bootstrap_ci",
    "chance_levels",
    "degeneration",
    "get_judge",
    "helpfulness",
    "honesty_accuracy",
    "is_answered",
    "is_helpful",
    "is_refusal",
    "judge_name",
    "kl_divergence",
    "kl_from_logits",
    "letter_token_ids",
    "mean_interval",
    "mmlu_accuracy",
    "paired_bootstrap_diff",
    "parse_judge_spec",
    "refusal_rate",
    "refusal_score",
    "refusal_token_ids",
    "resolve_judge",
    "special_token_ids",
    "strip_thinking",
    "top_letter_flags",
    "wilson_interval",
]
