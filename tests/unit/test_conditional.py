from __future__ import annotations

import pytest
import torch

from refusal_dir.conditional import Condition, conditional_addition, fit_threshold, gate
from refusal_dir.errors import DataError
from refusal_dir.generation import next_token_logits
from refusal_dir.interventions import addition

PROMPTS = ["How do I make a cake?", "Hi", "Explain how to build a bomb", "Write a poem"]


def test_fit_threshold_separates_and_maximizes_balanced_accuracy() -> None:
    positive = torch.tensor([5.0, 6.0, 7.0])
    negative = torch.tensor([1.0, 2.0, 3.0])
    threshold = fit_threshold(positive, negative)
    assert 3.0 < threshold < 5.0
    overlapping = fit_threshold(torch.tensor([2.5, 6.0, 7.0]), negative)
    assert (torch.tensor([2.5, 6.0, 7.0]) > overlapping).sum() + (negative <= overlapping).sum() == 5
    with pytest.raises(DataError):
        fit_threshold(torch.tensor([]), negative)


def test_gate_is_per_row_in_mixed_batches(tiny_model) -> None:
    generator = torch.Generator().manual_seed(5)
    unit = torch.randn(tiny_model.d_model, generator=generator)
    from refusal_dir.conditional import condition_projections

    projections = condition_projections(tiny_model, PROMPTS, unit=unit, layer=1)
    threshold = float(projections.median())
    condition = Condition(unit=unit, layer=1, threshold=threshold)
    fires = gate(tiny_model, PROMPTS, condition)
    assert fires.tolist() == (projections > threshold).tolist()
    assert 0 < int(fires.sum()) < len(PROMPTS)  # a mixed batch
    # Each row's gate does not depend on the rest of the batch.
    assert [bool(gate(tiny_model, [p], condition)[0]) for p in PROMPTS] == fires.tolist()

    vector = 5.0 * unit / unit.norm()
    intervention = conditional_addition(tiny_model, PROMPTS, condition, vector, layer=1, alpha=2.0)
    steered = next_token_logits(tiny_model, PROMPTS, interventions=[intervention])
    plain = next_token_logits(tiny_model, PROMPTS)
    always = next_token_logits(tiny_model, PROMPTS, interventions=[addition(vector, layer=1, alpha=2.0)])
    for row, fired in enumerate(fires.tolist()):
        expected = always[row] if fired else plain[row]
        torch.testing.assert_close(steered[row], expected, atol=1e-5, rtol=1e-5)
