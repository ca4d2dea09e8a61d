"""Checks run before the expensive stages: the steering layer exists, every prompt fits the
model's context with the tokens to generate, and which prompts an evaluation will use."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from refusal_dir import prompts as prompt_sets
from refusal_dir.config import Config
from refusal_dir.datasets import Datasets, mc_formatter
from refusal_dir.errors import ConfigError, DataError
from refusal_dir.model import HookedModel


def check_steering_layer(config: Config, model: HookedModel) -> None:
    """Steering settings that depend on the model: the layer, and (``prompt`` method with
    ``steering.prompt_as: system``) a chat template with a system role."""
    layer = config.steering.layer
    if layer is not None and not 0 <= layer < model.n_layers:
        raise ConfigError(
            f"steering.layer {layer} is out of range: the model has layers 0..{model.n_layers - 1}"
        )
    if "prompt" in config.steering.methods and config.steering.prompt_as == "system":
        model.format_prompts(["Hi"], system=config.steering.prompt_induce)


def context_length(model: HookedModel) -> int | None:
    """Tokens the model can attend to (its position embeddings and tokenizer limit), if known."""
    limits = []
    text_config = model.hf.config.get_text_config()
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(text_config, name, None)
        if isinstance(value, int) and value > 0:
            limits.append(value)
            break
    tokenizer_limit = getattr(model.tokenizer, "model_max_length", None)
    if isinstance(tokenizer_limit, int) and 0 < tokenizer_limit < 10**9:
        limits.append(tokenizer_limit)
    return min(limits) if limits else None


def check_prompt_lengths(
    model: HookedModel, prompt_sets: Mapping[str, Sequence[str]], *, max_new_tokens: int
) -> None:
    """Refuse prompts whose chat-formatted tokens plus ``max_new_tokens`` exceed the context.

    Nothing is truncated: a longer prompt would be run past the positions the model was
    trained on and give garbage without an error.
    """
    limit = context_length(model)
    if limit is None:
        return
    for name, prompts in prompt_sets.items():
        if not prompts:
            continue
        texts = model.format_prompts(list(prompts))
        encoded = model.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        for index, ids in enumerate(encoded):
            if len(ids) + max_new_tokens > limit:
                raise DataError(
                    f"{name} item {index + 1} is {len(ids)} tokens long with the chat template; "
                    f"with {max_new_tokens} new tokens that exceeds the model's context of "
                    f"{limit} tokens: {_length_fix(name)}"
                )


def _length_fix(name: str) -> str:
    """How to get past a prompt too long for the context: a shipped set can be switched off."""
    if name.startswith("data.harmless_answers"):
        return "pass --no-cross-entropy (evaluation.cross_entropy: false), or give shorter answers"
    return "shorten or remove it"


def evaluation_prompts(datasets: Datasets, config: Config) -> dict[str, list[str]]:
    """Every evaluation prompt by set name, as the model sees it (questions formatted)."""
    formatter = mc_formatter(config)
    prompts = {
        f"data.harmful_eval ({config.data.harmful_eval})": datasets.harmful_eval,
        f"data.benign_eval ({config.data.benign_eval})": datasets.benign_eval,
        f"data.mmlu ({config.data.mmlu})": [formatter(q) for q in datasets.mmlu],
    }
    if config.evaluation.honesty:
        prompts["true/false claims"] = [prompt_sets.format_claim_prompt(c) for c in datasets.claims]
    if "prompt" in config.steering.methods:
        for name in ("prompt_induce", "prompt_remove"):
            instruction = getattr(config.steering, name)
            for set_name, texts in list(prompts.items())[:3]:
                prompts[f"{set_name} after steering.{name}"] = [f"{instruction}\n\n{t}" for t in texts]
    if datasets.harmless_answers is not None:
        # The answer is read after the instruction: both must fit (checked as one prompt).
        prompts[f"data.harmless_answers ({config.data.harmless_answers})"] = [
            f"{a.instruction}\n{a.answer}" for a in datasets.harmless_answers
        ]
    return prompts
