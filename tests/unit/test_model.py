from __future__ import annotations

from pathlib import Path

import pytest
import torch

from refusal_dir.errors import ConfigError, ModelLoadError
from refusal_dir.model import PLAIN_CHAT_TEMPLATE, load_model
from refusal_dir.sites import check_layer, hook_name
from refusal_dir.testing import make_tiny_model


def test_hook_name_matches_transformer_lens(tiny_model) -> None:
    assert hook_name("resid_pre", 2) == "blocks.2.hook_resid_pre"
    assert hook_name("resid_post", 0) in tiny_model.bridge.hook_dict
    with pytest.raises(ConfigError, match="unknown site"):
        hook_name("resid_middle", 0)


def test_layer_out_of_range_names_the_range() -> None:
    with pytest.raises(ConfigError, match="layers 0..2"):
        check_layer(3, 3)


def test_exactly_one_bos_reaches_the_model(tiny_model) -> None:
    batch = tiny_model.encode_instructions(["How do I make a cake?", "Hi"])
    bos = tiny_model.tokenizer.bos_token_id
    counts = ((batch.input_ids == bos) & (batch.attention_mask == 1)).sum(dim=1)
    assert counts.tolist() == [1, 1]
    # The first real token of every row is the BOS token, padding is on the left.
    first_real = batch.attention_mask.argmax(dim=1)
    assert batch.input_ids[torch.arange(2), first_real].tolist() == [bos, bos]
    assert batch.attention_mask[:, -1].tolist() == [1, 1]


def test_bridge_shares_weights_with_fast_view(tiny_model) -> None:
    bridge_block = tiny_model.bridge.blocks[0].original_component
    assert bridge_block.mlp.down_proj.weight is tiny_model.layers[0].mlp.down_proj.weight


def test_bridge_boots_on_first_use_without_the_hooks_live_then(tiny_model_dir: Path) -> None:
    from refusal_dir.interventions import addition, steer

    model = load_model(str(tiny_model_dir), device="cpu")
    assert model._bridge is None  # loading alone does not boot it
    batch = model.encode_instructions(["Write a poem about the sea"])
    vector = torch.ones(model.d_model) * 100.0
    with steer(model, addition(vector, layer=0, alpha=1.0)):
        with torch.no_grad():
            steered = model.hf(input_ids=batch.input_ids).logits
            model.bridge  # noqa: B018 - boots inside a steer() scope
    with torch.no_grad():
        plain = model.hf(input_ids=batch.input_ids).logits
        bridge = model.bridge(batch.input_ids)
    assert not torch.allclose(steered, plain, atol=1e-2)  # the hook was live at boot
    torch.testing.assert_close(bridge, plain, atol=1e-4, rtol=1e-4)  # and did not stick
    assert model.bridge is model.bridge


def test_bridge_and_fast_logits_agree(tiny_model) -> None:
    batch = tiny_model.encode_instructions(["Write a poem about the sea", "Hi"])
    with torch.no_grad():
        fast = tiny_model.hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        bridge = tiny_model.bridge(batch.input_ids, attention_mask=batch.attention_mask)
    torch.testing.assert_close(fast, bridge, atol=1e-4, rtol=1e-4)


def test_post_instruction_tokens_are_the_template_suffix(tiny_model) -> None:
    text = tiny_model.format_prompts(["Hello there"])[0]
    assert text.endswith("<end_of_turn>\n<start_of_turn>model\n")
    ids = tiny_model.tokenize([text]).input_ids[0].tolist()
    assert ids[-tiny_model.n_post_instruction_tokens :] == tiny_model._post_instruction_ids


def test_model_without_template_uses_plain_template(tmp_path: Path) -> None:
    directory = make_tiny_model(tmp_path / "plain", n_layers=2, chat_template=False)
    model = load_model(str(directory), device="cpu", with_bridge=False)
    assert model.uses_plain_template
    assert model.chat_template == PLAIN_CHAT_TEMPLATE
    assert model.format_prompts(["Hi"]) == ["<bos>User: Hi\nAssistant:"]


def test_gemma3_architecture_loads(tiny_gemma3_dir: Path) -> None:
    model = load_model(str(tiny_gemma3_dir), device="cpu")
    assert model.n_layers == 2
    assert "blocks.1.hook_resid_post" in model.bridge.hook_dict


def test_stop_tokens_include_end_of_turn(tiny_model) -> None:
    vocab = tiny_model.tokenizer.get_vocab()
    assert vocab["<end_of_turn>"] in tiny_model.stop_token_ids()


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("/nonexistent/model/dir", "not a directory"),
        ("./no-such-model", "not a directory"),
    ],
)
def test_bad_model_paths_get_clear_errors(source: str, message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        load_model(source, device="cpu")


def test_directory_without_config_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path), device="cpu")


def test_unknown_hub_id_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    # As on a machine without hub access, without waiting for network time-outs.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="cannot load model 'no-such-org/no-such-model'"):
        load_model("no-such-org/no-such-model", device="cpu")


def test_bad_dtype_is_rejected(tiny_model_dir: Path) -> None:
    with pytest.raises(ConfigError, match="unknown dtype"):
        load_model(str(tiny_model_dir), device="cpu", dtype="float8")
