"""The sweep's rows against a table saved before the sweep engine moved into ``refusal_dir.sweep``
(issue #16): every method, every metric group, on the tiny model. Identical up to float rounding.

Regenerate (only when a change of the numbers is intended, and say why in the commit):
``REFUSAL_DIR_WRITE_GOLDEN=1 pytest tests/unit/test_sweep_golden.py``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from refusal_dir.config import load_config
from refusal_dir.pipeline import SweepContext, extract, load_datasets, prepare_output_dir, sweep

GOLDEN = Path(__file__).parent / "data" / "golden_sweep_rows.json"


def _config(model_dir: Path):
    return load_config().with_overrides({
        "model.name": str(model_dir),
        "data.max_eval_prompts": 6,
        "generation.max_new_tokens": 6,
        "steering.alphas": (-1.0, 0.0, 1.5),
        "steering.methods": ("addition", "ablation", "conditional", "prompt"),
        "extraction.methods": ("mean_diff",),
        "extraction.sites": ("resid_pre",),
        "extraction.selection_candidates": 2,
        "evaluation.answer_kl_tokens": 2,
        "evaluation.bootstrap_resamples": 200,
    })


def _same(a, b, path: str) -> list[str]:
    if isinstance(a, float) or isinstance(b, float):
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6):
            return []
        return [f"{path}: {a!r} != {b!r}"]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path}: keys {sorted(a)} != {sorted(b)}"]
        return [problem for key in a for problem in _same(a[key], b[key], f"{path}.{key}")]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def test_the_sweep_gives_the_saved_rows(tiny_model, tiny_model_dir, tmp_path: Path) -> None:
    config = _config(tiny_model_dir)
    output = prepare_output_dir(tmp_path / "run", config)
    datasets = load_datasets(config)
    extraction = extract(tiny_model, config, datasets, output, progress=False)
    rows = sweep(SweepContext(tiny_model, config, datasets, extraction, progress=False), output)
    if os.environ.get("REFUSAL_DIR_WRITE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(rows, indent=1) + "\n")
    saved = json.loads(GOLDEN.read_text())
    assert {r["method"] for r in saved} == {"addition", "ablation", "conditional", "prompt", "honesty_addition", "honesty_ablation"}
    assert len(rows) == len(saved)
    problems = [p for i, (row, old) in enumerate(zip(rows, saved, strict=True)) for p in _same(row, old, f"row {i}")]
    assert not problems, "\n".join(problems[:20])
