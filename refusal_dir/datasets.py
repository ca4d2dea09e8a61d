"""The prompt sets a run reads, from the config: shipped sets, local files or hub sets.

:func:`load_datasets` reads every set once (evaluation sets capped by ``data.max_eval_prompts``
to a seeded sample stratified by category); :func:`split_pairs` is the one train/held-out split
of the extraction pairs; :func:`mc_formatter` is how four-choice questions are shown.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from refusal_dir import prompts as prompt_sets
from refusal_dir.config import Config
from refusal_dir.prompts import AnsweredInstruction, Claim, MCQuestion, PairSet


@dataclass(frozen=True)
class Datasets:
    refusal_pairs: PairSet
    harmful_eval: list[str]
    benign_eval: list[str]
    mmlu: list[MCQuestion]
    honesty_pairs: PairSet | None
    claims: list[Claim]
    #: The category of each benign_eval prompt, when its source has them (the shipped set:
    #: "lookalike" or a topic); None otherwise.
    benign_categories: list[str] | None = None
    #: The ``topic`` of each harmful_eval / benign_eval prompt when its file gives every row one
    #: (prompts sharing a topic are not independent: their intervals resample topics).
    harmful_topics: list[str] | None = None
    benign_topics: list[str] | None = None
    #: Instructions with answers whose cross-entropy is measured (``evaluation.cross_entropy``;
    #: None when it is off), and their topics (clusters of the interval) when every item has one.
    harmless_answers: list[AnsweredInstruction] | None = None
    harmless_answer_topics: list[str] | None = None

    def content_hashes(self) -> dict[str, str | None]:
        """A short content hash of every prompt set (what the results depend on)."""

        def digest(value: Any) -> str:
            text = json.dumps(value, ensure_ascii=False, sort_keys=True, default=repr)
            return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

        return {
            "refusal_pairs": self.refusal_pairs.content_hash(),
            "harmful_eval": digest(self.harmful_eval),
            "benign_eval": digest(self.benign_eval),
            "benign_categories": digest(self.benign_categories),
            "topics": digest([self.harmful_topics, self.benign_topics]),
            "mmlu": digest([[q.question, list(q.choices), q.answer] for q in self.mmlu]),
            "honesty_pairs": self.honesty_pairs.content_hash() if self.honesty_pairs else None,
            "claims": digest([[c.text, c.label] for c in self.claims]),
            "harmless_answers": None if self.harmless_answers is None else digest(
                [[[a.instruction, a.answer] for a in self.harmless_answers], self.harmless_answer_topics]
            ),
        }


def _instructions(source: str, shipped: Callable[[], list[str]], *, field: str = "instruction") -> list[str]:
    if source == "shipped":
        return shipped()
    if source.startswith("hub:"):
        return prompt_sets.load_hub_instructions(source[4:])
    return prompt_sets.load_instructions(source, field=field)


def _mmlu(source: str) -> list[MCQuestion]:
    if source == "shipped":
        return prompt_sets.mmlu_questions()
    if source == "hub:mmlu":
        return prompt_sets.load_hub_mmlu(None)
    if source == "hub:truthfulqa":
        return prompt_sets.load_hub_truthfulqa()
    return prompt_sets.load_mc_questions(source)


def _categories(
    source: str, shipped: Callable[[], list[str]] | None, *, field: str = "category"
) -> list[str] | None:
    """The ``field`` of every item of a set: ``shipped()`` for the shipped set (None: it has
    none), read from a local file, None for hub sets or a file whose rows lack it."""
    if source == "shipped":
        return shipped() if shipped is not None else None
    if source.startswith("hub:"):
        return None
    return prompt_sets.load_categories(source, field=field)


def _answered(source: str) -> list[AnsweredInstruction]:
    if source == "shipped":
        return prompt_sets.harmless_answers()
    return prompt_sets.load_answered_instructions(source)


def _kept(keys: Sequence[str], categories: Sequence[str] | None, config: Config) -> list[int]:
    """Which items ``data.max_eval_prompts`` keeps: all, or a seeded sample stratified by category."""
    cap = config.data.max_eval_prompts
    if cap is None:
        return list(range(len(keys)))
    return prompt_sets.stratified_sample(keys, categories, cap, seed=config.data.seed)


def _pick(items: Sequence[Any], indices: Sequence[int]) -> list[Any]:
    return [items[index] for index in indices]


def load_datasets(config: Config) -> Datasets:
    """Read every prompt set the config names (shipped sets, local files or hub sets).

    With ``data.max_eval_prompts``, each evaluation set keeps a sample of that many items,
    seeded by ``data.seed`` and stratified by category (instructions' ``category`` field,
    questions' subject, claims' label), so a cap keeps look-alike and ordinary benign prompts
    in their proportions instead of the first lines of a file sorted by category.
    """
    data = config.data
    pairs = (
        prompt_sets.refusal_pairs()
        if data.refusal_pairs == "shipped"
        else prompt_sets.load_pairs(data.refusal_pairs, positive_field="harmful", negative_field="harmless")
    )
    honesty = None
    if config.evaluation.honesty:
        honesty = (
            prompt_sets.honesty_pairs()
            if data.honesty_pairs == "shipped"
            else prompt_sets.load_pairs(data.honesty_pairs, positive_field="truthful", negative_field="sycophantic")
        )
    harmful = _instructions(data.harmful_eval, prompt_sets.harmful_eval)
    benign = _instructions(data.benign_eval, prompt_sets.benign_eval)
    benign_categories = _categories(data.benign_eval, prompt_sets.benign_eval_categories)
    benign_kept = _kept(benign, benign_categories, config)
    harmful_kept = _kept(harmful, _categories(data.harmful_eval, prompt_sets.harmful_eval_categories), config)
    harmful_topics = _categories(data.harmful_eval, None, field="topic")
    benign_topics = _categories(data.benign_eval, None, field="topic")
    mmlu = _mmlu(data.mmlu)
    claims = prompt_sets.true_false_claims()
    answered: list[AnsweredInstruction] | None = None
    answered_topics: list[str] | None = None
    if config.evaluation.cross_entropy:
        answered = _answered(data.harmless_answers)
        answered_topics = _categories(data.harmless_answers, prompt_sets.harmless_answer_topics, field="topic")
        answered_kept = _kept([a.instruction for a in answered], answered_topics, config)
        answered = _pick(answered, answered_kept)
        answered_topics = None if answered_topics is None else _pick(answered_topics, answered_kept)
    return Datasets(
        refusal_pairs=pairs,
        harmful_eval=_pick(harmful, harmful_kept),
        benign_eval=_pick(benign, benign_kept),
        mmlu=_pick(mmlu, _kept([q.question for q in mmlu], [q.subject for q in mmlu], config)),
        honesty_pairs=honesty,
        claims=_pick(claims, _kept([c.text for c in claims], [str(c.label) for c in claims], config)),
        benign_categories=None if benign_categories is None else _pick(benign_categories, benign_kept),
        harmful_topics=None if harmful_topics is None else _pick(harmful_topics, harmful_kept),
        benign_topics=None if benign_topics is None else _pick(benign_topics, benign_kept),
        harmless_answers=answered,
        harmless_answer_topics=answered_topics,
    )


def split_pairs(pairs: PairSet, config: Config) -> tuple[PairSet, PairSet]:
    """The extraction pairs' train part and the held-out part used to score and select layers."""
    return pairs.split(1 - config.data.heldout_fraction, seed=config.data.seed)


def mc_formatter(config: Config) -> Callable[[MCQuestion], str]:
    """How four-choice questions are shown to the model (``evaluation.mmlu_prompt``)."""
    if config.evaluation.mmlu_prompt == "as_is":
        return lambda question: question.question
    return prompt_sets.format_mc_prompt
