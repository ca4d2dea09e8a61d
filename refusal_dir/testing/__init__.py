"""Models for tests and examples whose behaviour is known by construction, built offline.

* :mod:`refusal_dir.testing.tiny`: tiny random models of every supported family
  (:func:`make_tiny_model`, :data:`TINY_ARCHITECTURES`), re-exported here;
* :mod:`refusal_dir.testing.organism`: the refusal model organism, a 4-layer Gemma-2 trained
  from scratch on CPU that refuses harmful requests (import it from its module; it is not
  re-exported, so building a tiny model does not load the trainer).
"""

from __future__ import annotations

from refusal_dir.testing.tiny import (
    SPECIAL_TOKENS,
    TINY_ARCHITECTURES,
    build_byte_tokenizer,
    make_tiny_classifier,
    make_tiny_model,
)

__all__ = [
    "SPECIAL_TOKENS",
    "TINY_ARCHITECTURES",
    "build_byte_tokenizer",
    "make_tiny_classifier",
    "make_tiny_model",
]
