"""Reproduce the organism results table in docs/organism.md: the full sweep on the refusal organism.

    python examples/organism_sweep.py [--cache .cache/test] [--output-dir docs/organism-run]

Trains the default organism once (about 2 minutes of CPU; reused from the cache afterwards),
writes its held-out sets as JSONL files, and runs `refusal-dir run` on them with prompt-position
addition and option scoring of the four-choice questions.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from refusal_dir.cli import main
from refusal_dir.testing.organism import OrganismConfig, load_or_train_organism, organism_eval_sets

CONFIG = """steering:
  apply_to: prompt
  methods: [addition, ablation, conditional]
evaluation:
  mmlu_scoring: option
  mmlu_prompt: as_is
  honesty: false
  cross_entropy: false            # English answers do not fit its 64-token context or its vocabulary
generation:
  max_new_tokens: 8
  batch_size: 96
extraction:
  max_layer_fraction: 1.0
"""


def _relative(path: Path) -> str:
    """``path`` relative to the working directory when under it: the saved config and
    directions then record no machine path."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def eval_files(cache: Path) -> tuple[Path, dict[str, Path], Path]:
    """The organism (trained once), its held-out sets as JSONL files and the config file, all
    beside the organism in ``cache`` (rewritten on every call)."""
    model_dir = load_or_train_organism(cache, OrganismConfig())
    sets = organism_eval_sets(0)
    data = {
        # The topic words: 48 prompts are 12 words x 4 templates, so intervals resample words.
        "harmful": [{"instruction": p, "topic": t} for p, t in zip(sets.harmful_test, sets.harmful_test_topics)],
        "benign": [{"instruction": p, "topic": t} for p, t in zip(sets.harmless_test, sets.harmless_test_topics)],
        "pairs": [{"harmful": a, "harmless": b} for a, b in zip(sets.harmful_train, sets.harmless_train)],
        "mc": [{"question": q.question, "choices": list(q.choices), "answer": q.answer} for q in sets.mc_test],
    }
    scratch = cache / "organism-eval-sets"
    scratch.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, items in data.items():
        files[name] = scratch / f"{name}.jsonl"
        files[name].write_text("\n".join(json.dumps(item) for item in items) + "\n")
    config = scratch / "organism.yaml"
    config.write_text(CONFIG)
    return model_dir, files, config


def data_flags(model_dir: Path, files: dict[str, Path], config: Path) -> list[str]:
    """The flags naming the organism, its config and its data files (relative paths)."""
    return [
        "--config", _relative(config), "--model", _relative(model_dir),
        "--pairs-file", _relative(files["pairs"]), "--harmful-file", _relative(files["harmful"]),
        "--benign-file", _relative(files["benign"]), "--mmlu-file", _relative(files["mc"]),
    ]


def run(cache: Path, output_dir: Path) -> int:
    return main(["run", *data_flags(*eval_files(cache)), "--output-dir", str(output_dir), "--quiet", "--fresh"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path(".cache/test"))
    parser.add_argument("--output-dir", type=Path, default=Path("docs/organism-run"))
    args = parser.parse_args()
    sys.exit(run(args.cache, args.output_dir))
