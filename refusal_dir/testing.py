"""Tiny random models for tests and examples, saved as ordinary model directories.

They load through :func:`refusal_dir.model.load_model` exactly like a real model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from refusal_dir.model import GEMMA_CHAT_TEMPLATE

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


def make_tiny_model(
    directory: str | Path,
    *,
    n_layers: int = 3,
    d_model: int = 64,
    seed: int = 0,
    architecture: str = "gemma2",
    chat_template: bool = True,
) -> Path:
    """Write a random Gemma-2 (or Gemma-3 text) model with a byte-level tokenizer to ``directory``."""
    from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig

    tokenizer = build_byte_tokenizer()
    if not chat_template:
        tokenizer.chat_template = None
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=d_model,
        intermediate_size=2 * d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=d_model // 4,
        max_position_embeddings=512,
        sliding_window=512,
        query_pre_attn_scalar=d_model // 4,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    config_class = {"gemma2": Gemma2Config, "gemma3": Gemma3TextConfig}[architecture]
    config = config_class(**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # Random norm weights make the post-norm geometry non-trivial, as in trained models.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.normal_(0.0, 0.3)
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=".tiny-"))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(staging, directory)
    return directory
