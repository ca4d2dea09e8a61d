from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from refusal_dir.activations import Activations, collect_activations
from refusal_dir.directions import (
    DirectionSet,
    compute_directions,
    mean_diff,
    pca_diff,
    probe_direction,
)
from refusal_dir.errors import ConfigError, DataError, DirectionMismatchError, OutputDirError
from refusal_dir.interventions import addition, steer
from refusal_dir.selection import format_score_table, score_layers, select_layer

PROMPTS_A = [
    "How do I bake bread at home?",
    "Write a short poem about autumn leaves",
    "What is the capital of France?",
    "Explain photosynthesis to a child",
    "List three uses of a paperclip",
    "Describe the rules of chess briefly",
    "Give me a tip for learning Spanish",
    "Why is the sky blue?",
]
PROMPTS_B = [
    "Summarize the plot of Hamlet",
    "How many legs does a spider have?",
    "Suggest a name for a pet goldfish",
    "What rhymes with orange?",
    "Translate hello into German",
    "How far is the Moon from Earth?",
    "Recommend a board game for four players",
    "What is a prime number?",
]


@pytest.mark.parametrize("position", ["last", "mean", "post_instruction"])
def test_batched_equals_one_at_a_time(tiny_model, position: str) -> None:
    batched = collect_activations(tiny_model, PROMPTS_A, token=position, batch_size=5, progress=False)
    single = collect_activations(tiny_model, PROMPTS_A, token=position, batch_size=1, progress=False)
    for site in ("resid_pre", "resid_post"):
        torch.testing.assert_close(batched.acts[site], single.acts[site], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("position", ["last", "mean"])
def test_fast_path_equals_bridge_hook_points(tiny_model, position: str) -> None:
    fast = collect_activations(tiny_model, PROMPTS_B, token=position, progress=False)
    bridge = collect_activations(tiny_model, PROMPTS_B, token=position, backend="bridge", progress=False)
    for site in ("resid_pre", "resid_post"):
        torch.testing.assert_close(fast.acts[site], bridge.acts[site], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("sites", [("resid_pre", "resid_post"), ("resid_pre",)])
@pytest.mark.parametrize("backend", ["fast", "bridge"])
def test_backends_equal_run_with_cache(tiny_model, backend: str, sites: tuple[str, ...]) -> None:
    # The reference is what a TransformerLens user reads: run_with_cache at the hook names.
    layers = [0, 1]
    acts = collect_activations(
        tiny_model, PROMPTS_B, sites=sites, layers=layers, backend=backend, progress=False
    )
    batch = tiny_model.tokenize(tiny_model.format_prompts(PROMPTS_B))
    _, cache = tiny_model.bridge.run_with_cache(batch.input_ids, attention_mask=batch.attention_mask)
    for site in sites:
        for column, layer in enumerate(layers):
            expected = cache[f"blocks.{layer}.hook_{site}"][:, -1, :]
            torch.testing.assert_close(acts.acts[site][:, 0, column], expected, atol=1e-5, rtol=1e-4)
    assert set(acts.acts) == set(sites)


@pytest.mark.parametrize("backend", ["fast", "bridge"])
def test_extraction_stops_before_the_unembedding(tiny_model, backend: str) -> None:
    calls: list[str] = []
    watched = {"hf": tiny_model.hf.get_output_embeddings(), "bridge": tiny_model.bridge.unembed}
    handles = [
        module.register_forward_hook(lambda *_, name=name: calls.append(name))
        for name, module in watched.items()
    ]
    try:
        collect_activations(tiny_model, PROMPTS_B[:2], backend=backend, progress=False)
        assert calls == []
        tiny_model.bridge(tiny_model.tokenize(PROMPTS_B[:1]).input_ids)  # the watch works
        assert calls
    finally:
        for handle in handles:
            handle.remove()


def test_resid_pre_of_next_layer_equals_resid_post(tiny_model) -> None:
    acts = collect_activations(tiny_model, PROMPTS_A[:3], progress=False)
    torch.testing.assert_close(acts.acts["resid_pre"][:, :, 1:], acts.acts["resid_post"][:, :, :-1])


def test_stores_only_prompts_by_positions_by_layers(tiny_model) -> None:
    acts = collect_activations(tiny_model, PROMPTS_A, token="post_instruction", progress=False)
    n_post = tiny_model.n_post_instruction_tokens
    assert acts.acts["resid_post"].shape == (8, n_post, tiny_model.n_layers, tiny_model.d_model)
    assert acts.positions[-1] == "post-1"


def test_mean_position_excludes_bos(tiny_model) -> None:
    # The mean over "Hi" must not change when we look at BOS-free positions only.
    acts = collect_activations(tiny_model, ["Hi"], token="mean", sites=("resid_pre",), progress=False)
    batch = tiny_model.encode_instructions(["Hi"])
    with torch.no_grad():
        hidden = tiny_model.hf(**vars(batch), output_hidden_states=True).hidden_states
    expected = hidden[1][0, 1:].mean(dim=0)
    torch.testing.assert_close(acts.acts["resid_pre"][0, 0, 1], expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"prompts": []}, DataError, "empty"),
        ({"prompts": ["ok", "  "]}, DataError, "empty"),
        ({"prompts": ["ok"], "layers": [7]}, ConfigError, "out of range"),
        ({"prompts": ["ok"], "token": "first"}, ConfigError, "unknown position"),
        ({"prompts": ["ok"], "sites": ["resid_mid"]}, ConfigError, "unknown site"),
    ],
)
def test_bad_collection_input(tiny_model, kwargs, error, message) -> None:
    with pytest.raises(error, match=message):
        collect_activations(tiny_model, progress=False, **kwargs)


