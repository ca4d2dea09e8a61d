from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from refusal_dir.activations import collect_activations
from refusal_dir.errors import ConfigError, DataError, DirectionMismatchError
from refusal_dir.generation import (
    GenerationSettings,
    continuation_logprobs,
    generate,
    generate_tokens,
    next_token_logits,
)
from refusal_dir.interventions import ablation, addition, bridge_hooks, clamp, steer
from refusal_dir.model import load_model
from refusal_dir.orthogonalize import orthogonalized_copy, save_orthogonalized

PROMPTS = [
    "How do I make a cake?",
    "Write a poem about the sea and the sky please",
    "Hi",
    "Explain how to build a bomb",
]
SHORT = GenerationSettings(max_new_tokens=10, batch_size=4)


@pytest.fixture(scope="module")
def vector(tiny_model) -> torch.Tensor:
    generator = torch.Generator().manual_seed(11)
    v = torch.randn(tiny_model.d_model, generator=generator)
    return 8.0 * v / v.norm()


def test_alpha_zero_reproduces_unsteered_logits_exactly(tiny_model, vector) -> None:
    plain = next_token_logits(tiny_model, PROMPTS)
    steered = next_token_logits(tiny_model, PROMPTS, interventions=[addition(vector, layer=1, alpha=0.0)])
    assert torch.equal(plain, steered)
    moved = next_token_logits(tiny_model, PROMPTS, interventions=[addition(vector, layer=1, alpha=1.0)])
    assert not torch.allclose(plain, moved)


@pytest.mark.parametrize("mode", ["stream", "weights"])
def test_ablation_leaves_no_projection_at_any_layer(tiny_model, vector, mode: str) -> None:
    unit = vector / vector.norm()
    before = collect_activations(tiny_model, PROMPTS, token="mean", progress=False)
    with steer(tiny_model, ablation(vector, mode=mode)):
        after = collect_activations(tiny_model, PROMPTS, token="mean", progress=False)
    for site in ("resid_pre", "resid_post"):
        assert float((before.acts[site] @ unit).abs().max()) > 0.1
        assert float((after.acts[site] @ unit).abs().max()) < 1e-4


def test_clamp_sets_the_projection(tiny_model, vector) -> None:
    unit = vector / vector.norm()
    with steer(tiny_model, clamp(vector, value=3.0)):
        acts = collect_activations(tiny_model, PROMPTS, progress=False)
    torch.testing.assert_close(acts.acts["resid_post"] @ unit, torch.full((4, 1, 3), 3.0), atol=1e-4, rtol=0)


def test_per_row_alpha_equals_separate_calls(tiny_model, vector) -> None:
    alphas = [0.0, 0.5, 1.0, 2.0]
    together = next_token_logits(
        tiny_model, PROMPTS, interventions=[addition(vector, layer=1, alpha=alphas)], batch_size=3
    )
    separate = torch.cat([
        next_token_logits(tiny_model, [p], interventions=[addition(vector, layer=1, alpha=a)])
        for p, a in zip(PROMPTS, alphas)
    ])
    torch.testing.assert_close(together, separate, atol=1e-5, rtol=1e-5)
    texts = generate(tiny_model, PROMPTS, interventions=[addition(vector, layer=1, alpha=alphas)], settings=SHORT, progress=False)
    one_by_one = [
        generate(tiny_model, [p], interventions=[addition(vector, layer=1, alpha=a)], settings=SHORT, progress=False)[0]
        for p, a in zip(PROMPTS, alphas)
    ]
    assert texts == one_by_one


