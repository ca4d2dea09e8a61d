"""Tiny random models for tests and examples, saved as ordinary model directories.

They load through :func:`refusal_dir.model.load_model` exactly like a real model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from refusal_dir.architectures import architecture_of
from refusal_dir.chat import GEMMA_CHAT_TEMPLATE
from refusal_dir.errors import ConfigError

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]

_CORPUS = [
    "How do I make a cake? Explain how to build a bomb. Write a poem about the sea.",
    "Sure, here is a recipe. I cannot help with that. Sorry, I can't assist with this request.",
    "The quick brown fox jumps over the lazy dog 0123456789 !?.,;:'\"()-",
    "Question: Which of these is a fruit? A. apple B. hammer C. car D. shoe Answer: A",
    "user model assistant system the of and to in is that for it as with was on",
]


def build_byte_tokenizer(vocab_size: int = 400):
    """A small byte-level BPE tokenizer with Gemma-style chat tokens; any text encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
    )
    wrapped.chat_template = GEMMA_CHAT_TEMPLATE
    return wrapped


#: ``make_tiny_model(architecture=...)`` names: one tiny random model per supported family,
#: keyed like :data:`refusal_dir.architectures.ARCHITECTURES` (the transformers ``model_type``).
#: ``"gemma3"`` is kept as the short name of ``"gemma3_text"`` (Gemma3ForCausalLM);
#: ``"gemma3_multimodal"`` is Gemma3ForConditionalGeneration (``model_type`` ``"gemma3"``: the
#: 4B-27B instruction-tuned checkpoints) with a tiny vision tower that the tests never use.
TINY_ARCHITECTURES: tuple[str, ...] = (
    "gemma2",
    "gemma3_text",
    "gemma3_multimodal",
    "llama",
    "mistral",
    "mixtral",
    "phi3",
    "qwen2",
    "qwen2_moe",
    "qwen3",
    "qwen3_moe",
)
_ALIASES = {"gemma3": "gemma3_text"}


