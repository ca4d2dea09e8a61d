"""Training the organism from scratch (float64, seeded, on CPU) and saving it atomically into
a directory of its own; a cache keyed by the config's fingerprint."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
from tqdm.auto import tqdm
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GenerationConfig,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

from refusal_dir.errors import OutputDirError
from refusal_dir.model import pad_ids
from refusal_dir.testing.organism.config import ORGANISM_FORMAT_VERSION, OrganismConfig
from refusal_dir.testing.organism.data import ChatExample, OrganismDataGenerator
from refusal_dir.testing.organism.vocabulary import (
    BOS_TOKEN,
    END_OF_TURN,
    all_topics,
    build_organism_tokenizer,
    chat_prompt,
)

logger = logging.getLogger(__name__)

ORGANISM_INFO_FILE = "organism.json"


def _model_config(config: OrganismConfig, tokenizer: PreTrainedTokenizerFast) -> Gemma2Config:
    end_of_turn = int(tokenizer.convert_tokens_to_ids(END_OF_TURN))  # type: ignore[arg-type]
    model_config = Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=config.d_model,
        intermediate_size=config.d_mlp,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        head_dim=config.head_dim,
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=config.max_len,
        sliding_window=config.max_len,
        query_pre_attn_scalar=config.head_dim,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, end_of_turn],
        attention_dropout=0.0,
        initializer_range=0.02,
    )
    model_config._attn_implementation = "eager"  # soft-capping needs eager attention
    return model_config


def _generation_config(tokenizer: PreTrainedTokenizerFast) -> GenerationConfig:
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.convert_tokens_to_ids(END_OF_TURN), tokenizer.eos_token_id],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )


def _encode_examples(
    examples: Sequence[ChatExample | str], tokenizer: PreTrainedTokenizerFast, max_len: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 where no loss).

    Chats are trained on the answer and its ``<end_of_turn>``; plain text on every token.
    """
    prompts: list[str] = []
    targets: list[str] = []
    for example in examples:
        if isinstance(example, ChatExample):
            prompts.append(chat_prompt(example.instruction))
            targets.append(example.answer + END_OF_TURN)
        else:
            prompts.append(BOS_TOKEN)
            targets.append(example)
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(targets, add_special_tokens=False)["input_ids"]
    rows = []
    for prompt, target in zip(prompt_ids, target_ids, strict=True):
        ids = (prompt + target)[:max_len]
        labels = ([-100] * len(prompt) + target)[:max_len]
        rows.append((ids, labels))
    input_ids, attention_mask = pad_ids([ids for ids, _ in rows], tokenizer.pad_token_id, side="right")
    labels_tensor, _ = pad_ids([labels for _, labels in rows], -100, side="right")
    return input_ids, attention_mask, labels_tensor


def _learning_rate(step: int, config: OrganismConfig) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _train(
    config: OrganismConfig, tokenizer: PreTrainedTokenizerFast, *, progress: bool
) -> tuple[Gemma2ForCausalLM, float]:
    """Train from scratch; returns the model and the mean loss of the last 50 steps."""
    torch.manual_seed(config.seed)
    model = Gemma2ForCausalLM(_model_config(config, tokenizer)).double()
    model.generation_config = _generation_config(tokenizer)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=config.lr,
        betas=(0.9, 0.98),
        eps=1e-8,
    )
    generator = OrganismDataGenerator(config.seed)
    embedding = cast(torch.Tensor, model.get_input_embeddings().weight)
    topic_ids = torch.tensor(tokenizer.convert_tokens_to_ids(list(all_topics())))
    frozen_rows: torch.Tensor | None = None
    recent: list[float] = []
    bar = tqdm(range(config.steps), desc="training organism", disable=not progress, leave=False)
    for step in bar:
        if config.freeze_topic_embeddings and step == config.pretrain_steps:
            frozen_rows = embedding.detach()[topic_ids].clone()
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, config)
        input_ids, attention_mask, labels = _encode_examples(
            generator.take(config.batch_size, plain_only=step < config.pretrain_steps),
            tokenizer,
            config.max_len,
        )
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if frozen_rows is not None:
            with torch.no_grad():
                embedding[topic_ids] = frozen_rows
        recent = (recent + [loss.item()])[-50:]
        if step % 50 == 0 or step == config.steps - 1:
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}")
    model.eval()
    model.float()
    return model, sum(recent) / len(recent)