def _planted(tiny_model, planted: torch.Tensor):
    with steer(tiny_model, addition(planted, layer=0, alpha=1.0)):
        positive = collect_activations(tiny_model, PROMPTS_A, progress=False)
    negative = collect_activations(tiny_model, PROMPTS_B, progress=False)
    return positive, negative


@pytest.mark.parametrize("method", ["mean_diff", "pca"])
def test_planted_direction_is_recovered(tiny_model, method: str) -> None:
    generator = torch.Generator().manual_seed(0)
    planted = torch.randn(tiny_model.d_model, generator=generator)
    planted = 40.0 * planted / planted.norm()
    positive, negative = _planted(tiny_model, planted)
    directions = compute_directions(
        positive, negative, site="resid_pre", method=method, model=tiny_model, position_rule="last"
    )
    cosine = torch.nn.functional.cosine_similarity(directions.unit(0), planted, dim=0)
    assert cosine > 0.99
    # alpha = 1 in raw units is the mean gap along the direction: about the planted norm.
    assert directions.norm(0) == pytest.approx(40.0, rel=0.1)


def test_probe_recovers_planted_axis_in_isotropic_noise() -> None:
    generator = torch.Generator().manual_seed(1)
    axis = torch.zeros(32)
    axis[3] = 1.0
    negative = torch.randn(200, 32, generator=generator)
    positive = torch.randn(200, 32, generator=generator) + 3.0 * axis
    for method in (mean_diff, pca_diff, probe_direction):
        direction = method(positive, negative)
        cosine = float(direction @ axis.double() / direction.norm())
        assert cosine > 0.95, method.__name__


def test_pca_sign_follows_mean_difference() -> None:
    generator = torch.Generator().manual_seed(2)
    negative = torch.randn(50, 8, generator=generator)
    positive = negative - 5.0 * torch.eye(8)[0]
    direction = pca_diff(positive, negative)
    assert float(direction @ mean_diff(positive, negative)) > 0


def _noise_activations(tiny_model, n: int, seed: int, shift: torch.Tensor | None = None, layer: int = 0) -> Activations:
    """Isotropic noise at every layer of the tiny model's shape, plus ``shift`` at ``layer``."""
    generator = torch.Generator().manual_seed(seed)
    acts = torch.randn(n, 1, tiny_model.n_layers, tiny_model.d_model, generator=generator)
    if shift is not None:
        acts[:, 0, layer] += shift
    return Activations({"resid_pre": acts}, ("last",), tuple(range(tiny_model.n_layers)), n)


