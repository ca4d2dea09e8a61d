"""Position rules under the KV cache, against a plain reference written without refusal_dir hooks.

The reference (``plain_reference.py``, shared with ``test_families.py``) re-runs the whole
sequence for every new token (no KV cache) with one plain PyTorch pre-hook that adds the vector
at absolute positions chosen by index. It shares no code with
:func:`refusal_dir.interventions.steer`, so a KV offset that goes wrong (say, read from a
``transformers`` keyword that a release renamed) fails here on both backends.
"""

from __future__ import annotations

import plain_reference
import pytest
import torch

from refusal_dir.generation import GenerationSettings, generate_tokens
from refusal_dir.interventions import PositionState, ablation, addition, bridge_hooks

PROMPTS = ["How do I bake bread?", "Explain a bomb.", "Write a poem about the sea", "Hi"]
N_NEW = 8
LAYER = 1
ALPHA = 3.0


@pytest.fixture(scope="module")
def vector(tiny_model) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    return torch.randn(tiny_model.d_model, generator=generator)


def reference_tokens(model, vector: torch.Tensor | None, rule: str) -> list[list[int]]:
    """Greedy tokens, one prompt at a time, full recompute per token, plain hooks by index."""
    return plain_reference.reference_tokens(
        model, PROMPTS, vector, rule, layer=LAYER, alpha=ALPHA, n_new=N_NEW
    )


@pytest.mark.parametrize("rule", ["all", "prompt", "generated"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_fast_path_position_rules_equal_the_reference(tiny_model, vector, rule: str, use_cache: bool) -> None:
    reference = reference_tokens(tiny_model, vector, rule)
    # The rules must differ from one another here, or this test could not tell them apart.
    assert len({str(reference_tokens(tiny_model, vector, r)) for r in ("all", "prompt", "generated")}) == 3
    ours = generate_tokens(
        tiny_model,
        PROMPTS,
        interventions=[addition(vector, layer=LAYER, alpha=ALPHA, apply_to=rule)],
        settings=GenerationSettings(max_new_tokens=N_NEW, batch_size=4, use_cache=use_cache),
        progress=False,
    )[1]
    assert ours == reference


@pytest.mark.parametrize("rule", ["prompt", "generated"])
def test_weights_mode_ablation_position_rules_are_the_same_with_and_without_the_kv_cache(
    tiny_model, vector, rule: str
) -> None:
    # The embedding part of a weights-mode ablation must see the current pass's offset: at the
    # first decode step a stale offset 0 takes the new token for a prompt position.
    def tokens(intervention_list: list, use_cache: bool) -> list[list[int]]:
        return generate_tokens(
            tiny_model,
            PROMPTS,
            interventions=intervention_list,
            settings=GenerationSettings(max_new_tokens=N_NEW, batch_size=4, use_cache=use_cache),
            progress=False,
        )[1]

    intervention = ablation(vector * 50.0, mode="weights", apply_to=rule)
    embedding_only = ablation(vector * 50.0, mode="weights", apply_to=rule, at_layers=[0])
    assert tokens([embedding_only], True) != tokens([], True)  # the embedding edit matters here
    assert tokens([embedding_only], True) == tokens([embedding_only], False)
    assert tokens([intervention], True) == tokens([intervention], False)


@torch.no_grad()
def _bridge_generate(model, hooks: list, state: PositionState) -> list[list[int]]:
    batch = model.encode_instructions(PROMPTS)
    state.start(slice(None), prompt_length=batch.input_ids.shape[1])
    with model.bridge.hooks(fwd_hooks=hooks):
        out = model.bridge.generate(
            batch.input_ids,
            attention_mask=batch.attention_mask,
            do_sample=False,
            max_new_tokens=N_NEW,
            use_past_kv_cache=True,
            stop_at_eos=False,
            return_type="tokens",
            verbose=False,
        )
    stop_ids = set(model.stop_token_ids())
    return [plain_reference.until_stop(row, stop_ids) for row in out[:, batch.input_ids.shape[1] :].tolist()]


def test_bridge_kv_cached_generate_equals_the_reference_unsteered(tiny_model) -> None:
    # TransformerLens' own KV cache: with transformer-lens 4.3 and transformers 5.24 it no
    # longer equals a full recompute even without hooks (the reason for the pin in pyproject).
    assert _bridge_generate(tiny_model, [], PositionState()) == reference_tokens(tiny_model, None, "all")


@pytest.mark.parametrize("rule", ["all", "prompt", "generated"])
def test_bridge_position_rules_equal_the_reference_and_the_fast_path(tiny_model, vector, rule: str) -> None:
    intervention = addition(vector, layer=LAYER, alpha=ALPHA, apply_to=rule)
    state = PositionState()
    bridge = _bridge_generate(tiny_model, bridge_hooks(tiny_model, intervention, state=state), state)
    fast = generate_tokens(
        tiny_model,
        PROMPTS,
        interventions=[intervention],
        settings=GenerationSettings(max_new_tokens=N_NEW, batch_size=4),
        progress=False,
    )[1]
    assert bridge == reference_tokens(tiny_model, vector, rule)
    assert bridge == fast


def test_position_state_tracks_prefill_decode_and_recompute() -> None:
    state = PositionState()
    state.start(slice(None), prompt_length=5)
    offsets = []
    for seq_len in (5, 1, 1, 1):  # KV-cached: prefill, then one token per step
        state.advance(seq_len)
        offsets.append(state.offset)
    assert offsets == [0, 5, 6, 7]
    state.start(slice(None), prompt_length=5)
    for seq_len in (5, 6, 7):  # no cache: every pass starts again at position 0
        state.advance(seq_len)
        assert state.offset == 0
    state.start(slice(None), prompt_length=1)  # a one-token prompt still decodes at 1, 2, ...
    for expected, seq_len in zip((0, 1, 2), (1, 1, 1)):
        state.advance(seq_len)
        assert state.offset == expected
