"""bench/profile_trial.py on a tiny model: it runs, counts what it says, and refuses a short file."""

from __future__ import annotations

import json
import sys

import pytest


@pytest.fixture(scope="module")
def profile(load_bench):
    yield load_bench("profile_trial")
    for name in ("common", "bench_abliteration", "profile_trial"):
        sys.modules.pop(name, None)


def _trial(number: int, position: float, distance: float) -> dict:
    kernel = {"max_weight": 1.0, "max_weight_position": position, "min_weight": 0.5, "min_weight_distance": distance}
    return {
        "trial": number, "refusal": 0.5, "direction_index": 1.0,
        **{f"{kind}.{name}": value for kind in ("attn", "mlp") for name, value in kernel.items()},
    }


def test_profile_counts_the_batch_it_ran(profile, tiny_model_dir, tmp_path):
    trials = tmp_path / "ours-trials.json"
    # 3 layers: peak at 2 reaching 1 layer away edits layers 1-2; peak at 0 edits from layer 0.
    trials.write_text(json.dumps([_trial(0, 2.0, 1.0), _trial(1, 0.0, 1.0)]))
    out = tmp_path / "profile.json"
    code = profile.main([
        "--model", str(tiny_model_dir), "--trials-from", str(trials), "--first", "0", "--candidates", "2",
        "--validation-prompts", "3", "--new-tokens", "3", "--output", str(out),
    ])
    assert code == 0
    record = json.loads(out.read_text())
    assert record["first_edited_layer_of_every_recorded_trial"] == [1, 0]
    assert record["earliest_first_edited_layer_per_batch"] == [0]
    phases = record["ours"]["phases"]
    prefill, decode = phases["harmful prefill + first token"], phases["decode"]
    assert prefill["rows"] == decode["rows"] == 6 and decode["steps"] == 2
    # 2 candidates share the prefix: it is counted once per candidate, each row's own tokens padded.
    k, width = prefill["prefix_tokens"], prefill["padded_width"]
    assert k > 0 and prefill["positions"] == 2 * k + 6 * (width - k)
    # heretic's way runs each of the 3 prompts whole: at least the prefix and one own token each.
    heretic = record["heretic_way_per_trial"]["harmful prefill"]
    assert 3 * (k + 1) <= heretic["positions"] <= 3 * width
    assert 0 <= decode["row_steps_after_every_row_stopped"] <= 6 * 2
    assert all(phase["wall_s"] > 0 for phase in phases.values())


def test_profile_refuses_a_file_with_too_few_trials(profile, tmp_path, capsys):
    trials = tmp_path / "ours-trials.json"
    trials.write_text(json.dumps([_trial(0, 2.0, 1.0)]))
    code = profile.main(["--trials-from", str(trials), "--candidates", "2", "--first", "0"])
    assert code == 2
    assert capsys.readouterr().err.count("\n") == 1