def read_organism_info(directory: str | Path) -> dict[str, Any] | None:
    """The ``organism.json`` of a finished organism directory, or None if there is none."""
    path = Path(directory) / ORGANISM_INFO_FILE
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _is_finished(directory: Path, config: OrganismConfig) -> bool:
    info = read_organism_info(directory)
    return (
        info is not None
        and info.get("format_version") == ORGANISM_FORMAT_VERSION
        and info.get("config") == config.to_dict()
        and (directory / "model.safetensors").is_file()
        and (directory / "tokenizer.json").is_file()
    )


def _check_output_dir(directory: Path) -> None:
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise OutputDirError(
            f"{directory} already exists and does not hold an organism trained with this config; "
            "pass an empty or new directory (or use load_or_train_organism with a cache dir)"
        )


def train_organism(
    output_dir: str | Path,
    config: OrganismConfig | None = None,
    *,
    progress: bool = True,
) -> Path:
    """Train the organism into ``output_dir`` and return it (about 2 minutes on one core).

    If ``output_dir`` already holds a finished organism with the same config, it is returned
    without training. Otherwise ``output_dir`` must be absent or empty. The model, tokenizer,
    generation config and ``organism.json`` (config, final loss, train time) are written to a
    temporary directory beside it and renamed into place, so a directory that exists is
    complete. Training uses ``config.num_threads`` threads and leaves the caller's global
    torch RNG state and thread count as they were.
    """
    config = OrganismConfig() if config is None else config
    output_dir = Path(output_dir)
    if _is_finished(output_dir, config):
        logger.info("organism already trained in %s", output_dir)
        return output_dir
    _check_output_dir(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)

    tokenizer = build_organism_tokenizer()
    threads = torch.get_num_threads()
    start, start_cpu = time.perf_counter(), time.process_time()
    try:
        torch.set_num_threads(config.num_threads)
        with torch.random.fork_rng(devices=[]):
            model, final_loss = _train(config, tokenizer, progress=progress)
    finally:
        torch.set_num_threads(threads)
    train_seconds = time.perf_counter() - start
    train_cpu_seconds = time.process_time() - start_cpu

    info = {
        "format_version": ORGANISM_FORMAT_VERSION,
        "config": config.to_dict(),
        "final_loss": final_loss,
        "train_seconds": round(train_seconds, 2),
        "train_cpu_seconds": round(train_cpu_seconds, 2),
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "end_of_turn_id": tokenizer.convert_tokens_to_ids(END_OF_TURN),
        "torch_version": torch.__version__,
    }
    temporary = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    temporary.chmod(0o755)  # mkdtemp makes it private; the organism is an ordinary directory
    bars = hf_logging.is_progress_bar_enabled()
    try:
        if not progress:
            hf_logging.disable_progress_bar()
        model.save_pretrained(temporary)
        tokenizer.save_pretrained(temporary)
        (temporary / ORGANISM_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        try:
            os.replace(temporary, output_dir)  # replaces an empty directory; fails on a full one
        except OSError:
            if not _is_finished(output_dir, config):  # not a concurrent run of the same config
                raise OutputDirError(
                    f"could not move the trained organism into {output_dir}"
                ) from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)
    logger.info(
        "trained organism in %.1f s (loss %.4f) -> %s", train_seconds, final_loss, output_dir
    )
    return output_dir


def load_or_train_organism(
    cache_dir: str | Path,
    config: OrganismConfig | None = None,
    *,
    progress: bool = True,
) -> Path:
    """The organism for ``config`` under ``cache_dir``, trained on first use.

    Each config gets its own subdirectory ``organism-<fingerprint>``, so different configs
    can share one cache directory.
    """
    config = OrganismConfig() if config is None else config
    return train_organism(
        Path(cache_dir) / f"organism-{config.fingerprint()}", config, progress=progress
    )
