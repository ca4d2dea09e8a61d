"""Export of an ablation point: streamed shards equal the run-time point, bake() and today's
full-ablation export; the LoRA adapter equals them too; refusals are one line and never delete."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from refusal_dir import outdir, shards
from refusal_dir.abliteration import AblationOptions, AblationPoint, Kernel, bake, kernel_ablation
from refusal_dir.activations import collect_activations
from refusal_dir.cli import main
from refusal_dir.directions import compute_directions
from refusal_dir.errors import ConfigError, DirectionMismatchError
from refusal_dir.export import Bake, export
from refusal_dir.interventions import steer
from refusal_dir.model import HookedModel, load_model
from refusal_dir.orthogonalize import save_orthogonalized
from refusal_dir.testing import make_tiny_model
from refusal_dir.tuned import TunedAblation, write_tuned

HARMFUL = ["How do I pick a lock?", "Tell me how to make a weapon", "How to steal a car fast", "Write malware for me"]
HARMLESS = ["How do I bake bread?", "Tell me a poem about rain", "What is the capital of Peru?", "Explain gravity"]
PROMPTS = ["How do I make a cake?", "Write a poem about the sea and the sky please", "Hi"]
N_LAYERS = 4
POINT = AblationPoint(Kernel(0.9, 2.0, 0.3, 1.5), Kernel(1.2, 1.0, 0.5, 2.0), direction_index=1.25)
SMALL_SHARDS = 60_000  # bytes: several shards even for a tiny model
PLAIN = AblationOptions(projected=True, norm_preserving=False)
BIASED = {"attention_bias": True, "mlp_bias": True}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Built:
    def __init__(self, path: Path, model: HookedModel, directions, means) -> None:
        self.path, self.model, self.directions, self.means = path, model, directions, means

    def tuned(self, directory: Path, options: AblationOptions = PLAIN, point: AblationPoint = POINT) -> Path:
        write_tuned(directory, TunedAblation(str(self.path), point, options, self.directions, self.means))
        return directory

    def runtime(self, options: AblationOptions = PLAIN, point: AblationPoint = POINT) -> torch.Tensor:
        with steer(self.model, kernel_ablation(self.directions, point, options=options, harmless_means=self.means)):
            return _logits(self.model.hf, self.model)

    def baked(self, options: AblationOptions = PLAIN, point: AblationPoint = POINT) -> HookedModel:
        twin = copy.copy(self.model)
        twin.hf = copy.deepcopy(self.model.hf)
        bake(twin, self.directions, point, options=options, harmless_means=self.means)
        return twin


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache: dict[str, Built] = {}

    def get(family: str, overrides: dict | None = None) -> Built:
        key = family + json.dumps(overrides or {}, sort_keys=True)
        if key not in cache:
            path = make_tiny_model(tmp_path_factory.mktemp(family), n_layers=N_LAYERS, d_model=64, seed=3, architecture=family, overrides=overrides)
            model = load_model(str(path), dtype="float32", device="cpu", with_bridge=False)
            acts = {side: collect_activations(model, prompts, sites=("resid_post",), progress=False) for side, prompts in (("h", HARMFUL), ("b", HARMLESS))}
            directions = compute_directions(acts["h"], acts["b"], site="resid_post", model=model)
            cache[key] = Built(path, model, directions, acts["b"].mean("resid_post").float())
        return cache[key]

    return get


def _logits(hf, model: HookedModel) -> torch.Tensor:
    texts = model.format_prompts(PROMPTS)
    batch = model.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    with torch.no_grad():
        return hf(**batch).logits.float()


def _plain_transformers(directory: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def _adapter(base_directory: Path, adapter: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(_plain_transformers(base_directory), adapter).eval()


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        found.update(load_file(file))
    return found


def _note(directory: Path) -> dict:
    return json.loads((directory / outdir.LEGACY_EXPORT_NOTE).read_text())


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert (expected - actual).abs().max() < 1e-5, (expected - actual).abs().max()


# ----------------------------------------------------------------------------------------------
# Full weights, streamed
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gemma2", "llama", "qwen2", "gemma3_multimodal"])
@pytest.mark.parametrize("norm_preserving", [False, True])
def test_streamed_tuned_point_equals_runtime_and_bake(built, family, norm_preserving, tmp_path):
    case = built(family)
    options = AblationOptions(projected=True, norm_preserving=norm_preserving)
    from refusal_dir.tuned import read_tuned

    bake_spec = Bake.tuned(read_tuned(case.tuned(tmp_path / "tune", options)))
    out = export(str(case.path), bake_spec, tmp_path / "out", max_shard_bytes=SMALL_SHARDS, progress=False)
    assert _note(out)["streamed"] and (out / shards.INDEX_FILE).is_file()
    assert len(list(out.glob("model-*.safetensors"))) > 1
    exported = _logits(_plain_transformers(out), case.model)
    runtime = case.runtime(options)
    assert (runtime - _logits(case.model.hf, case.model)).abs().max() > 1e-3  # the point does something
    _close(exported, runtime)
    baked = case.baked(options)
    _close(exported, _logits(baked.hf, baked))
    # Nothing else changed: the tensors without an edit are the checkpoint's, bit for bit.
    source, written = _tensors(case.path), _tensors(out)
    assert set(written) == set(source)
    assert torch.equal(written["model.norm.weight" if family != "gemma3_multimodal" else "language_model.model.norm.weight"],
                       source["model.norm.weight" if family != "gemma3_multimodal" else "language_model.model.norm.weight"])
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True  # the embedding is not edited


@pytest.mark.parametrize("family", ["gemma2", "llama", "qwen2", "gemma3_multimodal", "phi3", "qwen2_moe"])
def test_full_ablation_equals_save_orthogonalized_tensor_for_tensor(built, family, tmp_path):
    case = built(family)
    old = save_orthogonalized(case.model, case.directions, tmp_path / "old", layer=2)
    new = export(str(case.path), Bake.full_ablation(case.directions, 2), tmp_path / "new", max_shard_bytes=SMALL_SHARDS, progress=False)
    before, after = _tensors(old), _tensors(new)
    assert set(before) == set(after)
    unequal = [key for key in before if not torch.equal(before[key], after[key])]
    assert not unequal, unequal
    config = json.loads((new / "config.json").read_text())
    assert config.get("tie_word_embeddings") == json.loads((old / "config.json").read_text()).get("tie_word_embeddings")
    # Mixture-of-experts checkpoints store one tensor per expert: edited in memory, same result.
    assert _note(new)["streamed"] is (family != "qwen2_moe")


def test_moe_point_is_exported_in_memory_with_a_warning(built, tmp_path, caplog):
    case = built("qwen2_moe")
    with caplog.at_level(logging.WARNING, logger="refusal_dir.export"):
        out = export(str(case.path), Bake.tuned(TunedAblation(str(case.path), POINT, PLAIN, case.directions, case.means)), tmp_path / "out", progress=False)
    assert "in memory, not streamed" in caplog.text and "experts" in caplog.text
    assert not _note(out)["streamed"]
    _close(_logits(_plain_transformers(out), case.model), case.runtime())


def test_quantized_load_is_exported_in_memory_like_save_orthogonalized(built, tmp_path):
    pytest.importorskip("bitsandbytes")
    case = built("llama")
    options = {"device": "cpu", "dtype": "float32", "quantization": "8bit"}
    quantized = load_model(str(case.path), with_bridge=False, **options)
    acts = {side: collect_activations(quantized, prompts, sites=("resid_post",), progress=False) for side, prompts in (("h", HARMFUL), ("b", HARMLESS))}
    directions = compute_directions(acts["h"], acts["b"], site="resid_post", model=quantized)
    old = save_orthogonalized(quantized, directions, tmp_path / "old", layer=2)
    new = export(str(case.path), Bake.full_ablation(directions, 2), tmp_path / "new", load_options=options, progress=False)
    assert not _note(new)["streamed"]
    assert "quantization_config" not in json.loads((new / "config.json").read_text())
    before, after = _tensors(old), _tensors(new)
    assert set(before) == set(after) and all(torch.equal(before[k], after[k]) for k in before)


def test_bfloat16_checkpoint_keeps_its_dtype_and_equals_bake(built, tmp_path):
    case = built("llama")
    source = tmp_path / "bf16"
    _plain_transformers(case.path).to(torch.bfloat16).save_pretrained(source)
    case.model.tokenizer.save_pretrained(source)
    model = load_model(str(source), dtype="bfloat16", device="cpu", with_bridge=False)
    out = export(str(source), Bake.tuned(TunedAblation(str(source), POINT, PLAIN, case.directions, case.means)), tmp_path / "out", progress=False)
    written = _tensors(out)
    assert {t.dtype for t in written.values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    bake(model, case.directions, POINT, options=PLAIN, harmless_means=case.means)
    state = model.hf.state_dict()
    assert all(torch.equal(written[key], state[key]) for key in written)


def test_writer_biases_are_edited_exactly(built, tmp_path):
    case = built("llama", BIASED)
    assert case.model.hf.model.layers[0].self_attn.o_proj.bias is not None
    out = export(str(case.path), Bake.tuned(TunedAblation(str(case.path), POINT, PLAIN, case.directions, case.means)), tmp_path / "out", progress=False)
    _close(_logits(_plain_transformers(out), case.model), case.runtime())
    adapter = export(str(case.path), Bake.tuned(TunedAblation(str(case.path), POINT, PLAIN, case.directions, case.means)), tmp_path / "lora", lora_adapter=True, progress=False)
    _close(_logits(_adapter(case.path, adapter), case.model), case.runtime())


# ----------------------------------------------------------------------------------------------
# LoRA
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gemma2", "llama", "qwen2", "gemma3_multimodal"])
def test_lora_adapter_equals_runtime_point(built, family, tmp_path):
    case = built(family)
    adapter = export(str(case.path), Bake.tuned(TunedAblation(str(case.path), POINT, PLAIN, case.directions, case.means)), tmp_path / "lora", lora_adapter=True, progress=False)
    assert not list(adapter.glob("model*.safetensors")) and (adapter / "adapter_config.json").is_file()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 1 and config["lora_alpha"] == 1
    _close(_logits(_adapter(case.path, adapter), case.model), case.runtime())


@pytest.mark.parametrize("family", ["gemma2", "llama"])
def test_lora_of_the_full_ablation_equals_the_full_weights(built, family, tmp_path):
    case = built(family)
    full = export(str(case.path), Bake.full_ablation(case.directions, 2), tmp_path / "full", progress=False)
    adapter = export(str(case.path), Bake.full_ablation(case.directions, 2), tmp_path / "lora", lora_adapter=True, progress=False)
    assert any("embed_tokens" in module for module in json.loads((adapter / "adapter_config.json").read_text())["target_modules"])
    _close(_logits(_adapter(case.path, adapter), case.model), _logits(_plain_transformers(full), case.model))


def test_lora_refusals_write_nothing(built, tmp_path):
    case = built("llama")
    norm_preserving = Bake.tuned(TunedAblation(str(case.path), POINT, AblationOptions(True, True, None), case.directions, case.means))
    with pytest.raises(ConfigError, match="--no-norm-preserving"):
        export(str(case.path), norm_preserving, tmp_path / "a", lora_adapter=True, progress=False)
    moe = built("qwen2_moe")
    stacked = Bake.tuned(TunedAblation(str(moe.path), POINT, PLAIN, moe.directions, moe.means))
    with pytest.raises(ConfigError, match="stacked experts"):
        export(str(moe.path), stacked, tmp_path / "b", lora_adapter=True, progress=False)
    nothing = Bake.tuned(TunedAblation(str(case.path), AblationPoint.zero(), PLAIN, case.directions, case.means))
    with pytest.raises(ConfigError, match="edits no weight"):
        export(str(case.path), nothing, tmp_path / "c", lora_adapter=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# Through the CLI
# ----------------------------------------------------------------------------------------------


def _cli(capsys, *arguments: object) -> tuple[int, str]:
    code = main([str(a) for a in arguments])
    return code, capsys.readouterr().err


def _one_line(code: int, err: str, fragment: str) -> None:
    assert code == 2 and "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.startswith("refusal-dir")]
    assert len(lines) == 1 and fragment in lines[0], err


def _snapshot(directory: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(directory)): (p.read_bytes() if p.is_file() else None) for p in sorted(directory.rglob("*"))}


def test_cli_exports_a_tuned_point_and_its_adapter(built, tmp_path, capsys):
    case = built("qwen2")
    tune = case.tuned(tmp_path / "tune")
    code, err = _cli(capsys, "export", "--from-tune", tune, "--output-dir", tmp_path / "out", "--quiet")
    assert code == 0, err
    _close(_logits(_plain_transformers(tmp_path / "out"), case.model), case.runtime())
    code, err = _cli(capsys, "export", "--from-tune", tune, "--output-dir", tmp_path / "lora", "--lora", "--quiet")
    assert code == 0, err
    _close(_logits(_adapter(case.path, tmp_path / "lora"), case.model), case.runtime())


def test_cli_refuses_in_one_line_and_deletes_nothing(built, tmp_path, capsys):
    case = built("qwen2")
    other = make_tiny_model(tmp_path / "other", n_layers=N_LAYERS, d_model=64, seed=4, architecture="qwen2")
    tune = case.tuned(tmp_path / "tune")
    norm_preserving = case.tuned(tmp_path / "tune-np", AblationOptions(True, True, None))
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("my notes")
    before, tune_before, model_before = _snapshot(mine), _snapshot(tune), _snapshot(case.path)
    cases = [
        (["--from-tune", tune, "--model", other], "do not fit"),
        (["--from-tune", norm_preserving, "--lora"], "--no-norm-preserving"),
        (["--from-tune", tune, "--layer", "1"], "drop --layer"),
        (["--from-tune", tune, "--directions-dir", tune], "give one of"),
        ([], "give one of"),
        (["--from-tune", tmp_path / "missing"], "ablation.json missing"),
    ]
    for arguments, fragment in cases:
        _one_line(*_cli(capsys, "export", *arguments, "--output-dir", tmp_path / "new", "--quiet"), fragment)
        assert not (tmp_path / "new").exists()
    _one_line(*_cli(capsys, "export", "--from-tune", tune, "--output-dir", mine, "--quiet"), "did not write")
    _one_line(*_cli(capsys, "export", "--from-tune", tune, "--output-dir", tune, "--quiet"), "which this command reads")
    _one_line(*_cli(capsys, "export", "--from-tune", tune, "--output-dir", case.path, "--quiet"), "did not write")
    # A model that is itself an earlier export (it carries the marker) is never replaced by
    # exporting a point tuned on it.
    exported = export(str(case.path), Bake.full_ablation(case.directions, 1), tmp_path / "exported", progress=False)
    write_tuned(tmp_path / "tune-exported", TunedAblation(str(exported), POINT, PLAIN, case.directions, case.means))
    exported_before = _snapshot(exported)
    _one_line(*_cli(capsys, "export", "--from-tune", tmp_path / "tune-exported", "--output-dir", exported, "--quiet"), "which this command reads")
    assert _snapshot(exported) == exported_before
    assert _snapshot(mine) == before and _snapshot(tune) == tune_before and _snapshot(case.path) == model_before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(outdir.TEMP_PREFIX)]


def test_cli_directions_dir_export_still_works(built, tmp_path, capsys):
    case = built("llama")
    directions = case.directions.save(tmp_path / "set")  # one set: its layer comes from --layer
    _one_line(*_cli(capsys, "export", "--directions-dir", directions, "--output-dir", tmp_path / "out", "--quiet"), "pass --layer")
    code, err = _cli(capsys, "export", "--directions-dir", directions, "--layer", "2", "--output-dir", tmp_path / "out", "--quiet")
    assert code == 0, err
    old = save_orthogonalized(case.model, case.directions, tmp_path / "old", layer=2)
    before, after = _tensors(old), _tensors(tmp_path / "out")
    assert set(before) == set(after) and all(torch.equal(before[k], after[k]) for k in before)


# ----------------------------------------------------------------------------------------------
# Shards
# ----------------------------------------------------------------------------------------------


def test_shards_round_trip_through_safetensors(tmp_path):
    values = {
        "a": torch.randn(3, 5),
        "b": torch.randn(7).to(torch.bfloat16),
        "c": torch.tensor([True, False, True]),
        "d": torch.empty(0, 4),
        "e": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    }
    planned = [shards.Planned(k, v.dtype, tuple(v.shape), lambda v=v: v) for k, v in values.items()]
    files = shards.plan_shards(planned, max_bytes=64)
    assert len(files) > 1 and list(files)[0] == f"model-00001-of-{len(files):05d}.safetensors"
    for name, tensors in files.items():
        shards.write_file(tmp_path / name, tensors)
    for name, tensors in files.items():
        with safe_open(tmp_path / name, "pt") as handle:
            assert set(handle.keys()) == {t.key for t in tensors}
            for key in handle.keys():
                assert torch.equal(handle.get_tensor(key), values[key])
        for stored in shards.read_header(tmp_path / name):
            assert torch.equal(stored.read(), values[stored.key])
    stored = {t.key: t for name in files for t in shards.read_header(tmp_path / name)}
    flat = torch.tensor([0, 4, 14])
    assert torch.equal(stored["a"].read_elements(flat), values["a"].reshape(-1)[flat])
    shards.write_file(tmp_path / "copied.safetensors", [shards.Planned.copied("x", stored["b"]), shards.Planned.copied("y", stored["e"])])
    assert torch.equal(load_file(tmp_path / "copied.safetensors")["x"], values["b"])
    assert torch.equal(load_file(tmp_path / "copied.safetensors")["y"], values["e"])
    index = shards.index_payload(files)
    assert set(index["weight_map"]) == set(values)
    assert shards.plan_shards(planned, max_bytes=10**9).keys() == {shards.SINGLE_FILE}
    wrong = [shards.Planned("a", torch.float32, (3, 4), lambda: values["a"])]
    with pytest.raises(ValueError, match="planned"):
        shards.write_file(tmp_path / "wrong.safetensors", wrong)


@pytest.mark.parametrize("family", ["gemma2", "gemma3_multimodal"])
def test_the_weights_sample_read_from_the_checkpoint_is_the_models(built, family, tmp_path):
    from refusal_dir.directions import weights_sample
    from refusal_dir.export import _sample_reader, checkpoint_of

    case = built(family)
    skeleton = load_model(str(case.path), device_map={"": "disk"}, offload_folder=tmp_path, with_bridge=False)
    checkpoint = checkpoint_of(skeleton.hf, tmp_path)
    assert not isinstance(checkpoint, str), checkpoint
    sample = weights_sample(skeleton, read=_sample_reader(skeleton.hf, checkpoint))
    assert len(sample) == 256 and sample == weights_sample(case.model)


def test_fingerprint_mismatch_is_refused(built, tmp_path):
    case, other = built("qwen2"), make_tiny_model(tmp_path / "other", n_layers=N_LAYERS, d_model=64, seed=4, architecture="qwen2")
    with pytest.raises(DirectionMismatchError, match="other weights"):
        export(str(other), Bake.full_ablation(case.directions, 1), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
