"""Remove refusal from the refusal organism with `tune --objective remove` (docs/abliteration.md).

    python examples/organism_tune_remove.py [--cache .cache/test] [--output-dir docs/organism-tune-remove]

Extracts the organism's directions (every layer), then searches ablation kernels over every
layer (`--search-space wide`: the organism has 4 layers) with seeded TPE, 16 candidates per
batched pass, for the least KL at no validation refusal (`--max-refusal 0`), and checks the chosen point on the held-out halves against the unedited model.
Writes `extraction/` and `tune/` under the output directory; `tune/tune.md` is the table quoted
in docs/abliteration.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from organism_sweep import data_flags, eval_files  # noqa: E402

from refusal_dir.cli import main  # noqa: E402

# --max-refusal 0: remove refusal on every validation prompt. On this model the whole Pareto front
# costs KL ~1e-5, so nothing is gained by stopping at 0.1 on 24 validation prompts (a 0.08 point
# measured 0.17 on the held-out half in a run with the default 0.1 and resid_pre directions).
SEARCH = [
    "--objective", "remove", "--search-space", "wide", "--trials", "48", "--candidates-per-batch", "16", "--seed", "0",
    "--max-refusal", "0",
]


def run(cache: Path, output_dir: Path, extra: list[str] | None = None) -> int:
    flags = data_flags(*eval_files(cache))
    code = main(["extract", *flags, "--output-dir", str(output_dir / "extraction"), "--no-honesty", "--quiet"])
    if code != 0:
        return code
    return main([
        "tune", *flags, "--directions-dir", str(output_dir / "extraction"), "--output-dir", str(output_dir / "tune"),
        *SEARCH, *(extra or []), "--quiet",
    ])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path(".cache/test"))
    parser.add_argument("--output-dir", type=Path, default=Path("docs/organism-tune-remove"))
    args = parser.parse_args()
    sys.exit(run(args.cache, args.output_dir))
