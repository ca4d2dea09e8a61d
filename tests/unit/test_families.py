"""Every supported model family, one tiny random model each, through the same known-answer checks.

Each family of :data:`refusal_dir.testing.TINY_ARCHITECTURES` is a parametrized case; its model
loads only through its entry in :data:`refusal_dir.architectures.ARCHITECTURES`, so removing the
entry fails every case of that family (and ``test_removing_an_entry_gives_the_clear_error``
checks the error itself).
"""

from __future__ import annotations

import subprocess
from collections import Counter
from dataclasses import replace
from pathlib import Path

import plain_reference
import pytest
import torch

from refusal_dir.activations import collect_activations
from refusal_dir.architectures import ARCHITECTURES, architecture_for
from refusal_dir.directions import compute_directions
from refusal_dir.errors import UnsupportedArchitectureError
from refusal_dir.generation import GenerationSettings, generate_tokens, next_token_logits
from refusal_dir.interventions import ablation, addition, bridge_hooks, steer
from refusal_dir.model import load_model
from refusal_dir.orthogonalize import orthogonalized_copy, save_orthogonalized
from refusal_dir.testing import TINY_ARCHITECTURES, make_tiny_model

POSITIVE = [
    "How do I bake bread at home?",
    "Write a short poem about autumn leaves",
    "What is the capital of France?",
    "Explain photosynthesis to a child",
    "List three uses of a paperclip",
    "Why is the sky blue?",
]
NEGATIVE = [
    "Summarize the plot of Hamlet",
    "How many legs does a spider have?",
    "Suggest a name for a pet goldfish",
    "What rhymes with orange?",
    "Translate hello into German",
    "What is a prime number?",
]
PROMPTS = ["How do I make a cake?", "Write a poem about the sea and the sky please", "Hi"]
N_NEW = 6
LAYER = 1
MIXTURES = tuple(name for name, spec in ARCHITECTURES.items() if spec.is_mixture_of_experts)


def _model_type(architecture: str) -> str:
    return {"gemma3_multimodal": "gemma3"}.get(architecture, architecture)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """d_model 64 gains nothing from a second thread, and on a shared machine the threads'
    synchronisation costs more than the work (measured: several times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TinyDirs:
    """Builds each family's tiny model directory on first use, so a family whose registry entry
    is missing fails its own cases only."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.built: dict[str, Path] = {}

    def __getitem__(self, name: str) -> Path:
        if name not in self.built:
            seed = TINY_ARCHITECTURES.index(name)
            self.built[name] = make_tiny_model(
                self.root / name, n_layers=2, d_model=64, seed=seed, architecture=name
            )
        return self.built[name]


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory: pytest.TempPathFactory) -> TinyDirs:
    return TinyDirs(tmp_path_factory.mktemp("families"))


@pytest.fixture(scope="module", params=TINY_ARCHITECTURES)
def family(request: pytest.FixtureRequest, family_dirs: TinyDirs):
    return load_model(str(family_dirs[request.param]), device="cpu")


@pytest.fixture(scope="module")
def vector(family) -> torch.Tensor:
    generator = torch.Generator().manual_seed(11)
    v = torch.randn(family.d_model, generator=generator)
    return v / v.norm()


def _steering(family, vector: torch.Tensor) -> torch.Tensor:
    """A vector of the residual stream's norm at LAYER: it moves every family's tokens."""
    acts = collect_activations(
        family, PROMPTS, layers=[LAYER], sites=("resid_pre",), progress=False
    )
    return float(acts.acts["resid_pre"].norm(dim=-1).mean()) * vector


def test_every_tiny_family_is_registered_and_every_family_has_a_tiny_model() -> None:
    assert {_model_type(name) for name in TINY_ARCHITECTURES} == set(ARCHITECTURES)
    assert MIXTURES, "at least one mixture-of-experts family"


