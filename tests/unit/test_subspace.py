"""Subspace ablation (refusal_dir.subspace): known answers on synthetic pairs and tiny models.

* Two orthogonal directions planted in synthetic contrastive activations: ``k=2`` recovers
  their span (principal-angle cosines > 0.99), ``k=1`` does not reach the second.
* ``k=1`` is the single-direction code path bit for bit: the ablation's logits (stream and
  weights modes) and the orthogonalized weights are ``torch.equal`` to the DirectionSet's.
* Ablating the ``k=2`` subspace leaves no component along either planted direction anywhere in
  the residual stream (every layer, every position); unablated, both components are large.
* The orthogonalized ``k=2`` weights compute what the run-time ``k=2`` ablation computes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from refusal_dir.abliteration import WeightEdit
from refusal_dir.activations import Activations
from refusal_dir.directions import compute_directions
from refusal_dir.errors import ConfigError, DataError, DirectionMismatchError
from refusal_dir.generation import next_token_logits
from refusal_dir.interventions import ablation, bridge_hooks, clamp, steer
from refusal_dir.model import load_model
from refusal_dir.orthogonalize import orthogonalized_copy
from refusal_dir.steer import Steer
from refusal_dir.subspace import Subspace, build_subspace, principal_cosines
from refusal_dir.testing import make_tiny_model

PROMPTS = ["How do I make a cake?", "Write a poem about the sea and the sky please", "Hi"]
N_PAIRS = 48


def _planted(d_model: int, n_layers: int, seed: int = 0) -> torch.Tensor:
    """``layers x 2 x d_model``: two orthonormal directions per layer (different at each)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.stack(
        [torch.linalg.qr(torch.randn(d_model, 2, generator=generator)).Q.T for _ in range(n_layers)]
    )


def _synthetic_pairs(planted: torch.Tensor, seed: int = 1) -> tuple[Activations, Activations]:
    """Pairs that differ by ``a_i e1 + b_i e2`` (+ small noise): ``a`` has mean 4 (the mean
    difference is about ``e1``), ``b`` mean 0 and spread 3 (only the spread reveals ``e2``)."""
    n_layers, _, d_model = planted.shape
    generator = torch.Generator().manual_seed(seed)
    negative = torch.randn(N_PAIRS, 1, n_layers, d_model, generator=generator) * 2.0
    a = 4.0 + torch.randn(N_PAIRS, 1, n_layers, 1, generator=generator)
    b = 3.0 * torch.randn(N_PAIRS, 1, n_layers, 1, generator=generator)
    noise = 0.05 * torch.randn(N_PAIRS, 1, n_layers, d_model, generator=generator)
    positive = negative + a * planted[:, 0] + b * planted[:, 1] + noise

    def acts(tensor: torch.Tensor) -> Activations:
        return Activations({"resid_pre": tensor}, ("last",), tuple(range(n_layers)), N_PAIRS)

    return acts(positive), acts(negative)


@pytest.fixture(scope="module")
def planted_case(tiny_model):
    planted = _planted(tiny_model.d_model, tiny_model.n_layers)
    positive, negative = _synthetic_pairs(planted)
    directions = compute_directions(positive, negative, site="resid_pre", model=tiny_model, position_rule="last")
    return planted, positive, negative, directions


def test_k2_recovers_the_planted_span_and_k1_does_not(planted_case) -> None:
    planted, positive, negative, directions = planted_case
    two = build_subspace(directions, positive, negative, k=2)
    one = build_subspace(directions, positive, negative, k=1)
    assert (two.k, one.k) == (2, 1)
    for layer in range(directions.n_layers):
        cosines = principal_cosines(two.basis(layer), planted[layer])
        assert cosines.min() > 0.99, (layer, cosines)
        # What of each planted direction the basis reaches: k=1 gets e1 (the mean difference)
        # but not e2, which only the spread of the differences reveals.
        reached_two = (planted[layer] @ two.basis(layer).T).norm(dim=1)
        reached_one = (planted[layer] @ one.basis(layer).T).norm(dim=1)
        assert reached_two.min() > 0.99
        assert reached_one[0] > 0.9 and reached_one[1] < 0.3, reached_one


def test_the_basis_is_orthonormal_and_starts_with_the_sets_direction(planted_case) -> None:
    _, positive, negative, directions = planted_case
    three = build_subspace(directions, positive, negative, k=3)
    for layer in range(directions.n_layers):
        basis = three.basis(layer)
        assert torch.equal(basis[0], directions.unit(layer))
        assert torch.allclose(basis.double() @ basis.double().T, torch.eye(3, dtype=torch.float64), atol=1e-5)
    again = build_subspace(directions, positive, negative, k=3)
    assert torch.equal(again.extra, three.extra)  # same data, same basis (signs fixed)