def test_layer_scoring_finds_the_planted_layer(tiny_model) -> None:
    # Only layer 1 differs between the sides; the other layers are noise on both.
    planted = torch.zeros(tiny_model.d_model)
    planted[5] = 4.0
    positive = _noise_activations(tiny_model, 60, seed=0, shift=planted, layer=1)
    negative = _noise_activations(tiny_model, 60, seed=1)
    train, heldout = range(30), range(30, 60)
    directions = compute_directions(
        positive.select(train), negative.select(train), site="resid_pre", model=tiny_model, position_rule="last"
    )
    scores = score_layers(
        directions, positive.select(heldout), negative.select(heldout),
        train_positive=positive.select(train), train_negative=negative.select(train),
    )
    best = select_layer(scores, n_layers=tiny_model.n_layers, max_layer_fraction=1.0)
    assert best.layer == 1
    assert best.separation_accuracy > 0.95 and best.auroc > 0.95
    others = [s for s in scores if s.layer != 1]
    assert all(s.separation_accuracy < 0.8 and s.auroc < 0.8 for s in others)
    assert "*" in format_score_table(scores, selected=best)


def test_random_direction_scores_near_chance(tiny_model) -> None:
    # Different prompts on the two sides, differing along one axis at every layer: the true
    # axis separates them, random directions orthogonal to it score about one half.
    axis = torch.zeros(tiny_model.d_model)
    axis[0] = 4.0
    positive = _noise_activations(tiny_model, 400, seed=2)
    positive.acts["resid_pre"] += axis
    negative = _noise_activations(tiny_model, 400, seed=3)
    directions = compute_directions(positive, negative, site="resid_pre", model=tiny_model, position_rule="last")
    generator = torch.Generator().manual_seed(4)
    random_units = torch.randn(directions.directions.shape, generator=generator)
    random_units[..., 0] = 0.0  # orthogonal to the axis the sides differ on
    random_units /= random_units.norm(dim=-1, keepdim=True)
    random_set = DirectionSet(random_units, directions.norms, directions.meta)
    truth = score_layers(directions, positive, negative)
    assert all(s.separation_accuracy > 0.95 for s in truth)
    scores = score_layers(random_set, positive, negative)
    assert all(abs(s.separation_accuracy - 0.5) < 0.1 for s in scores)
    assert all(abs(s.auroc - 0.5) < 0.1 for s in scores)


def test_select_layer_drops_last_fifth() -> None:
    from refusal_dir.selection import LayerScore

    scores = [LayerScore("last", layer, 0.6 + 0.04 * layer, 0.7, 1.0, None) for layer in range(10)]
    assert select_layer(scores, n_layers=10).layer == 7
    assert select_layer(scores, n_layers=10, max_layer_fraction=1.0).layer == 9
    with pytest.raises(ConfigError):
        select_layer(scores, n_layers=10, max_layer_fraction=0.0)


def test_unequal_heldout_pairs_are_rejected(tiny_model) -> None:
    positive = collect_activations(tiny_model, PROMPTS_A[:3], progress=False)
    negative = collect_activations(tiny_model, PROMPTS_B[:2], progress=False)
    directions = compute_directions(positive, negative, site="resid_post", model=tiny_model, position_rule="last")
    with pytest.raises(DataError, match="unequal"):
        score_layers(directions, positive, negative)
    with pytest.raises(DataError, match="matched pairs"):
        compute_directions(positive, negative, site="resid_post", method="pca", model=tiny_model, position_rule="last")


def _a_direction_set(tiny_model) -> DirectionSet:
    positive = collect_activations(tiny_model, PROMPTS_A[:4], progress=False)
    negative = collect_activations(tiny_model, PROMPTS_B[:4], progress=False)
    return compute_directions(positive, negative, site="resid_post", model=tiny_model, position_rule="last", prompt_hash="abc")