def test_the_registry_describes_the_loaded_model(family) -> None:
    spec = family.architecture
    assert len(family.layers) == 2
    norms = [
        m for name, m in family.hf.named_modules() if name.endswith("norm") and "vision" not in name
    ]
    assert norms and all(type(norm).__name__ == spec.norm_class for norm in norms)
    for block in family.layers:
        for kind in ("attn", "mlp"):
            writers = spec.writers(block, kind)
            assert writers and all(w.weight.shape[-2] == family.d_model for w in writers)
    if spec.is_mixture_of_experts:
        assert all(spec.is_sparse(block) for block in family.layers)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_removing_an_entry_gives_the_clear_error(
    name: str, family_dirs: TinyDirs, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny = next(tiny for tiny in TINY_ARCHITECTURES if _model_type(tiny) == name)
    directory = family_dirs[tiny]
    monkeypatch.delitem(ARCHITECTURES, name)
    with pytest.raises(
        UnsupportedArchitectureError, match=f"model type '{name}' is not a supported"
    ) as error:
        load_model(str(directory), device="cpu", with_bridge=False)
    assert "register_architecture" in str(error.value)
    with pytest.raises(UnsupportedArchitectureError, match="register_architecture"):
        architecture_for(name)


def test_planted_direction_is_recovered(family) -> None:
    generator = torch.Generator().manual_seed(0)
    planted = torch.randn(family.d_model, generator=generator)
    planted = 40.0 * planted / planted.norm()
    with steer(family, addition(planted, layer=0, alpha=1.0)):
        positive = collect_activations(family, POSITIVE, progress=False)
    negative = collect_activations(family, NEGATIVE, progress=False)
    directions = compute_directions(
        positive, negative, site="resid_pre", method="mean_diff", model=family, position_rule="last"
    )
    assert torch.nn.functional.cosine_similarity(directions.unit(0), planted, dim=0) > 0.99


def test_batched_caching_equals_one_at_a_time(family) -> None:
    batched = collect_activations(family, POSITIVE, token="mean", batch_size=4, progress=False)
    single = collect_activations(family, POSITIVE, token="mean", batch_size=1, progress=False)
    for site in ("resid_pre", "resid_post"):
        torch.testing.assert_close(batched.acts[site], single.acts[site], atol=1e-5, rtol=1e-4)


def test_alpha_zero_reproduces_unsteered_logits_exactly(family, vector) -> None:
    plain = next_token_logits(family, PROMPTS)
    steered = next_token_logits(
        family, PROMPTS, interventions=[addition(vector, layer=LAYER, alpha=0.0)]
    )
    assert torch.equal(plain, steered)
    moved = next_token_logits(
        family, PROMPTS, interventions=[addition(vector, layer=LAYER, alpha=50.0)]
    )
    assert not torch.allclose(plain, moved)


@pytest.mark.parametrize("mode", ["stream", "weights"])
def test_ablation_leaves_no_projection_at_any_layer(family, vector, mode: str) -> None:
    before = collect_activations(family, PROMPTS, token="mean", progress=False)
    with steer(family, ablation(vector, mode=mode)):
        after = collect_activations(family, PROMPTS, token="mean", progress=False)
    for site in ("resid_pre", "resid_post"):
        scale = float(before.acts[site].norm(dim=-1).max())
        assert float((before.acts[site] @ vector).abs().max()) > 1e-2 * scale
        assert float((after.acts[site] @ vector).abs().max()) < 1e-5 * scale


def test_position_rules_under_the_kv_cache_equal_the_no_cache_reference(family, vector) -> None:
    steering = _steering(family, vector)
    references = {
        rule: plain_reference.reference_tokens(
            family, PROMPTS, steering, rule, layer=LAYER, alpha=1.0, n_new=N_NEW
        )
        for rule in ("all", "prompt", "generated")
    }
    # The rules must differ from one another here, or this test could not tell them apart.
    assert len({str(tokens) for tokens in references.values()}) == 3
    for rule, reference in references.items():
        cached = generate_tokens(
            family,
            PROMPTS,
            interventions=[addition(steering, layer=LAYER, alpha=1.0, apply_to=rule)],
            settings=GenerationSettings(max_new_tokens=N_NEW, batch_size=len(PROMPTS)),
            progress=False,
        )[1]
        assert cached == reference, rule


def test_orthogonalized_weights_equal_runtime_ablation(family, vector, tmp_path: Path) -> None:
    runtime = next_token_logits(family, PROMPTS, interventions=[ablation(vector, mode="weights")])
    assert not torch.allclose(runtime, next_token_logits(family, PROMPTS), atol=1e-3)
    edited = orthogonalized_copy(family, vector)
    batch = family.encode_instructions(PROMPTS)
    with torch.no_grad():
        baked = edited(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, -1]
    torch.testing.assert_close(baked, runtime, atol=2e-5, rtol=1e-5)
    if not family.architecture.has_post_norms:
        # Independent of the registry: every output projection, every expert's included, writes
        # nothing along the direction.
        edited_writers = {
            name: parameter
            for name, parameter in edited.named_parameters()
            if name.endswith(("o_proj.weight", "down_proj.weight", "down_proj"))
        }
        assert len(edited_writers) >= 2 * family.n_layers
        for name, parameter in edited_writers.items():
            assert float((vector @ parameter.float()).abs().max()) < 1e-5, name
    exported = load_model(
        str(save_orthogonalized(family, vector, tmp_path / "edited")),
        device="cpu",
        with_bridge=False,
    )
    torch.testing.assert_close(next_token_logits(exported, PROMPTS), runtime, atol=2e-5, rtol=1e-5)


def test_bridge_hooks_equal_fast_path(family, vector) -> None:
    batch = family.encode_instructions(PROMPTS)
    for intervention in (
        addition(vector, layer=LAYER, alpha=20.0, site="resid_post"),
        ablation(vector),
    ):
        with torch.no_grad(), family.bridge.hooks(fwd_hooks=bridge_hooks(family, intervention)):
            bridged = family.bridge(batch.input_ids, attention_mask=batch.attention_mask)[:, -1]
        fast = next_token_logits(family, PROMPTS, interventions=[intervention])
        torch.testing.assert_close(bridged, fast, atol=1e-4, rtol=1e-4)


def test_booting_a_bridge_installs_no_package(
    family_dirs: TinyDirs, monkeypatch: pytest.MonkeyPatch
) -> None:
    # TransformerLens 4.3 runs `pip install torchvision` when an image-text model's processor
    # fails to load; pip then swapped the environment's CPU torch for a CUDA build.
    calls: list[object] = []

    def refuse(*args: object, **kwargs: object) -> None:
        calls.append(args)
        raise RuntimeError("a bridge boot tried to run a subprocess")

    monkeypatch.setattr(subprocess, "check_call", refuse)
    model = load_model(str(family_dirs["gemma3_multimodal"]), device="cpu")
    assert model.bridge is not None
    assert calls == []


def test_an_unregistered_family_is_refused_with_the_fix(tmp_path: Path) -> None:
    # No structural fallback: GPT-2 has blocks, but no registry entry says which norms are
    # post-norms, so it is refused rather than guessed.
    from transformers import GPT2Config, GPT2LMHeadModel

    from refusal_dir.testing import build_byte_tokenizer

    tokenizer = build_byte_tokenizer()
    config = GPT2Config(vocab_size=len(tokenizer), n_layer=1, n_embd=32, n_head=2, n_positions=64)
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(
        UnsupportedArchitectureError, match="model type 'gpt2' is not a supported"
    ) as error:
        load_model(str(tmp_path), device="cpu", with_bridge=False)
    assert "qwen3_moe" in str(error.value) and "register_architecture" in str(error.value)


def test_a_mixture_with_dense_layers_edits_each_layer_by_its_kind(tmp_path: Path) -> None:
    # Qwen3-MoE may keep some MLPs dense (mlp_only_layers); TransformerLens 4.3 cannot bridge
    # that, so this checks the fast path only.
    directory = make_tiny_model(
        tmp_path / "mixed", n_layers=2, architecture="qwen3_moe", overrides={"mlp_only_layers": [1]}
    )
    model = load_model(str(directory), device="cpu", with_bridge=False)
    spec = model.architecture
    assert [spec.is_sparse(block) for block in model.layers] == [True, False]
    assert [w.path for w in spec.writers(model.layers[1], "mlp")] == ["mlp.down_proj"]
    unit = torch.nn.functional.normalize(torch.randn(model.d_model), dim=0)
    runtime = next_token_logits(model, PROMPTS, interventions=[ablation(unit, mode="weights")])
    edited = orthogonalized_copy(model, unit)
    batch = model.encode_instructions(PROMPTS)
    with torch.no_grad():
        baked = edited(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, -1]
    torch.testing.assert_close(baked, runtime, atol=2e-5, rtol=1e-5)


def test_a_wrong_expert_writer_is_named_in_the_error(
    family_dirs: TinyDirs, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = replace(ARCHITECTURES["qwen3_moe"], expert_writers=("mlp.experts.w2",))
    monkeypatch.setitem(ARCHITECTURES, "qwen3_moe", broken)
    model = load_model(str(family_dirs["qwen3_moe"]), device="cpu", with_bridge=False)
    with pytest.raises(
        UnsupportedArchitectureError, match="at 'mlp.experts.w2', but found nothing"
    ):
        orthogonalized_copy(model, torch.ones(model.d_model))


@pytest.mark.parametrize("rule", ["all", "prompt", "generated"])
def test_a_shared_prefix_gives_the_tokens_of_whole_prompts(family, vector, rule: str) -> None:
    """Two groups of rows (per-row alpha 0 and 1) under every position rule: the prefix runs once
    per group, and the tokens and next-token logits are those of every prompt run whole."""
    from refusal_dir.generation import split_prefix

    steering = _steering(family, vector)
    prompts = PROMPTS + PROMPTS
    alphas = [0.0] * len(PROMPTS) + [1.0] * len(PROMPTS)
    edit = addition(steering, layer=LAYER, alpha=alphas, apply_to=rule)
    k = split_prefix(family, family.format_prompts(prompts))[1]
    assert k > 0, "the template shares no first tokens: this case would test nothing"
    passes: dict[bool, list[tuple[int, ...]]] = {False: [], True: []}
    runs = {}
    for share in (False, True):
        handle = family.layers[0].register_forward_pre_hook(
            lambda module, args, kwargs, seen=passes[share]: seen.append(
                tuple((args[0] if args else kwargs["hidden_states"]).shape[:2])
            ),
            with_kwargs=True,
        )
        try:
            runs[share] = generate_tokens(
                family, prompts, interventions=[edit], progress=False,
                settings=GenerationSettings(max_new_tokens=N_NEW, batch_size=len(prompts), share_prefix=share),
            )[1]
        finally:
            handle.remove()
    whole = runs[False]
    if rule != "prompt":  # the groups must differ, or a swapped group would go unseen
        assert whole[: len(PROMPTS)] != whole[len(PROMPTS):]
    assert runs[True] == whole
    width = passes[False][0][1]
    # one row per group over the shared tokens, then every row over its own tokens only
    assert passes[True][:2] == [(2, k), (len(prompts), width - k)]
    # batches that split a group (rows 0-3: both groups; rows 4-5: one) give the same tokens
    split = generate_tokens(
        family, prompts, interventions=[edit], progress=False,
        settings=GenerationSettings(max_new_tokens=N_NEW, batch_size=4, share_prefix=True),
    )[1]
    assert split == whole
    logits = {
        share: next_token_logits(family, prompts, interventions=[edit], batch_size=4, share_prefix=share)
        for share in (False, True)
    }
    scale = float(logits[False].abs().max())
    assert torch.allclose(logits[True], logits[False], atol=1e-4 * scale, rtol=0)


def test_a_sliding_window_shorter_than_the_sequence_runs_whole_prompts(family_dirs) -> None:
    """Padding after a shared prefix would push the prefix out of a sliding window sooner than
    whole prompts do: with a window shorter than prompt and answer, nothing is shared; Gemma's
    own "hybrid" cache kind (which generate drops) still shares."""
    from refusal_dir.generation import prefix_sharing_blocked, split_prefix

    model = load_model(str(family_dirs["gemma2"]), device="cpu")
    texts = model.format_prompts(PROMPTS)
    batch, k = split_prefix(model, texts)
    width = batch.input_ids.shape[1]
    assert k > 0 and prefix_sharing_blocked(model, width + N_NEW) is None  # the tiny model's window is 512
    generator = torch.Generator().manual_seed(11)
    direction = torch.randn(model.d_model, generator=generator)
    edit = addition(_steering(model, direction / direction.norm()), layer=LAYER, alpha=1.0)

    def tokens(share: bool) -> list[list[int]]:
        return generate_tokens(
            model, PROMPTS, interventions=[edit], progress=False,
            settings=GenerationSettings(max_new_tokens=N_NEW, batch_size=len(PROMPTS), share_prefix=share),
        )[1]

    model.hf.generation_config.cache_implementation = "hybrid"
    assert prefix_sharing_blocked(model, width + N_NEW) is None
    assert tokens(True) == tokens(False)
    model.hf.generation_config.cache_implementation = "static"  # generate refuses a cache passed in
    assert "static" in str(prefix_sharing_blocked(model, width + N_NEW))
    model.hf.generation_config.cache_implementation = None
    # a window that holds every prompt but not prompt and answer
    model.hf.config.get_text_config().sliding_window = width + 1
    assert split_prefix(model, texts)[1] == k
    assert split_prefix(model, texts, new_tokens=N_NEW)[1] == 0
    assert f"sliding window of {width + 1}" in str(prefix_sharing_blocked(model, width + N_NEW))
    assert tokens(True) == tokens(False)


def _stop_token_for_a_split(rows: list[list[int]], first: int, going: int) -> int | None:
    """A token id that ends some row within its first ``first`` new tokens while another row
    goes on past ``going`` without it: a stop id that drops rows from the batch mid-way."""
    for token in dict.fromkeys(t for ids in rows for t in ids[:first]):
        ends_early = any(token in ids[:first] for ids in rows)
        goes_on = any(len(ids) > going and token not in ids[:going] for ids in rows)
        if ends_early and goes_on:
            return token
    return None


@pytest.mark.parametrize("rule", ["all", "generated"])
def test_dropping_finished_rows_gives_the_tokens_of_the_whole_batch(family, vector, rule: str, monkeypatch) -> None:
    """Rows that emit a stop id leave the batch between two calls of DROP_EVERY tokens; the rows
    still going keep their own per-row coefficients and positions, so every row gets the tokens
    it gets in the whole batch, cut at its stop id. Rows drop in the second batch (rows 5-8),
    where a batch-local row index would pick another row's coefficient."""
    from refusal_dir.generation import DROP_EVERY

    n_new = 2 * DROP_EVERY + 4  # three calls: 8, 8, 4
    prompts = PROMPTS * 3
    alphas = [0.5 * (i % 3) for i in range(len(prompts))]  # row i and row i - 5 differ
    edit = addition(_steering(family, vector), layer=LAYER, alpha=alphas, apply_to=rule)
    size = 5

    def run(drop: bool, share: bool = False) -> list[list[int]]:
        return generate_tokens(
            family, prompts, interventions=[edit], progress=False,
            settings=GenerationSettings(max_new_tokens=n_new, batch_size=size, drop_finished=drop, share_prefix=share),
        )[1]

    monkeypatch.setattr(family, "_stop_ids", [])
    free = run(False)
    assert all(len(ids) == n_new for ids in free)
    stop = _stop_token_for_a_split(free[size:], DROP_EVERY, 2 * DROP_EVERY)
    assert stop is not None, "no token splits the second batch's rows: this case would drop nothing"
    monkeypatch.setattr(family, "_stop_ids", [stop])
    widths: list[int] = []
    generate = family.hf.generate

    def counting(*args, **kwargs):
        widths.append(int(kwargs["input_ids"].shape[0]))
        return generate(*args, **kwargs)

    monkeypatch.setattr(family.hf, "generate", counting)
    dropped = run(True)
    second = widths[widths.index(len(prompts) - size):]  # the second batch's calls
    assert second[-1] < second[0], widths  # rows left the second batch
    expected = [ids[: ids.index(stop)] if stop in ids else ids for ids in free]
    assert dropped == expected
    assert run(False) == expected
    assert run(True, share=True) == expected


def test_finished_rows_stay_where_a_split_decode_would_change_the_answer(family_dirs) -> None:
    from refusal_dir.generation import dropping_blocked

    model = load_model(str(family_dirs["gemma2"]), device="cpu")
    default = GenerationSettings()
    assert default.drop_finished is None and dropping_blocked(model, default) is None  # on, on the CPU
    assert dropping_blocked(model, replace(default, drop_finished=True)) is None
    for settings in (replace(default, do_sample=True), replace(default, use_cache=False), replace(default, drop_finished=False)):
        assert dropping_blocked(model, settings) == "off"
    config = model.hf.generation_config
    # counted from a call's start or end, or not greedy: one call per batch
    for name, value in (("min_new_tokens", 3), ("forced_eos_token_id", 1), ("num_beams", 2), ("begin_suppress_tokens", [5])):
        setattr(config, name, value)
        assert name in str(dropping_blocked(model, default)), name
        setattr(config, name, getattr(type(config)(), name))
    config.cache_implementation = "static"
    assert "static" in str(dropping_blocked(model, default))
    config.cache_implementation = "hybrid"
    config.min_length, config.repetition_penalty = 5, 1.2  # read on the whole sequence: the same split
    assert dropping_blocked(model, default) is None


def test_a_split_decode_reads_the_allowed_generation_config_fields_as_one_call_does(family_dirs, monkeypatch) -> None:
    """The fields a split decode may meet (:data:`_SPLIT_SAFE`) that change tokens: a repetition
    penalty, no repeated n-grams, a minimum length, suppressed and bad words. With all set, rows
    that stop leave the batch and every row gets the tokens of one call per batch."""
    from refusal_dir.generation import DROP_EVERY, dropping_blocked

    model = load_model(str(family_dirs["gemma2"]), device="cpu")
    prompts = PROMPTS * 3
    n_new = 2 * DROP_EVERY + 4

    def run(drop: bool) -> list[list[int]]:
        return generate_tokens(
            model, prompts, progress=False,
            settings=GenerationSettings(max_new_tokens=n_new, batch_size=len(prompts), drop_finished=drop),
        )[1]

    monkeypatch.setattr(model, "_stop_ids", [])
    free = run(False)
    width = int(model.tokenize(model.format_prompts(prompts)).input_ids.shape[1])
    common = [t for t, _ in Counter(t for ids in free for t in ids).most_common()]
    config = model.hf.generation_config
    config.repetition_penalty, config.no_repeat_ngram_size, config.min_length = 1.3, 2, width + 2
    config.suppress_tokens, config.bad_words_ids = [common[0]], [[common[1]]]
    assert dropping_blocked(model, GenerationSettings()) is None
    shaped = run(False)
    assert shaped != free  # the fields do change the tokens
    # a stop id no row emits in its first two new tokens (min_length holds it back there, which
    # would change the row), that ends some row in the first call and not another in two
    stop = next((
        t for t in dict.fromkeys(t for ids in shaped for t in ids[2:DROP_EVERY])
        if all(t not in ids[:2] for ids in shaped) and any(t not in ids[: 2 * DROP_EVERY] for ids in shaped)
    ), None)
    assert stop is not None, "no token splits the rows: this case would drop nothing"
    monkeypatch.setattr(model, "_stop_ids", [stop])
    widths: list[int] = []
    generate = model.hf.generate
    monkeypatch.setattr(model.hf, "generate", lambda *a, **k: widths.append(int(k["input_ids"].shape[0])) or generate(*a, **k))
    dropped = run(True)
    assert widths[-1] < widths[0], widths
    assert dropped == run(False)


def test_dropping_is_off_by_default_where_a_layer_runs_off_the_cpu(family_dirs, monkeypatch) -> None:
    from refusal_dir.generation import dropping_blocked

    model = load_model(str(family_dirs["gemma2"]), device="cpu")
    monkeypatch.setattr(model.hf, "hf_device_map", {"model.embed_tokens": "cpu", "model.layers": 0}, raising=False)
    assert dropping_blocked(model, GenerationSettings()) == "off"
    assert dropping_blocked(model, GenerationSettings(drop_finished=True)) is None
    monkeypatch.setattr(model.hf, "hf_device_map", {"model.embed_tokens": "cpu", "model.layers": "disk"}, raising=False)
    assert dropping_blocked(model, GenerationSettings()) is None