def test_k1_ablation_is_the_single_direction_ablation_bit_for_bit(tiny_model, planted_case) -> None:
    _, positive, negative, directions = planted_case
    one = build_subspace(directions, positive, negative, k=1)
    for layer in range(directions.n_layers):
        assert torch.equal(one.basis(layer), directions.unit(layer).unsqueeze(0))
    layer = 1
    for mode in ("stream", "weights"):
        ours = next_token_logits(tiny_model, PROMPTS, interventions=[ablation(one, layer=layer, mode=mode)])
        today = next_token_logits(tiny_model, PROMPTS, interventions=[ablation(directions, layer=layer, mode=mode)])
        unsteered = next_token_logits(tiny_model, PROMPTS)
        assert torch.equal(ours, today), mode
        assert not torch.allclose(ours, unsteered, atol=1e-3)  # the ablation does something
    edited_one = orthogonalized_copy(tiny_model, one, layer=layer).state_dict()
    edited_today = orthogonalized_copy(tiny_model, directions, layer=layer).state_dict()
    assert edited_one.keys() == edited_today.keys()
    assert all(torch.equal(edited_one[name], edited_today[name]) for name in edited_today)


def _stream_components(model, interventions, planted: torch.Tensor) -> torch.Tensor:
    """Largest |component| along the planted rows over every token (padding aside) of every
    block's input and output, relative to the stream's norm there:
    ``layers x 2 (input, output) x 2 (rows)``."""
    found = torch.zeros(model.n_layers, 2, planted.shape[0])
    batch = model.tokenize(model.format_prompts(PROMPTS))
    tokens = batch.attention_mask.bool()

    def record(layer: int, side: int, hidden: torch.Tensor) -> None:
        hidden = hidden.detach().double()[tokens]
        along = (hidden @ planted.double().T).abs() / hidden.norm(dim=-1, keepdim=True)
        found[layer, side] = along.max(dim=0).values.float()

    handles = []
    with torch.no_grad(), steer(model, *interventions):
        for layer, block in enumerate(model.layers):
            handles.append(block.register_forward_pre_hook(
                lambda m, args, kwargs, layer=layer: record(layer, 0, args[0] if args else kwargs["hidden_states"]),
                with_kwargs=True,
            ))
            handles.append(block.register_forward_hook(
                lambda m, args, output, layer=layer: record(layer, 1, output[0] if isinstance(output, tuple) else output)
            ))
        try:
            model.hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
    return found


@pytest.mark.parametrize("mode", ["stream", "weights"])
def test_k2_ablation_leaves_no_component_along_either_planted_direction(tiny_model, mode) -> None:
    """Here the basis is the planted pair itself (a Subspace of the synthetic set with k=2, whose
    span the test above checks): nothing of either direction is left at any layer."""
    planted = _planted(tiny_model.d_model, tiny_model.n_layers, seed=3)
    positive, negative = _synthetic_pairs(planted, seed=4)
    directions = compute_directions(positive, negative, site="resid_pre", model=tiny_model, position_rule="last")
    two = build_subspace(directions, positive, negative, k=2)
    layer = 2
    target = two.basis(layer)
    assert principal_cosines(target, planted[layer]).min() > 0.99
    before = _stream_components(tiny_model, [], target)
    after = _stream_components(tiny_model, [ablation(two, layer=layer, mode=mode)], target)
    one = _stream_components(tiny_model, [ablation(directions, layer=layer, mode=mode)], target)
    assert before.min() > 1e-2, before  # both components are there to remove
    assert after.max() < 1e-5, after
    assert one[:, :, 1].max() > 1e-2  # one direction leaves the second component in place


