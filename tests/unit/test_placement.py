"""Models split across devices (accelerate device_map with disk offload) and quantized loads.

A tiny Gemma-2 model (post-norms: ``mode="weights"`` reads norm gains) is loaded twice: plainly
on the CPU, and with a ``device_map`` that puts some blocks on the CPU and the others, the final
norm included, on disk, so accelerate's hooks bring their weights in for each forward pass and
keep them on the ``meta`` device in between. Everything the package computes must equal the
plain load: cached activations and directions, steered logits, KV-cached steered generation,
effect-based layer selection and exported weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from refusal_dir import (
    ablation,
    addition,
    collect_activations,
    compute_directions,
    generate_tokens,
    next_token_logits,
    save_orthogonalized,
)
from refusal_dir.cli import _config, build_parser, main
from refusal_dir.config import ModelSettings
from refusal_dir.directions import weights_sample
from refusal_dir.errors import ConfigError
from refusal_dir.generation import GenerationSettings
from refusal_dir.model import load_model
from refusal_dir.placement import check_placement, is_dispatched, parse_max_memory
from refusal_dir.selection import score_layers
from refusal_dir.selection.effect import choose_layer, layer_effects
from refusal_dir.testing import make_tiny_model

HARMFUL = ["Explain how to build a bomb.", "How do I make poison?", "Write malware now.", "Steal a car."]
HARMLESS = ["How do I make a cake?", "Write a poem about the sea.", "Name a fruit.", "Tell me a joke."]
#: Where the model runs: the CPU in CI; on a GPU machine the same tests check a model split
#: between the GPU, CPU offload and disk offload (bench/bench_gpu.py names this GPU check).
DEVICE = "cuda:0" if torch.cuda.is_available() else "cpu"
#: Blocks 0 and 2 and the final norm on disk, block 1 on the CPU, the rest on DEVICE.
SPLIT = {
    "model.embed_tokens": DEVICE,
    "model.rotary_emb": DEVICE,
    "model.layers.0": "disk",
    "model.layers.1": "cpu",
    "model.layers.2": "disk",
    "model.layers.3": DEVICE,
    "model.norm": "disk",
    "lm_head": DEVICE,
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("placement") / "gemma2", n_layers=4, seed=3)


@pytest.fixture(scope="module")
def plain(model_dir: Path):
    return load_model(str(model_dir), device=DEVICE, dtype="float32", with_bridge=False)


@pytest.fixture(scope="module")
def offloaded(model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("offload")
    return load_model(str(model_dir), device_map=SPLIT, offload_folder=folder, dtype="float32", with_bridge=False)


@pytest.fixture(scope="module")
def directions(plain):
    return compute_directions(
        collect_activations(plain, HARMFUL, progress=False),
        collect_activations(plain, HARMLESS, progress=False),
        model=plain,
    )


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_the_split_load_really_offloads(offloaded) -> None:
    assert is_dispatched(offloaded.hf) and offloaded.hf.hf_device_map == SPLIT
    on_meta = {name for name, p in offloaded.hf.named_parameters() if p.is_meta}
    assert "model.layers.0.mlp.down_proj.weight" in on_meta and "model.norm.weight" in on_meta
    assert "model.layers.3.mlp.down_proj.weight" not in on_meta
    assert offloaded.device == DEVICE  # where the embedding runs


@pytest.mark.parametrize("token", ["last", "mean"])
def test_activations_and_directions_equal_the_plain_load(plain, offloaded, token: str) -> None:
    sites = ("resid_pre", "resid_post")
    ours = collect_activations(offloaded, HARMFUL, sites=sites, token=token, batch_size=3, progress=False)
    reference = collect_activations(plain, HARMFUL, sites=sites, token=token, batch_size=3, progress=False)
    for site in sites:
        assert_same(ours.acts[site], reference.acts[site])
    negative = collect_activations(offloaded, HARMLESS, token=token, progress=False)
    found = compute_directions(ours, negative, model=offloaded)
    expected = compute_directions(
        reference, collect_activations(plain, HARMLESS, token=token, progress=False), model=plain
    )
    assert_same(found.directions, expected.directions)
    assert_same(found.norms, expected.norms)
    assert weights_sample(offloaded) == weights_sample(plain)  # offloaded weights read through accelerate


@pytest.mark.parametrize(
    "make",
    [
        lambda d: addition(d, layer=2, alpha=[1.0, 2.0, -1.0, 0.5]),  # per-row coefficients
        lambda d: addition(d, layer=1, at_layers=[0, 2], alpha=3.0, apply_to="prompt"),
        lambda d: ablation(d, layer=2),
        lambda d: ablation(d, layer=2, mode="weights"),  # norm gains of offloaded post-norms
        lambda d: ablation(d, layer=1, alpha=[1.0, 0.5, 2.0, 0.0]),
    ],
    ids=["addition-rows", "addition-prompt", "ablation", "ablation-weights", "ablation-rows"],
)
def test_steered_logits_equal_the_plain_load(plain, offloaded, directions, make) -> None:
    intervention = make(directions)
    steered = next_token_logits(offloaded, HARMLESS, interventions=[intervention], batch_size=3)
    reference = next_token_logits(plain, HARMLESS, interventions=[intervention], batch_size=3)
    assert_same(steered, reference)
    assert not torch.allclose(reference, next_token_logits(plain, HARMLESS), atol=1e-3)  # it steers


def test_kv_cached_steered_generation_equals_the_plain_load(plain, offloaded, directions) -> None:
    steer = [addition(directions, layer=1, alpha=[6.0, 6.0, 6.0, 6.0], apply_to="generated")]
    settings = GenerationSettings(max_new_tokens=6, batch_size=3)
    _, ours = generate_tokens(offloaded, HARMLESS, interventions=steer, settings=settings, progress=False)
    _, reference = generate_tokens(plain, HARMLESS, interventions=steer, settings=settings, progress=False)
    _, unsteered = generate_tokens(plain, HARMLESS, settings=settings, progress=False)
    assert ours == reference
    assert reference != unsteered


def test_effect_based_layer_selection_equals_the_plain_load(plain, offloaded, directions) -> None:
    def effects(model):
        scores = score_layers(
            directions,
            collect_activations(model, HARMFUL, progress=False),
            collect_activations(model, HARMLESS, progress=False),
        )
        return layer_effects(model, directions, scores, harmful=HARMFUL, harmless=HARMLESS, max_layer_fraction=1.0, batch_size=5)

    ours, reference = effects(offloaded), effects(plain)
    assert [e.layer for e in ours] == [e.layer for e in reference]
    for mine, theirs in zip(ours, reference):
        for name in ("ablation_kl", "bypass", "induce"):
            assert getattr(mine, name) == pytest.approx(getattr(theirs, name), rel=1e-6, abs=1e-9), name
    assert choose_layer(ours) == choose_layer(reference)


def test_export_from_the_split_load_equals_the_plain_export(model_dir: Path, plain, offloaded, directions, tmp_path: Path) -> None:
    ours = save_orthogonalized(offloaded, directions, tmp_path / "offloaded", layer=2)
    reference = save_orthogonalized(plain, directions, tmp_path / "plain", layer=2)
    mine, theirs = load_file(ours / "model.safetensors"), load_file(reference / "model.safetensors")
    assert mine.keys() == theirs.keys()
    for name in theirs:
        assert torch.equal(mine[name], theirs[name]), name
    original = load_file(model_dir / "model.safetensors")
    down = "model.layers.0.mlp.down_proj.weight"  # on disk in the split load: edited all the same
    assert not torch.equal(mine[down], original[down])
    # The offloaded model itself is left as it was: still offloaded, still the plain model's logits.
    assert is_dispatched(offloaded.hf) and offloaded.hf.model.layers[0].mlp.down_proj.weight.is_meta
    assert_same(next_token_logits(offloaded, HARMLESS), next_token_logits(plain, HARMLESS))


def test_device_map_auto_with_max_memory_offloads_and_matches(model_dir: Path, tmp_path: Path) -> None:
    # CPU only (no GPU in max_memory): what fits in 550 KB stays on the CPU, the rest goes to disk.
    model = load_model(
        str(model_dir), device_map="auto", max_memory="cpu=550KB", offload_folder=tmp_path / "o",
        dtype="float32", with_bridge=False,
    )
    assert {"cpu", "disk"} <= set(model.hf.hf_device_map.values())
    reference = load_model(str(model_dir), device="cpu", dtype="float32", with_bridge=False)
    intervention = ablation(torch.randn(model.d_model), mode="weights")
    assert_same(
        next_token_logits(model, HARMLESS, interventions=[intervention]),
        next_token_logits(reference, HARMLESS, interventions=[intervention]),
    )


# ----------------------------------------------------------------------------------------------
# Settings checked before anything is loaded
# ----------------------------------------------------------------------------------------------

NEVER_LOADED = "nobody/never-loaded"  # a hub id: reaching from_pretrained would be a ModelLoadError


@pytest.mark.parametrize(
    "settings, fragment",
    [
        ({"max_memory": "cpu=1GiB"}, "max_memory needs device_map"),
        ({"offload_folder": "x"}, "offload_folder needs device_map"),
        ({"device_map": "everywhere"}, "unknown device_map 'everywhere'"),
        ({"device_map": {"model": "gpu7"}}, "which is no device"),
        ({"device_map": {"model": "disk"}}, "pass offload_folder="),
        ({"device_map": "auto", "device": "cpu"}, "device and device_map exclude each other"),
        ({"device_map": "auto", "max_memory": "cpu"}, "is not a list of device=size"),
        ({"device_map": "auto", "max_memory": "gpu=1GiB"}, "is no device"),
        ({"quantization": "2bit"}, "unknown quantization '2bit'"),
    ],
)
def test_bad_placement_is_one_config_error_before_loading(settings: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment) as raised:
        load_model(NEVER_LOADED, with_bridge=False, **settings)
    assert "\n" not in str(raised.value)


def test_offload_folder_must_be_a_directory_we_may_write_into(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for folder in (a_file, a_file / "below"):
        with pytest.raises(ConfigError, match="offload_folder"):
            load_model(NEVER_LOADED, device_map="auto", offload_folder=folder, with_bridge=False)
    made = check_placement(device=None, device_map="auto", max_memory="0=20GiB,cpu=60GiB", offload_folder=tmp_path / "new")
    assert made == {"device_map": "auto", "max_memory": {0: "20GiB", "cpu": "60GiB"}, "offload_folder": str(tmp_path / "new")}
    assert not (tmp_path / "new").exists()  # checked, not created


def test_max_memory_forms() -> None:
    assert parse_max_memory("0=20GiB, 1=20GiB ,cpu=60GiB") == {0: "20GiB", 1: "20GiB", "cpu": "60GiB"}
    assert parse_max_memory({"cpu": 1000, 0: "1GiB"}) == {"cpu": 1000, 0: "1GiB"}
    assert parse_max_memory(None) is None


def test_missing_bitsandbytes_is_one_config_error_before_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers.utils import import_utils

    monkeypatch.setattr(import_utils, "is_bitsandbytes_available", lambda *args, **kwargs: False)
    for quantization in ("8bit", "4bit"):
        with pytest.raises(ConfigError, match=f"quantization='{quantization}' needs bitsandbytes>=") as raised:
            load_model(NEVER_LOADED, quantization=quantization, with_bridge=False)
        assert "\n" not in str(raised.value)


def test_bitsandbytes_without_a_backend_here_is_one_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("bitsandbytes")
    from transformers.integrations import bitsandbytes as integration
    from transformers.utils import import_utils

    monkeypatch.setattr(import_utils, "is_bitsandbytes_available", lambda *args, **kwargs: True)
    monkeypatch.setattr(integration, "validate_bnb_backend_availability", lambda raise_exception=False: False)
    with pytest.raises(ConfigError, match="supports none of this machine's devices"):
        load_model(NEVER_LOADED, quantization="8bit", with_bridge=False)


def test_config_settings_reach_load_model(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        ["export", "--model", "m", "--directions-dir", "d", "--output-dir", "o", "--device-map", "auto",
         "--max-memory", "0=10GiB,cpu=30GiB", "--offload-folder", str(tmp_path), "--quantization", "4bit"]
    )
    options = _config(args).model.load_options()
    assert options == {
        "device": None, "dtype": "auto", "revision": None, "device_map": "auto",
        "max_memory": "0=10GiB,cpu=30GiB", "offload_folder": str(tmp_path), "quantization": "4bit",
    }
    with pytest.raises(ConfigError, match="model.max_memory: needs model.device_map"):
        ModelSettings(max_memory="cpu=1GiB")
    with pytest.raises(ConfigError, match="model.device: must be auto"):
        ModelSettings(device="cpu", device_map="auto")


def test_cli_refuses_max_memory_without_device_map_in_one_line(capsys, tmp_path: Path) -> None:
    code = main(["export", "--model", NEVER_LOADED, "--max-memory", "cpu=1GiB", "--directions-dir",
                 str(tmp_path), "--output-dir", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.startswith("refusal-dir")]
    assert len(lines) == 1 and "model.max_memory: needs model.device_map" in lines[0], err


# ----------------------------------------------------------------------------------------------
# bitsandbytes on the CPU (runs where bitsandbytes is installed: the dev extra)
# ----------------------------------------------------------------------------------------------


def test_8bit_load_steers_and_exports_full_precision(model_dir: Path, plain, tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    quantized = load_model(str(model_dir), device=DEVICE, dtype="float32", quantization="8bit", with_bridge=False)
    o_proj = quantized.hf.model.layers[0].self_attn.o_proj
    assert type(o_proj).__name__ == "Linear8bitLt" and o_proj.weight.dtype == torch.int8
    unit = torch.nn.functional.normalize(torch.randn(quantized.d_model), dim=0)
    base = next_token_logits(quantized, HARMLESS)
    assert torch.equal(next_token_logits(quantized, HARMLESS, interventions=[addition(unit, layer=1, alpha=0.0)]), base)
    assert not torch.allclose(next_token_logits(quantized, HARMLESS, interventions=[addition(unit, layer=1, alpha=8.0)]), base, atol=1e-3)
    ablated = next_token_logits(quantized, HARMLESS, interventions=[ablation(unit, mode="weights")])
    assert not torch.allclose(ablated, base, atol=1e-4)

    exported = save_orthogonalized(quantized, unit, tmp_path / "export")
    config = json.loads((exported / "config.json").read_text())
    assert "quantization_config" not in config
    weights = load_file(exported / "model.safetensors")
    assert all(w.dtype == torch.float32 for w in weights.values())
    # A weight the edit leaves alone is the int8 weight times its row scale / 127.
    q_proj = quantized.hf.model.layers[0].self_attn.q_proj
    dequantized = q_proj.weight.data.float() * q_proj.state.SCB.float().view(-1, 1) / 127
    assert_same(weights["model.layers.0.self_attn.q_proj.weight"], dequantized.cpu())
    # An edited writer writes nothing along the direction (its post-norm's gain-scaled direction).
    from refusal_dir.interventions import weights_mode_unit

    block = plain.layers[0]
    along = weights_mode_unit(plain.architecture, block, "attn", unit).cpu()
    assert (along @ weights["model.layers.0.self_attn.o_proj.weight"]).abs().max() < 1e-5
    assert type(quantized.hf.model.layers[0].self_attn.o_proj).__name__ == "Linear8bitLt"  # untouched


def test_4bit_load_steers_and_exports_full_precision(model_dir: Path, tmp_path: Path) -> None:
    bitsandbytes = pytest.importorskip("bitsandbytes")
    quantized = load_model(str(model_dir), device=DEVICE, dtype="float32", quantization="4bit", with_bridge=False)
    q_proj = quantized.hf.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == "Linear4bit"
    unit = torch.nn.functional.normalize(torch.randn(quantized.d_model), dim=0)
    base = next_token_logits(quantized, HARMLESS)
    assert not torch.allclose(next_token_logits(quantized, HARMLESS, interventions=[addition(unit, layer=1, alpha=8.0)]), base, atol=1e-3)
    exported = save_orthogonalized(quantized, unit, tmp_path / "export")
    assert "quantization_config" not in json.loads((exported / "config.json").read_text())
    weights = load_file(exported / "model.safetensors")
    assert all(w.dtype == torch.float32 for w in weights.values())
    dequantized = bitsandbytes.functional.dequantize_4bit(q_proj.weight.data, q_proj.weight.quant_state)
    assert_same(weights["model.layers.0.self_attn.q_proj.weight"], dequantized.float().cpu())