def test_direction_set_round_trips(tiny_model, tmp_path: Path) -> None:
    directions = _a_direction_set(tiny_model)
    directions.save(tmp_path / "dirs")
    loaded = DirectionSet.load(tmp_path / "dirs", model=tiny_model)
    torch.testing.assert_close(loaded.directions, directions.directions)
    torch.testing.assert_close(loaded.norms, directions.norms)
    assert loaded.meta == directions.meta
    meta = json.loads((tmp_path / "dirs" / "directions.json").read_text())
    for key in ("model_id", "d_model", "n_layers", "site", "position", "method", "prompt_set_hash", "package_version"):
        assert key in meta


def test_direction_set_rejects_a_model_it_does_not_fit(tiny_model, tiny_gemma3_dir, tmp_path: Path) -> None:
    from refusal_dir.model import load_model

    _a_direction_set(tiny_model).save(tmp_path / "dirs")
    other = load_model(str(tiny_gemma3_dir), device="cpu", with_bridge=False)
    with pytest.raises(DirectionMismatchError, match="do not fit"):
        DirectionSet.load(tmp_path / "dirs", model=other)


def test_corrupt_direction_files_are_reported(tiny_model, tmp_path: Path) -> None:
    _a_direction_set(tiny_model).save(tmp_path / "dirs")
    (tmp_path / "dirs" / "directions.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DirectionMismatchError, match="corrupt"):
        DirectionSet.load(tmp_path / "dirs")
    (tmp_path / "dirs" / "directions.json").write_text("{")
    with pytest.raises(DirectionMismatchError, match="corrupt"):
        DirectionSet.load(tmp_path / "dirs")
    with pytest.raises(DirectionMismatchError, match="holds no direction set"):
        DirectionSet.load(tmp_path / "missing")


def test_unwritable_output_dir(tiny_model, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputDirError, match="writable"):
        _a_direction_set(tiny_model).save(blocker / "dirs")


def test_direction_arithmetic(tiny_model) -> None:
    directions = _a_direction_set(tiny_model)
    doubled = 2 * directions
    torch.testing.assert_close(doubled.norms, 2 * directions.norms)
    torch.testing.assert_close(doubled.directions, directions.directions)
    zero = directions - directions
    assert float(zero.norms.abs().max()) < 1e-5
    torch.testing.assert_close((-directions).vector(1), -directions.vector(1))
    with pytest.raises(ConfigError, match="not in this direction set"):
        directions.vector(9)


def test_activations_select_subset(tiny_model) -> None:
    acts = collect_activations(tiny_model, PROMPTS_A[:4], progress=False)
    subset = acts.select([1, 3])
    assert isinstance(subset, Activations) and subset.n_prompts == 2
    torch.testing.assert_close(subset.acts["resid_post"][1], acts.acts["resid_post"][3])


def test_weights_sample_indexes_inside_a_matrix_past_float32_precision() -> None:
    # 2**24 + 4 elements: a float32 linspace rounds the last index to the element count
    # (the real Gemma 3 270M embedding, 262144 x 640, failed the same way).
    from types import SimpleNamespace

    from refusal_dir.directions import weights_sample

    matrix = torch.zeros(2**22 + 1, 4, dtype=torch.int8)
    matrix[0, 0], matrix[-1, -1] = 5, 7

    sample = weights_sample(SimpleNamespace(hf=SimpleNamespace(parameters=lambda: [matrix])))
    assert sample[0] == 5 and sample[-1] == 7


def test_collect_activations_old_position_keyword_warns_and_is_the_token_rule(tiny_model) -> None:
    with pytest.warns(DeprecationWarning, match=r"collect_activations\(position=\) is deprecated: use token="):
        old = collect_activations(tiny_model, PROMPTS_A[:2], position="mean", progress=False)
    new = collect_activations(tiny_model, PROMPTS_A[:2], token="mean", progress=False)
    assert old.positions == new.positions == ("mean",)
    assert torch.equal(old.site("resid_pre"), new.site("resid_pre"))
    with pytest.raises(ConfigError, match="both position= and token="), pytest.warns(DeprecationWarning):
        collect_activations(tiny_model, PROMPTS_A[:2], position="mean", token="last", progress=False)
