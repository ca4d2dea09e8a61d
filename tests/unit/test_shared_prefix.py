"""Prefilling the prompts' shared first tokens once per group of alike rows (``share_prefix``)."""

from __future__ import annotations

import pytest
import torch

from refusal_dir.generation import shared_prefix_length
from refusal_dir.interventions import PositionState, addition, row_groups


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ([[1, 2, 3], [1, 2, 4]], 2),
        ([[1, 2, 3], [1, 2, 3]], 2),  # identical rows keep one token of their own
        ([[1, 2, 3]], 2),
        ([[1, 2, 3], [1]], 0),
        ([[5, 2, 3], [1, 2, 3]], 0),
        ([[1, 2, 3, 4], [1, 2, 9, 4], [1, 2, 3]], 2),
        ([], 0),
    ],
)
def test_shared_prefix_length(rows: list[list[int]], expected: int) -> None:
    assert shared_prefix_length(rows) == expected


def test_row_groups_gather_rows_with_equal_values_in_every_intervention() -> None:
    vector = torch.ones(8)
    alphas = addition(vector, layer=0, alpha=[0.5, 0.5, 1.0, 0.5, 1.0, 2.0])
    first, group = row_groups([alphas], slice(1, 5), 6)
    # rows 1..4 carry 0.5, 1.0, 0.5, 1.0: two groups, first rows 1 and 2 (global indices)
    assert first.tolist() == [1, 2]
    assert group.tolist() == [0, 1, 0, 1]
    # a second intervention that tells rows 1 and 3 apart splits their group
    other = addition(vector, layer=0, alpha=[0.0, 0.0, 0.0, 3.0, 0.0, 0.0])
    first, group = row_groups([alphas, other], slice(1, 5), 6)
    assert len(first) == 3
    assert group[0] != group[2] and group[1] == group[3]
    assert sorted(first.tolist()) == [1, 2, 3]
    for g, row in enumerate(first.tolist()):  # each group's first row is its earliest
        assert row == 1 + min(i for i, x in enumerate(group.tolist()) if x == g)


def test_row_groups_without_per_row_values_is_one_group() -> None:
    first, group = row_groups([addition(torch.ones(8), layer=0, alpha=2.0)], slice(3, 6), 6)
    assert first.tolist() == [3]
    assert group.tolist() == [0, 0, 0]
    first, group = row_groups([], slice(0, 2), 2)
    assert first.tolist() == [0] and group.tolist() == [0, 0]


def test_resume_continues_the_sequence_whatever_the_next_pass_length() -> None:
    state = PositionState()
    state.start(slice(0, 4), prompt_length=30)
    state.advance(10)  # the shared prefix
    state.resume(slice(0, 4))
    state.advance(20)  # the rows' own tokens: longer than the prefix, still a continuation
    assert (state.offset, state.seen) == (10, 30)
    state.advance(1)
    assert (state.offset, state.seen) == (30, 31)
    state.advance(40)  # without resume, a longer pass is a new prefill
    assert (state.offset, state.seen) == (0, 40)


def test_letter_scoring_with_a_shared_prefix_gives_the_whole_prompts_probabilities(tiny_model) -> None:
    """MMLU-style letter scoring (tune's MMLU limit) under two groups of per-row edits."""
    from refusal_dir.evaluation.metrics import mmlu_accuracy
    from refusal_dir.generation import split_prefix
    from refusal_dir.prompts import format_mc_prompt, mmlu_questions

    questions = mmlu_questions()[:4] * 2
    assert split_prefix(tiny_model, tiny_model.format_prompts([format_mc_prompt(q) for q in questions]))[1] > 0
    vector = torch.randn(tiny_model.d_model, generator=torch.Generator().manual_seed(3)) * 20
    edit = addition(vector, layer=1, alpha=[0.0] * 4 + [1.0] * 4)
    probs = {
        share: mmlu_accuracy(tiny_model, questions, interventions=[edit], batch_size=3, share_prefix=share).correct_probs
        for share in (False, True)
    }
    assert max(abs(a - b) for a, b in zip(probs[False][:4], probs[False][4:])) > 1e-3  # the groups differ
    assert probs[True] == pytest.approx(probs[False], abs=1e-5)


def test_row_index_moves_a_tensor_of_rows_once_per_device_and_follows_new_rows() -> None:
    state = PositionState()
    state.start(slice(2, 5))
    assert state.row_index(torch.device("meta")) == slice(2, 5)
    state.resume(torch.tensor([0, 3]))
    moved = state.row_index(torch.device("meta"))
    assert moved.device.type == "meta" and moved is state.row_index(torch.device("meta"))  # once
    assert state.row_index(torch.device("cpu")).tolist() == [0, 3]
    state.resume(torch.tensor([3]))  # rows left the batch: the new rows, not the cached ones
    assert state.row_index(torch.device("cpu")).tolist() == [3]
    assert state.row_index(torch.device("meta")).shape == (1,)
