"""Dropping finished rows from the decode batch (``GenerationSettings.drop_finished``), on the
main job's generation.

The generation stages of ``make run`` (the README's main command): per method (addition and
ablation of the saved run's selected direction), one ``generate`` call over the coefficients
x prompts of one evaluation set (harmful, benign): per-row coefficients 0, 1 and 4, the first
``--prompts`` prompts of each shipped set, ``--new-tokens`` new tokens, greedy, natural
stopping, all rows in one batch. Refusals end after a dozen tokens while answers run to the
limit, so without dropping every row is decoded until the longest is done.

Each stage runs ``--repeats`` times with dropping off and on, alternating which goes first,
torch's default threads (one per core, as the run uses); wall and process CPU seconds per call
(medians), and whether the texts are identical. A control stage runs the benign addition rows
with no stop id at all, so no row ever finishes: what splitting the decode into calls of
``DROP_EVERY`` tokens costs by itself.

    python bench/bench_drop_finished.py --run docs/qwen2.5-coder-0.5b-instruct-run

Writes ``bench/drop_finished.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct-offline")
    parser.add_argument("--run", type=Path, required=True, help="a finished `refusal-dir run` output (its directions)")
    parser.add_argument("--prompts", type=int, default=24, help="prompts per evaluation set")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.0, 1.0, 4.0])
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--methods", nargs="+", default=["addition", "ablation"], choices=["addition", "ablation"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output", type=Path, default=common.REPO / "bench" / "drop_finished.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from refusal_dir import Steer, load_model
    from refusal_dir.config import load_config
    from refusal_dir.datasets import load_datasets
    from refusal_dir.extraction import extraction_directory, load_extraction
    from refusal_dir.generation import GenerationSettings, generate_tokens

    directory = extraction_directory(args.run / "directions")
    machine = common.print_machine()
    model = load_model(args.model, device="cpu", dtype="float32")
    extraction = load_extraction(directory, model=model)
    datasets = load_datasets(load_config(None).with_overrides({"model.name": args.model}))
    sets = {"harmful": datasets.harmful_eval[: args.prompts], "benign": datasets.benign_eval[: args.prompts]}
    layer = extraction.selected.layer
    stages: list[dict[str, Any]] = []
    plan = [(method, name, False) for method in args.methods for name in sets] + [(args.methods[0], "benign", True)]
    for method, name, control in plan:
        prompts = sets[name]
        steer = Steer(method, extraction.steering_set, layer=layer)
        rows = [prompt for _ in args.alphas for prompt in prompts]
        interventions = steer.at([alpha for alpha in args.alphas for _ in prompts])
        settings = GenerationSettings(max_new_tokens=args.new_tokens, batch_size=len(rows))
        stops = model._stop_ids
        if control:
            model._stop_ids = []  # no row finishes: the calls' own cost
        runs: dict[bool, dict[str, Any]] = {False: {"wall_s": [], "cpu_s": []}, True: {"wall_s": [], "cpu_s": []}}
        for repeat in range(args.repeats):
            order = (False, True) if (len(stages) + repeat) % 2 == 0 else (True, False)
            for drop in order:
                chosen = dataclasses.replace(settings, drop_finished=drop)
                wall, cpu, (texts, tokens) = common.time_once(
                    lambda rows=rows, interventions=interventions, chosen=chosen: generate_tokens(
                        model, rows, interventions=interventions, settings=chosen, progress=False,
                    )
                )
                runs[drop]["wall_s"].append(wall)
                runs[drop]["cpu_s"].append(cpu)
                runs[drop]["texts"], runs[drop]["new_tokens"] = texts, [len(t) for t in tokens]
                print(f"{method:9s} {name:8s}{' control' if control else ''} drop={drop!s:5s} {wall:7.1f} s wall {cpu:7.1f} s CPU", flush=True)
        model._stop_ids = stops
        lengths = runs[False]["new_tokens"]
        median = {drop: {k: common.median(runs[drop][k]) for k in ("wall_s", "cpu_s")} for drop in (False, True)}
        stages.append({
            "method": method, "set": name, "control_no_stop_ids": control, "rows": len(rows),
            "off": {**median[False], "all_wall_s": runs[False]["wall_s"]},
            "on": {**median[True], "all_wall_s": runs[True]["wall_s"]},
            "speedup_wall": median[False]["wall_s"] / median[True]["wall_s"],
            "speedup_cpu": median[False]["cpu_s"] / median[True]["cpu_s"],
            "identical_texts": sum(a == b for a, b in zip(runs[False]["texts"], runs[True]["texts"], strict=True)),
            "mean_new_tokens": sum(lengths) / len(lengths),
            "rows_at_the_limit": sum(n >= args.new_tokens for n in lengths),
        })
    total = {drop: sum(stage[drop]["wall_s"] for stage in stages if not stage["control_no_stop_ids"]) for drop in ("off", "on")}
    record = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine, "model": args.model, "layer": layer, "alphas": args.alphas,
        "new_tokens": args.new_tokens, "stages": stages,
        "total_wall_s": total, "total_speedup_wall": total["off"] / total["on"],
    }
    args.output.write_text(json.dumps(record, indent=2) + "\n")
    print(f"total: off {total['off']:.1f} s, on {total['on']:.1f} s, {record['total_speedup_wall']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
