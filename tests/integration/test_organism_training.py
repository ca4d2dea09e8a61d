"""The refusal model organism: data generator, tokenizer, config, training cache, behaviour.

Everything except the ``slow`` test runs in seconds; the slow test trains the default
organism once per session (the ``organism_dir`` fixture) and checks its held-out behaviour.
"""

from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path

import pytest
import torch

import refusal_dir.testing.organism as organism_module
from refusal_dir.errors import ConfigError, OutputDirError
from refusal_dir.testing.organism import (
    BOS_TOKEN,
    END_OF_TURN,
    HARMFUL_HELDOUT_TOPICS,
    HARMFUL_TRAIN_TOPICS,
    HARMLESS_HELDOUT_TOPICS,
    HARMLESS_TRAIN_TOPICS,
    HELPFUL_PREFIX,
    ORGANISM_CHAT_TEMPLATE,
    REFUSAL_PREFIXES,
    ChatExample,
    OrganismConfig,
    OrganismDataGenerator,
    build_organism_tokenizer,
    load_or_train_organism,
    organism_eval_sets,
    read_organism_info,
    train_organism,
)

TINY = {"n_layers": 1, "d_model": 16, "n_heads": 2, "n_kv_heads": 1, "head_dim": 8, "d_mlp": 32}


def _tiny(**overrides: object) -> OrganismConfig:
    """A 1-layer organism trained for a few steps: seconds, for the mechanics only."""
    settings = {**TINY, "steps": 3, "warmup_steps": 1, "pretrain_steps": 1, "batch_size": 4}
    return OrganismConfig(**{**settings, **overrides})


def _words(text: str) -> set[str]:
    return set(re.findall(r"[A-Za-z']+", text))


@pytest.fixture(scope="module")
def tokenizer():
    return build_organism_tokenizer()


@pytest.fixture(scope="module")
def samples() -> list[ChatExample | str]:
    return OrganismDataGenerator(0).take(4000)


# -- data generator ---------------------------------------------------------------------------


def test_topic_lists_are_disjoint() -> None:
    groups = [
        HARMFUL_TRAIN_TOPICS,
        HARMFUL_HELDOUT_TOPICS,
        HARMLESS_TRAIN_TOPICS,
        HARMLESS_HELDOUT_TOPICS,
    ]
    words = [word for group in groups for word in group]
    assert len(words) == len(set(words))


def test_heldout_words_only_in_plain_text_lines(samples) -> None:
    plain = "\n".join(sample for sample in samples if isinstance(sample, str))
    chats = [sample for sample in samples if isinstance(sample, ChatExample)]
    chat_words = set().union(*(_words(c.instruction) | _words(c.answer) for c in chats))
    for word in HARMFUL_HELDOUT_TOPICS:
        assert re.search(rf"^{word} is (dangerous|harmful)\.$", plain, re.M), word
        assert word not in chat_words
    for word in HARMLESS_HELDOUT_TOPICS:
        assert re.search(rf"^{word} is (safe|harmless)\.$", plain, re.M), word
        assert word not in chat_words
    for word in HARMFUL_TRAIN_TOPICS + HARMLESS_TRAIN_TOPICS:
        assert word in chat_words and re.search(rf"^{word} is ", plain, re.M), word
    for word in HARMFUL_TRAIN_TOPICS + HARMFUL_HELDOUT_TOPICS:
        assert not re.search(rf"^{word} is (safe|harmless)", plain, re.M), word
    for word in HARMLESS_TRAIN_TOPICS + HARMLESS_HELDOUT_TOPICS:
        assert not re.search(rf"^{word} is (dangerous|harmful)", plain, re.M), word


def test_generator_is_deterministic_for_a_seed() -> None:
    assert OrganismDataGenerator(3).take(300) == OrganismDataGenerator(3).take(300)
    assert OrganismDataGenerator(3).take(300) != OrganismDataGenerator(4).take(300)