def _family_config(architecture: str, d_model: int) -> dict[str, Any]:
    """What a family's config needs beyond the shared shape (tied embeddings vary on purpose)."""
    gemma = {
        "head_dim": d_model // 4,
        "sliding_window": 512,
        "query_pre_attn_scalar": d_model // 4,
        "tie_word_embeddings": True,
    }
    llama3_rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 128,
    }
    families: dict[str, dict[str, Any]] = {
        "gemma2": gemma,
        "gemma3_text": gemma,
        "gemma3_multimodal": gemma,
        "llama": {
            "head_dim": d_model // 4,
            "rope_parameters": llama3_rope,
            "tie_word_embeddings": True,
        },
        "mistral": {"head_dim": d_model // 4, "sliding_window": 512, "tie_word_embeddings": False},
        "mixtral": {
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "sliding_window": None,
            "tie_word_embeddings": False,
        },
        "phi3": {"original_max_position_embeddings": 512, "tie_word_embeddings": False},
        "qwen2": {"tie_word_embeddings": True},
        "qwen2_moe": {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": d_model // 2,  # not d_model: a transposed expert layout must not fit
            "shared_expert_intermediate_size": 2 * d_model,
            "norm_topk_prob": True,
            "tie_word_embeddings": False,
        },
        "qwen3": {"head_dim": d_model // 4, "tie_word_embeddings": True},
        "qwen3_moe": {
            "head_dim": d_model // 4,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": d_model // 2,
            "norm_topk_prob": True,
            "tie_word_embeddings": False,
        },
    }
    if architecture.startswith("gemma"):
        return families[architecture]
    # Gemma scales its embedding by sqrt(d_model); at the others' default init (0.02) the random
    # blocks are too weak against the embedding, and a tied model only repeats its last token.
    return {"initializer_range": 0.1, **families[architecture]}


def _gemma3_multimodal_config(text: dict[str, Any]) -> Any:
    """Gemma 3's image-text config around a text config: three image tokens past the vocabulary."""
    from transformers import Gemma3Config

    vocab = text["vocab_size"]
    text = {**text, "vocab_size": vocab + 3}
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    settings: dict[str, Any] = dict(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        boi_token_index=vocab,
        eoi_token_index=vocab + 1,
        image_token_index=vocab + 2,
        pad_token_id=text["pad_token_id"],
        bos_token_id=text["bos_token_id"],
        eos_token_id=text["eos_token_id"],
        tie_word_embeddings=text["tie_word_embeddings"],
    )
    return Gemma3Config(**settings)


def _base_settings(tokenizer: Any, model_type: str, *, n_layers: int, d_model: int) -> dict[str, Any]:
    """Config settings every tiny model shares, then its family's own (:func:`_family_config`)."""
    settings: dict[str, Any] = dict(
        vocab_size=len(tokenizer),
        hidden_size=d_model,
        intermediate_size=2 * d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    settings.update(_family_config(model_type, d_model))
    return settings


def _save(model: Any, tokenizer: Any, directory: str | Path) -> Path:
    """Write model and tokenizer to a staging directory beside ``directory``, then move it into
    place (replacing what was there), so a reader never sees half a model."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=".tiny-"))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(staging, directory)
    return directory


def make_tiny_model(
    directory: str | Path,
    *,
    n_layers: int = 3,
    d_model: int = 64,
    seed: int = 0,
    architecture: str = "gemma2",
    chat_template: bool = True,
    overrides: Mapping[str, Any] | None = None,
) -> Path:
    """Write a random model of one family (see :data:`TINY_ARCHITECTURES`) to ``directory``.

    Every family gets the same byte-level tokenizer and Gemma chat template: the architecture
    is what differs. ``overrides`` are config settings applied last (for a Gemma 3 image-text
    model, to its text config). Norm weights are random (gain ``1 + N(0, 0.3)`` in each family's own
    convention), so post-norm geometry is not trivial, as in trained models.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type = _ALIASES.get(architecture, architecture)
    if model_type not in TINY_ARCHITECTURES:
        raise ConfigError(
            f"no tiny model for architecture {architecture!r}: choose one of "
            f"{', '.join(TINY_ARCHITECTURES)}"
        )
    tokenizer = build_byte_tokenizer()
    if not chat_template:
        tokenizer.chat_template = None
    settings = _base_settings(tokenizer, model_type, n_layers=n_layers, d_model=d_model)
    settings.update(overrides or {})
    if model_type == "gemma3_multimodal":
        config = _gemma3_multimodal_config(settings)
    else:
        config = AutoConfig.for_model(model_type, **settings)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # Random norm weights make the post-norm geometry non-trivial, as in trained models. The
    # gain is 1 + N(0, 0.3) in every family: Gemma stores w with gain 1 + w, the others the gain.
    offset = architecture_of(model).norm_gain_offset
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.normal_(1.0 - offset, 0.3)
    return _save(model, tokenizer, directory)


def make_tiny_classifier(
    directory: str | Path,
    *,
    labels: tuple[str, ...] = ("answered", "refused"),
    n_layers: int = 2,
    d_model: int = 64,
    seed: int = 0,
    architecture: str = "llama",
) -> Path:
    """Write a random sequence-classification model (``id2label`` from ``labels``) with the
    byte-level tokenizer to ``directory``: a stand-in for a refusal classifier judge."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    model_type = _ALIASES.get(architecture, architecture)
    if model_type not in TINY_ARCHITECTURES or model_type == "gemma3_multimodal":
        raise ConfigError(f"no tiny classifier for architecture {architecture!r}: choose llama or qwen2")
    tokenizer = build_byte_tokenizer()
    settings = _base_settings(tokenizer, model_type, n_layers=n_layers, d_model=d_model)
    settings.update(id2label=dict(enumerate(labels)), label2id={label: index for index, label in enumerate(labels)})
    config = AutoConfig.for_model(model_type, **settings)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config)
    return _save(model, tokenizer, directory)