def test_one_ablation_direction_per_row_equals_separate_ablations(tiny_model, vector) -> None:
    generator = torch.Generator().manual_seed(5)
    directions = torch.randn(len(PROMPTS), tiny_model.d_model, generator=generator)
    together = next_token_logits(
        tiny_model, PROMPTS, interventions=[ablation(directions, alpha=[1.0, 0.5, 1.0, 2.0])], batch_size=3
    )
    separate = torch.cat([
        next_token_logits(tiny_model, [p], interventions=[ablation(d, alpha=s)])
        for p, d, s in zip(PROMPTS, directions, [1.0, 0.5, 1.0, 2.0])
    ])
    torch.testing.assert_close(together, separate, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(together, next_token_logits(tiny_model, PROMPTS), atol=1e-3)
    # Under the KV cache too: batched generation equals one prompt at a time.
    texts = generate(tiny_model, PROMPTS, interventions=[ablation(directions)], settings=SHORT, progress=False)
    assert texts == [
        generate(tiny_model, [p], interventions=[ablation(d)], settings=SHORT, progress=False)[0]
        for p, d in zip(PROMPTS, directions)
    ]
    with pytest.raises(ConfigError, match="3 per-row values of unit for 4 prompts"):
        next_token_logits(tiny_model, PROMPTS, interventions=[ablation(directions[:3])])
    with pytest.raises(ConfigError, match="mode='stream'"):
        ablation(directions, mode="weights")
    from dataclasses import replace

    built_by_hand = replace(ablation(directions), mode="weights")
    with pytest.raises(ConfigError, match="mode='stream'"):
        next_token_logits(tiny_model, PROMPTS, interventions=[built_by_hand])


def test_batched_generation_equals_one_at_a_time(tiny_model) -> None:
    batched = generate(tiny_model, PROMPTS, settings=SHORT, progress=False)
    single = [generate(tiny_model, [p], settings=SHORT, progress=False)[0] for p in PROMPTS]
    assert batched == single


def test_hooks_are_removed_after_an_exception(tiny_model, vector) -> None:
    plain = next_token_logits(tiny_model, PROMPTS)

    def hook_counts() -> list[int]:
        return [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in tiny_model.hf.modules()]

    before = hook_counts()
    with pytest.raises(RuntimeError, match="boom"):
        with steer(tiny_model, addition(vector, layer=0, alpha=5.0), ablation(vector)):
            assert sum(hook_counts()) > sum(before)
            raise RuntimeError("boom")
    assert hook_counts() == before
    assert torch.equal(next_token_logits(tiny_model, PROMPTS), plain)


@pytest.mark.parametrize("rule", ["all", "prompt", "generated"])
def test_position_rules_under_kv_cache_match_no_cache_reference(tiny_model, vector, rule: str) -> None:
    intervention = addition(vector, layer=1, alpha=3.0, apply_to=rule)
    cached = generate_tokens(tiny_model, PROMPTS, interventions=[intervention], settings=SHORT, progress=False)[1]
    uncached = generate_tokens(
        tiny_model, PROMPTS, interventions=[intervention],
        settings=GenerationSettings(max_new_tokens=10, batch_size=4, use_cache=False), progress=False,
    )[1]
    assert cached == uncached


def test_position_rules_act_where_they_claim(tiny_model, vector) -> None:
    plain = generate_tokens(tiny_model, PROMPTS, settings=SHORT, progress=False)[1]
    def run(rule: str) -> list[list[int]]:
        return generate_tokens(
            tiny_model, PROMPTS, interventions=[addition(vector, layer=1, alpha=3.0, apply_to=rule)],
            settings=SHORT, progress=False,
        )[1]
    generated_only, prompt_only, everywhere = run("generated"), run("prompt"), run("all")
    # The first new token is predicted at the last prompt position: "generated" leaves it alone.
    assert [row[0] for row in generated_only] == [row[0] for row in plain]
    assert generated_only != plain and prompt_only != plain and everywhere != prompt_only
    # Outside generation every position is a prompt position.
    assert torch.equal(
        next_token_logits(tiny_model, PROMPTS, interventions=[addition(vector, layer=1, alpha=3.0, apply_to="generated")]),
        next_token_logits(tiny_model, PROMPTS),
    )


def test_bridge_hooks_equal_fast_path(tiny_model, vector) -> None:
    batch = tiny_model.encode_instructions(PROMPTS)
    for intervention in (addition(vector, layer=1, alpha=2.0, site="resid_post"), ablation(vector)):
        with torch.no_grad(), tiny_model.bridge.hooks(fwd_hooks=bridge_hooks(tiny_model, intervention)):
            bridge_logits = tiny_model.bridge(batch.input_ids, attention_mask=batch.attention_mask)[:, -1]
        fast = next_token_logits(tiny_model, PROMPTS, interventions=[intervention])
        torch.testing.assert_close(bridge_logits, fast, atol=1e-4, rtol=1e-4)


def test_orthogonalized_weights_equal_runtime_ablation(tiny_model, vector, tmp_path: Path) -> None:
    runtime = next_token_logits(tiny_model, PROMPTS, interventions=[ablation(vector, mode="weights")])
    edited = orthogonalized_copy(tiny_model, vector)
    batch = tiny_model.encode_instructions(PROMPTS)
    with torch.no_grad():
        baked = edited(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, -1]
    torch.testing.assert_close(baked, runtime, atol=2e-5, rtol=1e-5)
    # The user's model is untouched and the export loads with plain transformers.
    assert torch.equal(next_token_logits(tiny_model, PROMPTS), next_token_logits(tiny_model, PROMPTS))
    directory = save_orthogonalized(tiny_model, vector, tmp_path / "edited")
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(directory)
    with torch.no_grad():
        again = reloaded(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, -1]
    torch.testing.assert_close(again, runtime, atol=2e-5, rtol=1e-5)
    exported = load_model(str(directory), device="cpu", with_bridge=False)
    torch.testing.assert_close(next_token_logits(exported, PROMPTS), runtime, atol=2e-5, rtol=1e-5)


def test_orthogonalization_does_not_touch_the_users_model(tiny_model, vector) -> None:
    before = {name: p.clone() for name, p in tiny_model.hf.named_parameters()}
    orthogonalized_copy(tiny_model, vector)
    for name, parameter in tiny_model.hf.named_parameters():
        assert torch.equal(parameter, before[name]), name


def test_continuation_logprobs_match_a_manual_forward(tiny_model) -> None:
    scores = continuation_logprobs(tiny_model, ["Hi", "How do I make a cake?"], [" Sure", " No way"])
    text = tiny_model.format_prompts(["Hi"])[0]
    prompt_ids = tiny_model._encode(text)
    cont_ids = tiny_model._encode(" Sure")
    ids = torch.tensor([prompt_ids + cont_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(tiny_model.hf(input_ids=ids).logits[0].float(), dim=-1)
    expected = sum(float(logprobs[len(prompt_ids) - 1 + i, t]) for i, t in enumerate(cont_ids))
    assert float(scores[0]) == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("alpha", [math.nan, math.inf, [1.0, math.nan]])
def test_non_finite_alpha_is_rejected(vector, alpha) -> None:
    with pytest.raises(ConfigError, match="finite"):
        addition(vector, layer=0, alpha=alpha)


def test_bad_intervention_inputs(tiny_model, vector) -> None:
    with pytest.raises(ConfigError, match="out of range"):
        with steer(tiny_model, addition(vector, layer=5)):
            pass
    with pytest.raises(DirectionMismatchError, match="d_model"):
        with steer(tiny_model, ablation(torch.ones(7))):
            pass
    with pytest.raises(DataError, match="empty"):
        generate(tiny_model, [], progress=False)
    with pytest.raises(ConfigError, match="unknown apply_to"):
        addition(vector, layer=0, apply_to="middle")
    with pytest.raises(ConfigError, match="per-row"):
        next_token_logits(tiny_model, PROMPTS, interventions=[addition(vector, layer=0, alpha=[1.0, 2.0])])
    with pytest.raises(ConfigError, match="per-row"):
        generate(tiny_model, PROMPTS[:2], interventions=[addition(vector, layer=0, alpha=[1.0, 2.0, 3.0])], progress=False)


@pytest.mark.parametrize("mode", ["stream", "weights"])
def test_partial_ablation_scales_the_component_at_every_layer(tiny_model, vector, mode: str) -> None:
    unit = vector / vector.norm()
    before = collect_activations(tiny_model, PROMPTS, progress=False)
    with steer(tiny_model, ablation(vector, alpha=0.5, mode=mode)):
        after = collect_activations(tiny_model, PROMPTS, progress=False)
    # The stream entering the model keeps half its component (later layers see changed inputs).
    torch.testing.assert_close(
        after.acts["resid_pre"][:, :, 0] @ unit, 0.5 * (before.acts["resid_pre"][:, :, 0] @ unit), atol=1e-4, rtol=1e-4
    )
    strengths = [0.0, 0.5, 1.0, 2.0]
    together = next_token_logits(tiny_model, PROMPTS, interventions=[ablation(vector, alpha=strengths, mode=mode)])
    separate = torch.cat([
        next_token_logits(tiny_model, [p], interventions=[ablation(vector, alpha=s, mode=mode)])
        for p, s in zip(PROMPTS, strengths)
    ])
    torch.testing.assert_close(together, separate, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together[0], next_token_logits(tiny_model, PROMPTS[:1])[0])


def test_hook_tensors_are_converted_once_per_device_and_dtype() -> None:
    from refusal_dir.interventions import _OnDevice

    vector = _OnDevice(torch.arange(4.0))
    act32, act64 = torch.zeros(2, 1, 4), torch.zeros(2, 1, 4, dtype=torch.float64)
    first = vector.like(act64)
    assert first.dtype == torch.float64 and vector.like(act64) is first  # reused every step
    assert vector.like(act32) is not first and vector.like(act32).dtype == torch.float32


def test_next_token_logits_reduced_batch_by_batch_equals_reducing_all(tiny_model) -> None:
    prompts = ["Hi", "Write a poem about the sea", "What is two plus two?"]
    full = next_token_logits(tiny_model, prompts, batch_size=2)
    kept = next_token_logits(tiny_model, prompts, batch_size=2, reduce=lambda logits: logits[:, [5, 1]])
    torch.testing.assert_close(kept, full[:, [5, 1]])


def test_old_keyword_names_still_work_with_a_deprecation_warning(tiny_model) -> None:
    """docs/glossary.md: layer (whose), token (which label), at_layers (where), apply_to, alpha."""
    vector = torch.randn(tiny_model.d_model)
    new = addition(vector, layer=1, at_layers=[0, 1], alpha=[0.5, 2.0], apply_to="prompt")
    with pytest.warns(DeprecationWarning) as record:
        old = addition(vector, layer=[0, 1], alpha=[0.5, 2.0], positions="prompt")
    assert sorted(str(w.message).split(" is ")[0] for w in record) == ["addition(layer=[...])", "addition(positions=)"]
    assert (old.at_layers, old.apply_to) == (new.at_layers, new.apply_to) == ((0, 1), "prompt")
    assert torch.equal(old.vector, new.vector) and torch.equal(old.alpha, new.alpha)
    new_ablation = ablation(vector, at_layers=[1], alpha=0.5, apply_to="generated")
    with pytest.warns(DeprecationWarning) as record:
        old_ablation = ablation(vector, layers=[1], strength=0.5, positions="generated")
    assert len(record) == 3
    assert (old_ablation.at_layers, old_ablation.alpha, old_ablation.apply_to) == (new_ablation.at_layers, 0.5, "generated")
    with pytest.raises(ConfigError, match="both strength= and alpha="), pytest.warns(DeprecationWarning):
        ablation(vector, alpha=1.0, strength=0.5)
    with pytest.raises(TypeError, match="unexpected keyword argument 'strenght'"):
        ablation(vector, strenght=0.5)
