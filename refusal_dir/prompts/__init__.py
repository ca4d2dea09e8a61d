"""Prompt sets: contrastive pairs, evaluation instructions, multiple-choice questions, claims.

Everything here returns *instruction text*: the words of one user turn. Chat templates are
applied by the caller (``refusal_dir.model``), never here, so no prompt carries a BOS token or
role markers.

Shipped sets (``refusal_dir/data``, original text written for this package):

- :func:`refusal_pairs` -- harmful instructions, each matched with a harmless one of the same
  form and length (positive = harmful).
- :func:`honesty_pairs` -- a user states a belief and asks; positive = the question followed
  by a truthful answer, negative = the same question followed by an untruthful one (see
  :func:`format_answered_question` for the exact text). In half the pairs the user is wrong
  (the untruthful answer agrees: sycophancy), in the other half right (the truthful answer
  agrees), so agreeing with the user does not separate the pairs; each pair's ``group`` says
  which kind it is.
- :func:`harmful_eval` / :func:`benign_eval` -- held-out instructions for refusal and
  over-refusal rates; none of them occurs in :func:`refusal_pairs`. Each has a category
  (:func:`harmful_eval_categories`, :func:`benign_eval_categories`); benign instructions worded
  like harmful ones are :data:`LOOKALIKE_CATEGORY`. :func:`stratified_sample` keeps the
  categories' shares when a run evaluates only some of the items.
- :func:`harmless_answers` -- ordinary requests, each with a factual answer of 40-100 words
  and a topic (:func:`harmless_answer_topics`): held-out text for the cross-entropy under
  steering. None of them occurs in the evaluation or extraction sets.
- :func:`mmlu_questions` -- four-choice questions, correct positions balanced over A-D.
- :func:`true_false_claims` -- simple factual claims, half true and half false.

Local files (:func:`load_instructions`, :func:`load_pairs`, :func:`load_mc_questions`,
:func:`load_answered_instructions`):

- ``.jsonl``: one JSON object per line; blank lines are skipped.
- ``.json``: one JSON list of objects.
- ``.csv``: a header row naming the fields, then one row per item.

Hub loaders (:func:`load_hub_instructions`, :func:`load_hub_mmlu`, :func:`load_hub_truthfulqa`)
call ``datasets.load_dataset`` and turn any failure into a :class:`DataError` that names the
local-file flag to use instead.

One module an idea, every public name re-exported here: :mod:`~refusal_dir.prompts.items`
(the types and text formats), :mod:`~refusal_dir.prompts.sampling` (seeded orders and
stratified samples), :mod:`~refusal_dir.prompts.records` (parsing rows of files and datasets),
:mod:`~refusal_dir.prompts.shipped`, :mod:`~refusal_dir.prompts.files` and
:mod:`~refusal_dir.prompts.hub` (the three sources).
"""

from __future__ import annotations

from refusal_dir.prompts.files import (
    load_answered_instructions,
    load_categories,
    load_instructions,
    load_mc_questions,
    load_pairs,
)
from refusal_dir.prompts.hub import (
    HUB_INSTRUCTION_SOURCES,
    MMLU_REPO,
    TRUTHFULQA_REPO,
    HubInstructionSource,
    load_hub_instructions,
    load_hub_mmlu,
    load_hub_truthfulqa,
)
from refusal_dir.prompts.items import (
    LETTERS,
    AnsweredInstruction,
    Claim,
    ContrastPair,
    MCQuestion,
    PairSet,
    format_answered_question,
    format_claim_prompt,
    format_mc_prompt,
)
from refusal_dir.prompts.records import MC_CHOICES_IN_FILES
from refusal_dir.prompts.sampling import stratified_sample
from refusal_dir.prompts.shipped import (
    HONESTY_GROUPS,
    LOOKALIKE_CATEGORY,
    benign_eval,
    benign_eval_categories,
    harmful_eval,
    harmful_eval_categories,
    harmless_answer_topics,
    harmless_answers,
    honesty_pairs,
    mmlu_questions,
    refusal_pairs,
    true_false_claims,
)

__all__ = [
    "HONESTY_GROUPS",
    "HUB_INSTRUCTION_SOURCES",
    "LETTERS",
    "LOOKALIKE_CATEGORY",
    "MC_CHOICES_IN_FILES",
    "MMLU_REPO",
    "TRUTHFULQA_REPO",
    "AnsweredInstruction",
    "Claim",
    "ContrastPair",
    "HubInstructionSource",
    "MCQuestion",
    "PairSet",
    "benign_eval",
    "benign_eval_categories",
    "format_answered_question",
    "format_claim_prompt",
    "format_mc_prompt",
    "harmful_eval",
    "harmful_eval_categories",
    "harmless_answer_topics",
    "harmless_answers",
    "honesty_pairs",
    "load_answered_instructions",
    "load_categories",
    "load_hub_instructions",
    "load_hub_mmlu",
    "load_hub_truthfulqa",
    "load_instructions",
    "load_mc_questions",
    "load_pairs",
    "mmlu_questions",
    "refusal_pairs",
    "stratified_sample",
    "true_false_claims",
]
