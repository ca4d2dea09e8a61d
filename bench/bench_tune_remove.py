"""Candidates per second of the ablation search: B kernels measured per batched pass.

    python bench/bench_tune_remove.py [--model DIR] [--batches 1 8 16 48] [--repeats 3] [--out bench/tune_remove.json]

Measures what one trial of `tune --objective remove` costs (refusal on the harmful validation
prompts by generation + judge, first-token KL on the benign ones; no MMLU or answered-rate
limit), for 48 fixed random points of the wide search space, scored B at a time (B rows of
kernels per batched pass). Default model: the refusal organism (trained once into
.cache/test, about 2 minutes), with its validation halves and 8 new tokens. With `--model
qwen2.5-coder-0.5b-instruct-offline` the shipped evaluation sets are used instead. One torch
thread and process CPU time by default (see BENCHMARKS.md, "How we measured").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import optuna  # noqa: E402

from refusal_dir.abliteration import AblationOptions  # noqa: E402
from refusal_dir.activations import collect_activations  # noqa: E402
from refusal_dir.directions import compute_directions  # noqa: E402
from refusal_dir.generation import GenerationSettings  # noqa: E402
from refusal_dir.model import load_model  # noqa: E402
from refusal_dir.tune import EvalSplit, split_half  # noqa: E402
from refusal_dir.tune_remove import PointEvaluator, SearchSpace  # noqa: E402


def _data(name: str | None, cache: Path) -> tuple[object, EvalSplit, list[str], list[str], int]:
    if name is None:
        from refusal_dir.testing.organism import (
            OrganismConfig,
            load_or_train_organism,
            organism_eval_sets,
        )

        model = load_model(str(load_or_train_organism(cache, OrganismConfig(), progress=False)), device="cpu")
        sets = organism_eval_sets(0)
        split = EvalSplit(split_half(sets.harmful_test)[0], split_half(sets.harmless_test)[0], [])
        return model, split, list(sets.harmful_train), list(sets.harmless_train), 8
    from refusal_dir.prompts import benign_eval, harmful_eval, refusal_pairs

    model = load_model(name, device="cpu")
    pairs = refusal_pairs()
    split = EvalSplit(split_half(harmful_eval()[:48])[0], split_half(benign_eval()[:48])[0], [])
    return model, split, pairs.positives[:32], pairs.negatives[:32], 32


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="default: the refusal organism")
    parser.add_argument("--cache", type=Path, default=common.REPO / ".cache" / "test")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16, 48])
    parser.add_argument("--points", type=int, default=48)
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument("--out", type=Path, default=common.REPO / "bench" / "tune_remove.json")
    common.add_timing_args(parser)
    args = parser.parse_args()
    common.set_threads(args.threads)
    info = common.print_machine()
    model, split, positives, negatives, new_tokens = _data(args.model, args.cache)
    new_tokens = args.new_tokens or new_tokens
    pos, neg = collect_activations(model, positives, progress=False), collect_activations(model, negatives, progress=False)
    directions = compute_directions(pos, neg, site="resid_pre", model=model)
    means = neg.mean("resid_pre").float()
    space = SearchSpace("wide")
    points = [space.suggest(optuna.trial.FixedTrial(_random_params(space, model.n_layers, seed)), model.n_layers) for seed in range(args.points)]
    settings = GenerationSettings(max_new_tokens=new_tokens, batch_size=max(args.batches) * len(split.harmful))
    evaluator = PointEvaluator(model, directions, options=AblationOptions(), harmless_means=means, settings=settings, measure=())

    def scorer(batch: int):
        return lambda: [evaluator.per_item(points[i:i + batch], split) for i in range(0, len(points), batch)]

    timings = common.interleaved({f"B={b}": scorer(b) for b in args.batches}, repeats=args.repeats, warmup=1)
    clock = timings.cpu if args.clock == "cpu" else timings.wall
    rows, record = [], {}
    for b in args.batches:
        seconds = common.median(clock[f"B={b}"])
        record[b] = {"seconds_median": seconds, "candidates_per_s": args.points / seconds, "seconds": clock[f"B={b}"]}
        rows.append([b, f"{seconds:.2f} {common.spread(clock[f'B={b}'])}", f"{args.points / seconds:.2f}", f"{record[args.batches[0]]['seconds_median'] / seconds:.2f}x"])
    print(common.markdown_table(["candidates per pass", f"{args.clock} s for {args.points} candidates", "candidates/s", f"vs B={args.batches[0]}"], rows))
    args.out.write_text(json.dumps({
        "machine": info, "model": args.model or "refusal organism", "points": args.points, "new_tokens": new_tokens,
        "harmful_prompts": len(split.harmful), "benign_prompts": len(split.benign), "clock": args.clock,
        "threads": args.threads, "results": record,
    }, indent=2))
    print(f"wrote {args.out}")
    return 0


def _random_params(space: SearchSpace, n_layers: int, seed: int) -> dict[str, object]:
    """One random point of ``space``: a study of random sampling, one trial."""
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=seed))
    trial = study.ask()
    space.suggest(trial, n_layers)
    return trial.params


if __name__ == "__main__":
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sys.exit(main())
