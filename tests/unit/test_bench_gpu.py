"""Smoke test of bench/bench_gpu.py on the CPU: a tiny random model, tiny sizes, a small budget.

The numbers mean nothing here; what is checked is that every part runs through the public API
and the JSON holds each part, positive ratios and the goals.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

TINY_SIZES = [
    "--device",
    "cpu",
    "--dtype",
    "float32",
    "--repeats",
    "2",
    "--direction-pairs",
    "4",
    "--extract-prompts",
    "8",
    "--extract-batch",
    "4",
    "--gen-prompts",
    "4",
    "--new-tokens",
    "3",
    "--sweep-prompts",
    "2",
    "--search-candidates",
    "3",
    "--search-prompts",
    "2",
]


@pytest.fixture(scope="module")
def bench_gpu(load_bench):
    """The script as a module; the environment variables ``bench/common.py`` sets are undone."""
    module = load_bench("bench_gpu")
    yield module
    for name in ("common", "bench_gpu"):
        sys.modules.pop(name, None)


def test_every_part_runs_and_reports_positive_ratios(bench_gpu, tiny_model_dir, tmp_path):
    out = tmp_path / "gpu.json"
    threads, grad = torch.get_num_threads(), torch.is_grad_enabled()
    returned = bench_gpu.main(
        ["--model", str(tiny_model_dir), "--out", str(out), "--budget-s", "60", *TINY_SIZES]
    )
    assert (torch.get_num_threads(), torch.is_grad_enabled()) == (threads, grad)
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(returned))
    assert {"date", "torch", "transformers", "git commit", "device"} <= set(written["machine"])
    assert written["model"]["n_layers"] == 3
    parts = written["parts"]
    assert set(parts) == {"extraction", "generation", "sweep", "search"}
    for name, part in parts.items():
        assert "skipped" not in part, name
        assert part["repeats"] >= 1
        assert part["peak_gpu_mib"] is None  # on the CPU
        for row in part["rows"].values():
            assert row[f"{part['unit']}_per_s"] > 0
    ratios = [
        parts["extraction"]["ours_vs_plain"],
        parts["generation"]["steered_vs_unsteered"],
        parts["generation"]["ablation_vs_unsteered"],
        parts["generation"]["unsteered_vs_plain"],
        parts["sweep"]["batched_vs_sequential"],
        parts["search"]["batched_vs_sequential"],
        parts["search"]["shared_prefix_vs_sequential"],
    ]
    assert all(isinstance(r, float) and r > 0 for r in ratios), ratios
    # Same computation both ways: our activations equal the plain forward's hidden states.
    assert parts["extraction"]["resid_pre_max_relative_difference"] < 1e-5
    assert parts["sweep"]["rows_equal"] == "18/18"
    assert parts["search"]["trials_equal"] == "3/3"  # one kernel per row gives each trial's own result
    assert parts["search"]["kl_max_difference"] < 1e-4
    assert parts["search"]["shared_prefix_trials_equal"] == "3/3"  # tune's default path, the same trials
    assert parts["search"]["shared_prefix_kl_max_difference"] < 1e-4
    assert [g["met"] is not None for g in written["goals"]] == [True, True, True, True]


def test_random_weights_and_a_spent_budget(bench_gpu, tiny_model_dir, tmp_path):
    # The model's config and tokenizer with random weights; a budget spent before the first part
    # skips every part with a note and leaves the goals unjudged.
    out = tmp_path / "gpu.json"
    result = bench_gpu.main(
        [
            "--model",
            str(tiny_model_dir),
            "--random-weights",
            "--out",
            str(out),
            "--budget-s",
            "0.001",
            *TINY_SIZES,
        ]
    )
    assert result["model"]["weights"].startswith("random")
    assert result["model"]["n_layers"] == 3
    assert all("skipped" in part for part in result["parts"].values())
    assert [g["met"] for g in result["goals"]] == [None, None, None, None]
    assert json.loads(out.read_text())["parts"] == result["parts"]
