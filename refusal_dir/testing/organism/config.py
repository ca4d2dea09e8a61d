"""The organism's architecture and training recipe (:class:`OrganismConfig`), validated, and the
fingerprint that names its cache directory."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from refusal_dir.errors import ConfigError

ORGANISM_FORMAT_VERSION = 3
"""Bump when the data, tokenizer or training recipe changes, so cached organisms retrain."""


def check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(
            f"OrganismConfig.{name} must be an integer in [{low}, {high}], got {value!r}"
        )


def _check_float(name: str, value: Any, low: float, high: float, *, open_low: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (low < value if open_low else low <= value) and value <= high
    if not ok:
        bracket = "(" if open_low else "["
        raise ConfigError(
            f"OrganismConfig.{name} must be a number in {bracket}{low}, {high}], got {value!r}"
        )


@dataclass(frozen=True)
class OrganismConfig:
    """Architecture and training recipe of the organism.

    Same config -> same weights, given the same torch build and CPU kernels (``num_threads``
    is part of the config because the thread count can change float rounding). Training runs
    in float64 and the saved weights are float32: in float32, the rounding differences between
    AVX2 and AVX-512 kernels grew over 1,500 steps into organisms whose refusal was no longer
    mediated by one direction (ablation left 0.71 and 1.00 of held-out harmful refusal); in
    float64 both kernels gave organisms that pass every behaviour test (ablation 0.00). ``pretrain_steps`` are
    plain-text-only steps at the start; ``freeze_topic_embeddings`` keeps the topic words'
    embedding rows fixed from then on (what makes held-out words generalise). The learning
    rate warms up linearly for ``warmup_steps`` and then decays on a cosine to a tenth.
    """

    seed: int = 0
    n_layers: int = 4
    d_model: int = 64
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 16
    d_mlp: int = 256
    steps: int = 1500
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 100
    pretrain_steps: int = 200
    weight_decay: float = 0.01
    max_len: int = 64
    freeze_topic_embeddings: bool = True
    num_threads: int = 1

    def __post_init__(self) -> None:
        check_int("seed", self.seed, 0, 2**31 - 1)
        check_int("n_layers", self.n_layers, 1, 32)
        check_int("d_model", self.d_model, 8, 4096)
        check_int("n_heads", self.n_heads, 1, 64)
        check_int("n_kv_heads", self.n_kv_heads, 1, self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"OrganismConfig.n_kv_heads must divide n_heads={self.n_heads}, got {self.n_kv_heads}"
            )
        check_int("head_dim", self.head_dim, 2, 512)
        if self.head_dim % 2:
            raise ConfigError(f"OrganismConfig.head_dim must be even (rotary), got {self.head_dim}")
        check_int("d_mlp", self.d_mlp, 8, 16384)
        check_int("steps", self.steps, 1, 1_000_000)
        check_int("batch_size", self.batch_size, 1, 4096)
        _check_float("lr", self.lr, 0.0, 1.0, open_low=True)
        check_int("warmup_steps", self.warmup_steps, 0, self.steps)
        check_int("pretrain_steps", self.pretrain_steps, 0, self.steps)
        _check_float("weight_decay", self.weight_decay, 0.0, 1.0)
        check_int("max_len", self.max_len, 48, 4096)
        if not isinstance(self.freeze_topic_embeddings, bool):
            raise ConfigError(
                "OrganismConfig.freeze_topic_embeddings must be True or False, "
                f"got {self.freeze_topic_embeddings!r}"
            )
        check_int("num_threads", self.num_threads, 1, 256)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """A short hash of the config and the organism format version."""
        payload = json.dumps({"format": ORGANISM_FORMAT_VERSION, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]