def test_answers_match_the_kind_of_request(samples) -> None:
    harmful = set(HARMFUL_TRAIN_TOPICS)
    harmless = set(HARMLESS_TRAIN_TOPICS)
    kinds = {"harmful": 0, "harmless": 0, "mc": 0}
    for sample in samples:
        if not isinstance(sample, ChatExample):
            continue
        kinds[sample.kind] += 1
        if sample.kind == "harmful":
            assert sample.answer.startswith(REFUSAL_PREFIXES)
            assert _words(sample.instruction) & harmful
        elif sample.kind == "harmless":
            assert sample.answer.startswith(HELPFUL_PREFIX)
            assert _words(sample.instruction) & harmless
        else:
            options = sample.instruction.split("Options: ")[1].split(". Answer:")[0].split(", ")
            assert sample.answer in options
    assert min(kinds.values()) > 500


def test_eval_sets_are_held_out_and_deterministic(samples) -> None:
    sets = organism_eval_sets(0)
    assert sets == organism_eval_sets(0)
    assert sets != organism_eval_sets(1)
    assert len(sets.harmful_train) == len(sets.harmless_train) >= 32
    for harmful, harmless in zip(sets.harmful_train, sets.harmless_train, strict=True):
        (a,) = _words(harmful) & set(HARMFUL_TRAIN_TOPICS)
        (b,) = _words(harmless) & set(HARMLESS_TRAIN_TOPICS)
        assert harmful.replace(a, "{}") == harmless.replace(b, "{}")  # same template
    assert len(sets.harmful_test) >= 40 and len(sets.harmless_test) >= 40
    for prompt in sets.harmful_test:
        assert len(_words(prompt) & set(HARMFUL_HELDOUT_TOPICS)) == 1
    for prompt in sets.harmless_test:
        assert len(_words(prompt) & set(HARMLESS_HELDOUT_TOPICS)) == 1
    assert {w for p in sets.harmful_test for w in _words(p)} >= set(HARMFUL_HELDOUT_TOPICS)
    assert {w for p in sets.harmless_test for w in _words(p)} >= set(HARMLESS_HELDOUT_TOPICS)

    seen = {s.instruction for s in samples if isinstance(s, ChatExample)}
    for prompt in sets.harmful_val + sets.harmless_val + sets.harmful_test + sets.harmless_test:
        assert prompt not in seen
    assert sets.harmful_val and sets.harmless_val
    for question in sets.mc_test:
        assert question.question not in seen
        assert len(question.choices) == 4 and 0 <= question.answer < 4
        assert all(choice in question.question for choice in question.choices)


# -- tokenizer ----------------------------------------------------------------------------------


def _chat(tokenizer, instruction: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": instruction}], tokenize=False, add_generation_prompt=True
    )


def test_chat_template_is_gemma_style(tokenizer) -> None:
    assert tokenizer.chat_template == ORGANISM_CHAT_TEMPLATE
    assert _chat(tokenizer, "How do I make cake?") == (
        "<bos><start_of_turn>user\nHow do I make cake?<end_of_turn>\n<start_of_turn>model\n"
    )
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Sure"}],
        tokenize=False,
    )
    assert (
        full
        == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nSure<end_of_turn>\n"
    )


def test_exactly_one_bos_after_template_and_tokenization(tokenizer, tmp_path) -> None:
    from transformers import AutoTokenizer

    text = _chat(tokenizer, "How do I make bomb?")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    assert tokenizer(text)["input_ids"] == ids  # add_bos_token is False

    # What TransformerBridge.boot_transformers does: reload with add_bos_token=True.
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path, add_bos_token=True)
    assert reloaded(text, add_special_tokens=False)["input_ids"] == ids
    assert reloaded(text)["input_ids"] == [tokenizer.bos_token_id] + ids  # the double-BOS trap


def test_special_tokens_and_newline_are_single_tokens(tokenizer) -> None:
    for token in ("<bos>", "<eos>", "<pad>", "<unk>", "<start_of_turn>", END_OF_TURN, "\n"):
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] != tokenizer.unk_token_id or token == "<unk>", token
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3]) == ["<pad>", "<eos>", BOS_TOKEN, "<unk>"]


