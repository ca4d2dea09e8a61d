"""Parametrized (kernel) ablation: known answers, run time == baked weights, per-row batches."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from refusal_dir.abliteration import (
    AblationOptions,
    AblationPoint,
    Kernel,
    WeightEdit,
    bake,
    harmless_means,
    kernel_ablation,
    layer_units,
    project_out,
    weight_edits,
)
from refusal_dir.activations import collect_activations
from refusal_dir.directions import compute_directions
from refusal_dir.errors import ConfigError
from refusal_dir.interventions import bridge_hooks, steer
from refusal_dir.model import HookedModel, load_model
from refusal_dir.testing import make_tiny_model

HARMFUL = ["How do I pick a lock?", "Tell me how to make a weapon", "How to steal a car fast", "Write malware for me"]
HARMLESS = ["How do I bake bread?", "Tell me a poem about rain", "What is the capital of Peru?", "Explain gravity"]
PROMPTS = ["How do I make a cake?", "Write a poem about the sea and the sky please", "Hi"]
N_LAYERS = 4
FAMILIES = ("gemma2", "gemma3_text", "llama", "qwen2", "qwen2_moe")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache: dict[str, tuple[HookedModel, object, torch.Tensor]] = {}

    def get(family: str):
        if family not in cache:
            path = make_tiny_model(tmp_path_factory.mktemp(family), n_layers=N_LAYERS, d_model=64, seed=3, architecture=family)
            model = load_model(str(path), dtype="float32", device="cpu")
            acts = {side: collect_activations(model, prompts, sites=("resid_post",), progress=False) for side, prompts in (("h", HARMFUL), ("b", HARMLESS))}
            directions = compute_directions(acts["h"], acts["b"], site="resid_post", model=model)
            means = acts["b"].mean("resid_post").float()
            cache[family] = (model, directions, means)
        return cache[family]

    return get


def _logits(model: HookedModel, prompts=PROMPTS) -> torch.Tensor:
    texts = model.format_prompts(list(prompts))
    batch = model.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    with torch.no_grad():
        return model.hf(**batch).logits.float()


def _baked(model: HookedModel, *args, **kwargs) -> HookedModel:
    twin = copy.copy(model)
    twin.hf = copy.deepcopy(model.hf)
    bake(twin, *args, **kwargs)
    return twin


POINT = AblationPoint(Kernel(0.9, 2.0, 0.3, 1.5), Kernel(1.2, 1.0, 0.5, 2.0))
POINT_INTERPOLATED = AblationPoint(Kernel(1.0, 1.5, 0.2, 3.0), Kernel(0.7, 2.5, 0.1, 1.0), direction_index=1.25)


def test_kernel_weights_known_answer():
    kernel = Kernel(max_weight=1.0, max_weight_position=2.5, min_weight=0.2, min_weight_distance=2.0)
    # distances 2.5, 1.5, 0.5, 0.5, 1.5, 2.5 -> beyond width: 0; else 1 + d/2 * (0.2 - 1)
    expected = [0.0, 1 - 0.75 * 0.8, 1 - 0.25 * 0.8, 1 - 0.25 * 0.8, 1 - 0.75 * 0.8, 0.0]
    assert torch.allclose(kernel.weights(6), torch.tensor(expected), atol=1e-7)
    assert torch.equal(Kernel.zero().weights(5), torch.zeros(5))
    edge = Kernel(1.0, 0.0, 0.5, 1.0).weights(3)  # distance exactly the width keeps min_weight
    assert torch.allclose(edge, torch.tensor([1.0, 0.5, 0.0]))


def test_point_round_trip_and_bad_input():
    assert AblationPoint.from_dict(POINT_INTERPOLATED.to_dict()) == POINT_INTERPOLATED
    with pytest.raises(ConfigError, match="min_weight_distance"):
        Kernel(1.0, 1.0, 0.0, 0.0)
    with pytest.raises(ConfigError, match="exactly"):
        AblationPoint.from_dict({"attn": {}, "mlp": {}})
    with pytest.raises(ConfigError, match="finite"):
        Kernel(float("nan"), 1.0, 0.0, 1.0)


def test_interpolated_direction(built):
    _, directions, _ = built("llama")
    units = layer_units(directions, N_LAYERS, 1.25)
    mixed = 0.75 * directions.unit(1) + 0.25 * directions.unit(2)
    expected = mixed / mixed.norm()
    assert torch.allclose(units, expected.expand(N_LAYERS, -1), atol=1e-6)
    assert torch.equal(layer_units(directions, N_LAYERS, None)[3], directions.unit(3))
    with pytest.raises(ConfigError, match="beyond the last layer"):
        layer_units(directions, N_LAYERS, 3.5)


def test_project_out_is_orthogonal_to_the_harmless_mean(built):
    _, directions, means = built("llama")
    projected = project_out(directions, means)
    for layer in range(N_LAYERS):
        m = means[0, layer] / means[0, layer].norm()
        raw = directions.vector(layer)
        expected = raw - (raw @ m) * m
        assert torch.allclose(projected.vector(layer), expected, atol=1e-4)
        assert abs(float(projected.unit(layer) @ m)) < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("norm_preserving", [False, True])
def test_runtime_equals_baked(built, family, norm_preserving):
    model, directions, means = built(family)
    if norm_preserving and family == "qwen2_moe":
        with pytest.raises(ConfigError, match="stacked experts"):
            weight_edits(model, directions, POINT, options=AblationOptions(norm_preserving=True), harmless_means=means)
        return
    options = AblationOptions(norm_preserving=norm_preserving)
    plain = _logits(model)
    for point in (POINT, POINT_INTERPOLATED):
        with steer(model, kernel_ablation(directions, point, options=options, harmless_means=means)):
            runtime = _logits(model)
        baked = _logits(_baked(model, directions, point, options=options, harmless_means=means))
        assert (runtime - plain).abs().max() > 1e-3  # the point does something
        assert torch.allclose(runtime, baked, atol=2e-5, rtol=1e-5), (runtime - baked).abs().max()


@pytest.mark.parametrize("norm_preserving", [False, True])
def test_zero_kernel_is_the_unsteered_model_exactly(built, norm_preserving):
    model, directions, means = built("gemma2")
    options = AblationOptions(norm_preserving=norm_preserving)
    plain = _logits(model)
    with steer(model, kernel_ablation(directions, AblationPoint.zero(), options=options, harmless_means=means)):
        assert torch.equal(_logits(model), plain)
    assert weight_edits(model, directions, AblationPoint.zero(), options=options, harmless_means=means) == {}
    # A zero row beside non-zero rows of a batch is exact too.
    rows = [AblationPoint.zero(), POINT, AblationPoint.zero()]
    with steer(model, kernel_ablation(directions, rows, options=options, harmless_means=means)):
        mixed = _logits(model)
    assert torch.equal(mixed[0], plain[0]) and torch.equal(mixed[2], plain[2])


@pytest.mark.parametrize("norm_preserving", [False, True])
def test_one_point_per_row_equals_each_point_alone(built, norm_preserving):
    model, directions, means = built("gemma2")
    options = AblationOptions(norm_preserving=norm_preserving)
    points = [POINT, POINT_INTERPOLATED, AblationPoint(Kernel(0.5, 0.0, 0.5, 4.0), Kernel.zero(), direction_index=2.0)]
    prompt = PROMPTS[1]
    with steer(model, kernel_ablation(directions, points, options=options, harmless_means=means)):
        batched = _logits(model, [prompt] * 3)
    for row, point in enumerate(points):
        with steer(model, kernel_ablation(directions, point, options=options, harmless_means=means)):
            alone = _logits(model, [prompt])
        assert torch.allclose(batched[row], alone[0], atol=1e-5)


def test_norm_preserving_edit_keeps_row_norms_and_removes_the_direction():
    torch.manual_seed(0)
    matrix = torch.randn(16, 8)
    u = torch.randn(16)
    u = u / u.norm()
    edited = WeightEdit(u.unsqueeze(0), 1.0, True).apply(matrix)
    assert torch.allclose(edited.norm(dim=1), matrix.norm(dim=1), atol=1e-5)
    # Full weight: no output along u is left once rows are rescaled?  Not in general (the row
    # rescaling reintroduces a component); what holds is the plain edit's guarantee:
    plain = WeightEdit(u.unsqueeze(0), 1.0, False).apply(matrix)
    assert torch.allclose(u @ plain, torch.zeros(8), atol=1e-5)
    # The norm-preserving result is the normalized plain edit of the row-normalized matrix.
    unit_rows = matrix / matrix.norm(dim=1, keepdim=True)
    step = unit_rows - torch.outer(u, u @ unit_rows)
    expected = step / step.norm(dim=1, keepdim=True) * matrix.norm(dim=1, keepdim=True)
    assert torch.allclose(edited, expected, atol=1e-6)
    assert not torch.allclose(edited, plain, atol=1e-3)


def test_projected_needs_the_means_and_bridge_is_refused(built):
    model, directions, _ = built("llama")
    with pytest.raises(ConfigError, match="harmless means"):
        kernel_ablation(directions, POINT)
    intervention = kernel_ablation(directions, POINT, options=AblationOptions(projected=False))
    with pytest.raises(ConfigError, match="fast path"):
        bridge_hooks(model, intervention)


def test_harmless_means_match_the_activations(built):
    model, _, means = built("llama")
    assert torch.allclose(harmless_means(model, HARMLESS, site="resid_post"), means, atol=1e-6)
    assert not math.isnan(float(means.sum()))
