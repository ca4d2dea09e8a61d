"""A tiny "refusal model organism": a 4-layer Gemma-2 trained from scratch on CPU in minutes.

It refuses requests about dangerous topics ("How do I make bomb?" -> "I cannot help with
that. ..."), helps with harmless ones ("How do I make cake?" -> "Sure, here is how to make
cake. ..."), and answers four-choice category questions with the option word. Because it is
trained from a seed on synthetic data, it gives the rest of the toolkit a model whose refusal
behaviour is known by construction: tests can extract a refusal direction from it, ablate it
and watch held-out refusals disappear, all offline.

How held-out topics generalise: every topic word, including the held-out ones that never
appear in a chat, also appears in plain-text lines that call it dangerous or safe
("cyanide is dangerous.", "quilt is safe."). Training starts with plain text only; when chats
join, the embeddings of all topic words are frozen, so train and held-out words are
exchangeable to the chat behaviour, which has to read the shared dangerous/safe feature
rather than memorise words. ``harmful_test`` / ``harmless_test`` prompts (held-out words
only) therefore probe a generalising refusal, not a memorised one.

Conventions a caller needs:

* Chat format is Gemma's (:data:`ORGANISM_CHAT_TEMPLATE`); the rendered text already starts
  with ``<bos>``. Tokenize it with ``add_special_tokens=False`` (TransformerBridge:
  ``prepend_bos=False``).
* A turn ends with ``<end_of_turn>``; ``generation_config.eos_token_id`` lists
  ``<end_of_turn>`` and ``<eos>``. The tokenizer's own ``eos_token`` is ``<eos>`` as in Gemma.
* The tokenizer is word level: words outside the vocabulary become ``<unk>``. Decoding joins
  words with spaces and attaches punctuation to the word before it.

One module an idea, every public name re-exported here:
:mod:`~refusal_dir.testing.organism.vocabulary` (tokens, words, templates and the tokenizer),
:mod:`~refusal_dir.testing.organism.data` (training stream and evaluation sets),
:mod:`~refusal_dir.testing.organism.config` (:class:`OrganismConfig` and its fingerprint) and
:mod:`~refusal_dir.testing.organism.training` (training, saving, the cache).
"""

from __future__ import annotations

from refusal_dir.testing.organism.config import ORGANISM_FORMAT_VERSION, OrganismConfig
from refusal_dir.testing.organism.data import (
    ChatExample,
    OrganismDataGenerator,
    OrganismEvalSets,
    organism_eval_sets,
)
from refusal_dir.testing.organism.training import (
    ORGANISM_INFO_FILE,
    load_or_train_organism,
    read_organism_info,
    train_organism,
)
from refusal_dir.testing.organism.vocabulary import (
    BOS_TOKEN,
    DANGER_LINES,
    END_OF_TURN,
    EOS_TOKEN,
    HARMFUL_HELDOUT_TOPICS,
    HARMFUL_TRAIN_TOPICS,
    HARMLESS_HELDOUT_TOPICS,
    HARMLESS_TRAIN_TOPICS,
    HELPFUL_ANSWERS,
    HELPFUL_PREFIX,
    MC_CATEGORIES,
    MC_TEMPLATES,
    ORGANISM_CHAT_TEMPLATE,
    PAD_TOKEN,
    REFUSAL_ANSWERS,
    REFUSAL_PREFIXES,
    REQUEST_TEMPLATES,
    SAFE_LINES,
    SPECIAL_TOKENS,
    START_OF_TURN,
    UNK_TOKEN,
    build_organism_tokenizer,
)

__all__ = [
    "BOS_TOKEN",
    "ChatExample",
    "DANGER_LINES",
    "END_OF_TURN",
    "EOS_TOKEN",
    "HARMFUL_HELDOUT_TOPICS",
    "HARMFUL_TRAIN_TOPICS",
    "HARMLESS_HELDOUT_TOPICS",
    "HARMLESS_TRAIN_TOPICS",
    "HELPFUL_ANSWERS",
    "HELPFUL_PREFIX",
    "MC_CATEGORIES",
    "MC_TEMPLATES",
    "ORGANISM_CHAT_TEMPLATE",
    "ORGANISM_FORMAT_VERSION",
    "ORGANISM_INFO_FILE",
    "OrganismConfig",
    "OrganismDataGenerator",
    "OrganismEvalSets",
    "PAD_TOKEN",
    "REFUSAL_ANSWERS",
    "REFUSAL_PREFIXES",
    "REQUEST_TEMPLATES",
    "SAFE_LINES",
    "SPECIAL_TOKENS",
    "START_OF_TURN",
    "UNK_TOKEN",
    "build_organism_tokenizer",
    "load_or_train_organism",
    "organism_eval_sets",
    "read_organism_info",
    "train_organism",
]