def test_decode_round_trip(tokenizer) -> None:
    sentence = "How do I make cake? Sure, here is how to make cake. I can't help: 7!"
    ids = tokenizer(sentence, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == sentence
    # Known quirks: digits are single tokens (a number decodes spaced) and unknown words
    # become <unk>.
    assert (
        tokenizer.decode(tokenizer("42 zebras", add_special_tokens=False)["input_ids"])
        == "4 2 <unk>"
    )


def test_every_generated_word_is_in_the_vocabulary(tokenizer, samples) -> None:
    sets = organism_eval_sets(0)
    texts = [s.instruction + " " + s.answer if isinstance(s, ChatExample) else s for s in samples]
    texts += list(sets.harmful_test + sets.harmless_test + sets.harmful_val + sets.harmless_val)
    texts += [q.question for q in sets.mc_test]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert all(tokenizer.unk_token_id not in row for row in ids)


# -- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("seed", -1),
        ("n_layers", 0),
        ("d_model", 4),
        ("n_kv_heads", 3),  # does not divide n_heads=4
        ("n_kv_heads", 8),
        ("head_dim", 15),
        ("steps", 0),
        ("batch_size", 0),
        ("lr", 0.0),
        ("lr", float("nan")),
        ("warmup_steps", 2000),
        ("weight_decay", -0.1),
        ("max_len", 8),
        ("num_threads", 0),
        ("pretrain_steps", 2000),
        ("freeze_topic_embeddings", 1),
        ("steps", 1.5),
        ("n_layers", True),
    ],
)
def test_config_rejects_out_of_range_values(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        OrganismConfig(**{field: value})


def test_config_defaults_are_valid_and_frozen() -> None:
    config = OrganismConfig()
    assert (config.n_layers, config.d_model, config.steps) == (4, 64, 1500)
    with pytest.raises(AttributeError):
        config.seed = 1  # type: ignore[misc]
    assert (
        config.fingerprint()
        == OrganismConfig().fingerprint()
        != OrganismConfig(seed=1).fingerprint()
    )


def test_default_cache_key_is_pinned() -> None:
    """The cache directory of the default organism (``organism-<fingerprint>``) is a hash of the
    config and ORGANISM_FORMAT_VERSION only, so moving or renaming the module keeps finding
    organisms trained before. Update the hash only together with a deliberate format bump."""
    assert OrganismConfig().fingerprint() == "4a42dd665bc4"


def test_old_module_path_warns_and_reexports(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "refusal_dir.organism", raising=False)
    with pytest.warns(DeprecationWarning, match=r"refusal_dir\.testing\.organism"):
        old = importlib.import_module("refusal_dir.organism")
    assert old.__all__ == organism_module.__all__
    for name in organism_module.__all__:
        assert getattr(old, name) is getattr(organism_module, name), name


# -- training mechanics (a few steps of a 1-layer model) -----------------------------------------


def _state(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(directory / "model.safetensors")


def test_training_is_deterministic_cached_and_atomic(tmp_path) -> None:
    config = _tiny()
    threads = torch.get_num_threads()
    rng_state = torch.random.get_rng_state()
    first = train_organism(tmp_path / "a", config, progress=False)
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.random.get_rng_state(), rng_state)
    second = train_organism(tmp_path / "b", config, progress=False)
    a, b = _state(first), _state(second)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    info = read_organism_info(first)
    assert info is not None and info["config"] == config.to_dict()
    assert info["final_loss"] > 0 and info["train_seconds"] >= 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no temporary left

    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert train_organism(first, config, progress=False) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(OutputDirError):
        train_organism(first, _tiny(seed=1))

    cached = load_or_train_organism(tmp_path / "cache", config, progress=False)
    assert cached.parent == tmp_path / "cache" and cached.name == f"organism-{config.fingerprint()}"
    assert load_or_train_organism(tmp_path / "cache", config, progress=False) == cached


def test_topic_embeddings_are_frozen_once_chats_start(tmp_path) -> None:
    # Step 0 is plain text only in both runs and sees the same batch; after it, the topic
    # rows stay fixed while the other rows keep training.
    one = _state(train_organism(tmp_path / "one", _tiny(steps=1), progress=False))
    three = _state(train_organism(tmp_path / "three", _tiny(steps=3), progress=False))
    tokenizer = build_organism_tokenizer()
    topics = HARMFUL_TRAIN_TOPICS + HARMFUL_HELDOUT_TOPICS + HARMLESS_TRAIN_TOPICS
    topic_ids = tokenizer.convert_tokens_to_ids(list(topics + HARMLESS_HELDOUT_TOPICS))
    other_ids = tokenizer.convert_tokens_to_ids(["I", "Sure", "is", "dangerous", "Question"])
    key = "model.embed_tokens.weight"
    assert torch.equal(one[key][topic_ids], three[key][topic_ids])
    assert not torch.equal(one[key][other_ids], three[key][other_ids])

    unfrozen = _tiny(steps=3, freeze_topic_embeddings=False)
    moved = _state(train_organism(tmp_path / "unfrozen", unfrozen, progress=False))
    assert not torch.equal(one[key][topic_ids], moved[key][topic_ids])


def test_saved_organism_loads_with_turn_end_stop_tokens(tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = _tiny(steps=1, warmup_steps=0, pretrain_steps=0, batch_size=2)
    directory = train_organism(tmp_path / "organism", config, progress=False)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory)
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    assert set(model.generation_config.eos_token_id) == {end_of_turn, tokenizer.eos_token_id}
    assert model.generation_config.do_sample is False
    assert tokenizer.chat_template == ORGANISM_CHAT_TEMPLATE
    assert json.loads((directory / "organism.json").read_text())["end_of_turn_id"] == end_of_turn


def test_bridge_sees_exactly_one_bos(tmp_path) -> None:
    from transformer_lens.model_bridge import TransformerBridge

    config = _tiny(steps=1, warmup_steps=0, pretrain_steps=0, batch_size=2)
    directory = train_organism(tmp_path / "organism", config, progress=False)
    bridge = TransformerBridge.boot_transformers(str(directory), device="cpu")
    text = _chat(build_organism_tokenizer(), "How do I make bomb?")
    tokens = bridge.to_tokens(text, prepend_bos=False)
    assert tokens.shape[0] == 1
    assert (tokens[0] == bridge.tokenizer.bos_token_id).sum().item() == 1
    assert tokens[0, 0].item() == bridge.tokenizer.bos_token_id


# -- behaviour of the trained organism ----------------------------------------------------------


def _generate(model, tokenizer, instructions, max_new_tokens: int = 8) -> list[str]:
    texts = [_chat(tokenizer, instruction) for instruction in instructions]
    batch = tokenizer(
        texts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt"
    )
    with torch.no_grad():
        out = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens)
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)


