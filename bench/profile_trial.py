"""Where one batch of ``tune --objective remove`` trials spends its time, against the work it does.

Re-scores one batch of candidates that a ``bench_abliteration.py`` run recorded (its
``RAW/ours-trials.json``) as ``tune_remove.PointEvaluator`` scores them (shared prefix, one
candidate per group of rows), timing three phases apart:

* the harmful prompts' prefill and first answer token (``generate`` with one new token);
* the rest of the greedy decode (``generate`` with ``--new-tokens``, minus the first);
* the benign prompts' first-token KL pass.

For each phase it counts the matrix-multiply FLOPs the forward passes do (2 x parameters of the
decoder blocks' weight matrices per position computed, padding included, plus the unembedding
where logits are computed; attention scores and norms left out, a few percent at these lengths),
and the same count for heretic's way of scoring one trial (each candidate alone, whole prompts,
no padding counted: a lower bound on its work). Dividing gives the FLOP rate each phase reached on
this machine, and the ratio of the two counts says what speed-up the saved work alone can give.

Run (about 4 minutes on 2 cores)::

    python bench/profile_trial.py --trials-from bench/abliteration-48-shared-raw/ours-trials.json \\
        --directions-dir docs/qwen2.5-coder-0.5b-instruct-run/directions

Writes ``bench/trial-profile.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_abliteration  # noqa: E402
import common  # noqa: E402


def matmul_parameters(model: Any) -> tuple[int, int]:
    """(parameters of the decoder blocks' weight matrices, of the unembedding)."""
    blocks = model.architecture.layers(model.hf)
    body = sum(p.numel() for block in blocks for p in block.parameters() if p.dim() == 2)
    unembed = model.hf.get_output_embeddings().weight.numel()
    return body, unembed


def prefill_flops(model: Any, texts: list[str], body: int, unembed: int, groups: int, new_tokens: int) -> dict[str, Any]:
    """Ours: the shared prefix once per group, then every row's own tokens at the padded width."""
    from refusal_dir.generation import split_prefix

    batch, k = split_prefix(model, texts, new_tokens=new_tokens, share=True)
    rows, width = batch.input_ids.shape
    positions = groups * k + rows * (width - k)
    return {"rows": rows, "prefix_tokens": k, "padded_width": width, "positions": positions,
            "flops": 2 * (positions * body + rows * unembed)}


def whole_prompt_flops(model: Any, prompts: list[str], body: int, unembed: int) -> dict[str, Any]:
    """Heretic's way for one candidate: every prompt whole, unpadded (a lower bound)."""
    lengths = [len(ids) for ids in model.tokenizer(model.format_prompts(prompts))["input_ids"]]
    return {"rows": len(prompts), "positions": sum(lengths), "flops": 2 * (sum(lengths) * body + len(prompts) * unembed)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials-from", type=Path, required=True, help="RAW/ours-trials.json of a bench_abliteration run")
    parser.add_argument("--first", type=int, default=8, help="index of the batch's first recorded trial")
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--validation-prompts", type=int, default=24)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--model", default=bench_abliteration.DEFAULT_MODEL)
    parser.add_argument("--directions-dir", type=Path, default=None, help="a `refusal-dir extract` output to reuse (default: extract first)")
    parser.add_argument("--heretic-seconds-per-trial", type=float, default=None, help="heretic's measured s/trial, for its FLOP rate")
    parser.add_argument("--output", type=Path, default=common.REPO / "bench" / "trial-profile.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import tempfile

    from refusal_dir.abliteration import AblationOptions, AblationPoint, Kernel, harmless_means
    from refusal_dir.evaluation import metrics
    from refusal_dir.generation import generate_tokens
    from refusal_dir.tune_remove import PointEvaluator

    recorded = json.loads(args.trials_from.read_text())[args.first : args.first + args.candidates]
    if len(recorded) < args.candidates:
        print(f"error: {args.trials_from} has no {args.candidates} trials from index {args.first}", file=sys.stderr)
        return 2
    bench_args = bench_abliteration.parse_args([
        "--model", args.model, "--validation-prompts", str(args.validation_prompts), "--new-tokens", str(args.new_tokens),
        "--batch-size", str(args.candidates * args.validation_prompts), "--no-heretic", "--heldout-prompts", "1",
        *(["--directions-dir", str(args.directions_dir)] if args.directions_dir else []),
    ])
    machine = common.print_machine()
    with tempfile.TemporaryDirectory() as work:
        ctx = bench_abliteration.build_context(bench_args, Path(work))
    model = ctx.model

    def kernel(trial: dict[str, Any], kind: str) -> Kernel:
        return Kernel(*(trial[f"{kind}.{name}"] for name in ("max_weight", "max_weight_position", "min_weight", "min_weight_distance")))

    points = [AblationPoint(kernel(t, "attn"), kernel(t, "mlp"), t["direction_index"]) for t in recorded]
    options = AblationOptions(token=ctx.selected.get("position"))
    means = harmless_means(model, ctx.train_harmless, site=ctx.ablation.meta.site, token=ctx.config.extraction.token,
                           batch_size=ctx.config.extraction.batch_size)
    settings = dataclasses.replace(ctx.settings, share_prefix=True)
    evaluator = PointEvaluator(model, ctx.ablation, options=options, harmless_means=means, settings=settings, measure=())
    harmful, benign = list(ctx.validation_harmful), list(ctx.validation_benign)
    reference = evaluator._reference_logits(benign)
    rows = [p for _ in points for p in harmful]
    benign_rows = [p for _ in points for p in benign]

    def generate(new_tokens: int) -> list[list[int]]:
        return generate_tokens(
            model, rows, interventions=evaluator._intervention(points, len(harmful)),
            settings=dataclasses.replace(settings, max_new_tokens=new_tokens), progress=False,
        )[1]

    def kl() -> Any:
        return metrics.kl_divergence(
            model, benign_rows, interventions=evaluator._intervention(points, len(benign)),
            reference_logits=reference, batch_size=settings.batch_size, share_prefix=True,
        )

    square = torch.randn(4096, 4096)
    matmul_wall = min(common.time_once(lambda: square @ square)[0] for _ in range(5))
    first_wall, first_cpu, _ = common.time_once(lambda: generate(1))
    full_wall, full_cpu, tokens = common.time_once(lambda: generate(args.new_tokens))
    kl_wall, kl_cpu, _ = common.time_once(kl)

    body, unembed = matmul_parameters(model)
    n = len(points)
    prefill = prefill_flops(model, model.format_prompts(rows), body, unembed, n, args.new_tokens)
    kl_prefill = prefill_flops(model, model.format_prompts(benign_rows), body, unembed, n, 0)
    decode_steps = args.new_tokens - 1
    decode = {"rows": len(rows), "steps": decode_steps, "flops": 2 * decode_steps * len(rows) * (body + unembed),
              "row_steps_after_every_row_stopped": sum(decode_steps - min(decode_steps, len(t)) for t in tokens)}
    ours_phases = {
        "harmful prefill + first token": {**prefill, "wall_s": first_wall, "cpu_s": first_cpu},
        "decode": {**decode, "wall_s": full_wall - first_wall, "cpu_s": full_cpu - first_cpu},
        "benign KL pass": {**kl_prefill, "wall_s": kl_wall, "cpu_s": kl_cpu},
    }
    for phase in ours_phases.values():
        phase["gflop_per_s"] = phase["flops"] / phase["wall_s"] / 1e9
    heretic_harmful = whole_prompt_flops(model, harmful, body, unembed)
    heretic_benign = whole_prompt_flops(model, benign, body, unembed)
    heretic_trial = heretic_harmful["flops"] + decode["flops"] / n + heretic_benign["flops"]
    ours_trial = sum(phase["flops"] for phase in ours_phases.values()) / n
    ours_seconds = (full_wall + kl_wall) / n
    def first_edited(trial: dict[str, Any]) -> int:
        """The first layer the trial's kernels give a nonzero weight (the number of layers: none)."""
        weights = AblationPoint(kernel(trial, "attn"), kernel(trial, "mlp")).layer_weights(model.n_layers)
        edited = torch.nonzero(weights.abs().sum(0))
        return int(edited.min()) if len(edited) else model.n_layers

    first = [first_edited(trial) for trial in json.loads(args.trials_from.read_text())]
    record: dict[str, Any] = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine, "model": bench_args.model, "trials": [t["trial"] for t in recorded],
        "validation_refusal_of_the_trials": [t["refusal"] for t in recorded],
        "parameters": {"decoder_block_matrices": body, "unembedding": unembed},
        "ours": {"phases": ours_phases, "seconds_per_trial": ours_seconds, "flops_per_trial": ours_trial,
                 "gflop_per_s": ours_trial / ours_seconds / 1e9},
        "heretic_way_per_trial": {"harmful prefill": heretic_harmful, "decode_flops": decode["flops"] / n,
                                  "benign KL pass": heretic_benign, "flops": heretic_trial},
        "matmul_4096_gflop_per_s": 2 * 4096**3 / matmul_wall / 1e9,
        "first_edited_layer_of_every_recorded_trial": first,
        "earliest_first_edited_layer_per_batch": [min(first[i : i + args.candidates]) for i in range(0, len(first), args.candidates)],
        "flop_ratio_heretic_over_ours": heretic_trial / ours_trial,
        "flop_ratio_if_our_prefills_were_free": heretic_trial / (decode["flops"] / n),
    }
    if args.heretic_seconds_per_trial:
        record["heretic_gflop_per_s_at_measured_speed"] = heretic_trial / args.heretic_seconds_per_trial / 1e9
    args.output.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: record[k] for k in (
        "flop_ratio_heretic_over_ours", "flop_ratio_if_our_prefills_were_free", "matmul_4096_gflop_per_s",
        "earliest_first_edited_layer_per_batch")}, indent=2))
    for name, phase in ours_phases.items():
        print(f"{name:32s} {phase['wall_s']:7.1f} s  {phase['flops'] / 1e12:6.2f} TFLOP  {phase['gflop_per_s']:6.1f} GFLOP/s")
    print(f"ours: {ours_seconds:.1f} s/trial, {ours_trial / 1e12:.2f} TFLOP/trial; heretic's way: {heretic_trial / 1e12:.2f} TFLOP/trial")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