def test_orthogonalized_k2_weights_equal_the_runtime_k2_ablation(tiny_model, planted_case) -> None:
    _, positive, negative, directions = planted_case
    two = build_subspace(directions, positive, negative, k=2)
    edited = orthogonalized_copy(tiny_model, two, layer=1)
    runtime = next_token_logits(tiny_model, PROMPTS, interventions=[ablation(two, layer=1, mode="weights")])
    batch = tiny_model.tokenize(tiny_model.format_prompts(PROMPTS))
    with torch.no_grad():
        baked = edited(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, -1].float()
    single = next_token_logits(tiny_model, PROMPTS, interventions=[ablation(directions, layer=1, mode="weights")])
    assert torch.allclose(baked, runtime, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(runtime, single, atol=1e-3)  # the second direction changes the model


def test_bridge_hooks_ablate_the_subspace_like_the_fast_path(tiny_model, planted_case) -> None:
    _, positive, negative, directions = planted_case
    intervention = ablation(build_subspace(directions, positive, negative, k=2), layer=1)
    batch = tiny_model.encode_instructions(PROMPTS)
    with torch.no_grad(), tiny_model.bridge.hooks(fwd_hooks=bridge_hooks(tiny_model, intervention)):
        bridged = tiny_model.bridge(batch.input_ids, attention_mask=batch.attention_mask)[:, -1]
    fast = next_token_logits(tiny_model, PROMPTS, interventions=[intervention])
    single = next_token_logits(tiny_model, PROMPTS, interventions=[ablation(directions, layer=1)])
    torch.testing.assert_close(bridged, fast, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(fast, single, atol=1e-3)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    directory = make_tiny_model(tmp_path_factory.mktemp("llama") / "llama", n_layers=2, seed=0, architecture="llama")
    return load_model(str(directory), device="cpu")


def test_single_direction_weights_are_the_plain_projection(tiny_llama) -> None:
    """The weights orthogonalization writes through WeightEdit are ``W - u (u^T W)`` and
    ``E - (E u) u^T``, computed the obvious way (to float precision: a matrix-vector product's
    last bit can depend on where the copy sits in memory)."""
    generator = torch.Generator().manual_seed(0)
    vector = torch.randn(tiny_llama.d_model, generator=generator)
    edited = orthogonalized_copy(tiny_llama, vector)
    unit = vector / vector.norm().clamp_min(1e-12)
    source = tiny_llama.hf.state_dict()
    embedding = source["model.embed_tokens.weight"]
    expected = embedding - torch.outer(embedding @ unit, unit)
    assert torch.allclose(edited.state_dict()["model.embed_tokens.weight"], expected, rtol=0, atol=1e-6)
    assert not torch.allclose(embedding, expected, rtol=0, atol=1e-3)
    for name in ("model.layers.0.self_attn.o_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        weight = source[name]
        expected = weight - unit.unsqueeze(-1) * (unit @ weight).unsqueeze(-2)
        assert torch.allclose(edited.state_dict()[name], expected, rtol=0, atol=1e-6), name


def test_k2_on_a_family_without_post_norms_stream_equals_weights(tiny_llama) -> None:
    planted = _planted(tiny_llama.d_model, tiny_llama.n_layers, seed=5)
    positive, negative = _synthetic_pairs(planted, seed=6)
    directions = compute_directions(positive, negative, site="resid_pre", model=tiny_llama, position_rule="last")
    two = build_subspace(directions, positive, negative, k=2)
    stream = next_token_logits(tiny_llama, PROMPTS, interventions=[ablation(two, layer=0)])
    weights = next_token_logits(tiny_llama, PROMPTS, interventions=[ablation(two, layer=0, mode="weights")])
    assert torch.allclose(stream, weights, atol=1e-5)


def test_per_row_alpha_and_steer_with_a_subspace(tiny_model, planted_case) -> None:
    _, positive, negative, directions = planted_case
    two = build_subspace(directions, positive, negative, k=2)
    unsteered = next_token_logits(tiny_model, PROMPTS * 2)
    full = next_token_logits(tiny_model, PROMPTS, interventions=[ablation(two, layer=1)])
    rows = next_token_logits(
        tiny_model, PROMPTS * 2, interventions=Steer("ablation", two, layer=1).at([0.0] * 3 + [1.0] * 3)
    )
    assert torch.equal(rows[:3], unsteered[:3])  # alpha 0 rows are the model itself
    assert torch.allclose(rows[3:], full, atol=1e-5)


def test_bad_subspaces_and_uses_are_one_line_errors(tiny_model, planted_case) -> None:
    _, positive, negative, directions = planted_case
    with pytest.raises(ConfigError, match="needs the contrastive activations"):
        build_subspace(directions, k=2)
    with pytest.raises(ConfigError, match="k must be an integer"):
        build_subspace(directions, positive, negative, k=0)
    with pytest.raises(DataError, match="at least 60 pairs"):
        build_subspace(directions, positive, negative, k=60)
    with pytest.raises(DataError, match="matched pairs"):
        build_subspace(directions, positive, negative.select(range(10)), k=2)
    bad = torch.ones(1, directions.n_layers, 1, directions.d_model)
    with pytest.raises(DirectionMismatchError, match="not an orthonormal basis"):
        Subspace(directions, bad)
    two = build_subspace(directions, positive, negative, k=2)
    with pytest.raises(ConfigError, match="needs layer="):
        ablation(two)
    with pytest.raises(ConfigError, match="sets no value"):
        clamp(two, value=2.0, layer=1)
    with pytest.raises(ConfigError, match="a Subspace ablates"):
        Steer("addition", two, layer=1)
    with pytest.raises(ConfigError, match="norm-preserving"):
        WeightEdit(two.basis(1), 1.0, norm_preserving=True).apply(torch.ones(directions.d_model, 4))


def test_a_subspace_from_another_model_is_refused(planted_case, tmp_path: Path) -> None:
    _, positive, negative, directions = planted_case
    two = build_subspace(directions, positive, negative, k=2)
    other = load_model(str(make_tiny_model(tmp_path / "other", n_layers=3, seed=7)), device="cpu")
    with pytest.raises(DirectionMismatchError, match="other weights"):
        orthogonalized_copy(other, two, layer=1)