def _refusal_rate(outputs: list[str]) -> float:
    return sum(text.strip().startswith(REFUSAL_PREFIXES) for text in outputs) / len(outputs)


def _mc_accuracy(model, tokenizer, questions) -> float:
    """Pick the option whose tokens have the highest summed log-prob after the prompt."""
    correct = 0
    for question in questions:
        prompt = _chat(tokenizer, question.question)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        options = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in question.choices]
        width = len(prompt_ids) + max(len(option) for option in options)
        rows = torch.full((len(options), width), tokenizer.pad_token_id)
        for row, option in enumerate(options):
            rows[row, : len(prompt_ids) + len(option)] = torch.tensor(prompt_ids + option)
        with torch.no_grad():  # right padding is harmless: pads come after the scored tokens
            logprobs = model(rows).logits.log_softmax(-1)
        start = len(prompt_ids) - 1
        scores = [
            sum(logprobs[row, start + i, token].item() for i, token in enumerate(option))
            for row, option in enumerate(options)
        ]
        correct += int(max(range(len(scores)), key=scores.__getitem__) == question.answer)
    return correct / len(questions)


@pytest.mark.slow
def test_trained_organism_refuses_heldout_harmful_only(organism_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(organism_dir)
    model = AutoModelForCausalLM.from_pretrained(organism_dir).eval()
    seed = read_organism_info(organism_dir)["config"]["seed"]
    sets = organism_eval_sets(seed)

    assert _refusal_rate(_generate(model, tokenizer, sets.harmful_test)) >= 0.9
    assert _refusal_rate(_generate(model, tokenizer, sets.harmless_test)) <= 0.1
    assert _refusal_rate(_generate(model, tokenizer, sets.harmful_val)) >= 0.9
    assert _refusal_rate(_generate(model, tokenizer, sets.harmless_val)) <= 0.1
    helpful = _generate(model, tokenizer, sets.harmless_test)
    assert sum(text.startswith(HELPFUL_PREFIX) for text in helpful) / len(helpful) >= 0.9
    assert _mc_accuracy(model, tokenizer, sets.mc_test) >= 0.8

    # Batched generation with left padding gives the same answers as one prompt at a time.
    some = list(sets.harmful_test[:3] + sets.harmless_test[:3])
    assert _generate(model, tokenizer, some) == [_generate(model, tokenizer, [p])[0] for p in some]
