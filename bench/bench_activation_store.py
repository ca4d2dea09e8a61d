"""Benchmark: extraction through the activation store, peak memory against the prompt count.

Each size N runs in a fresh subprocess: ``load_model(qwen2.5-coder-0.5b-instruct-offline)``,
then N/2 harmful and N/2 harmless instructions (the shipped refusal pairs, cycled), each side
collected with :func:`refusal_dir.store.collect_to_store` (``resid_pre``, all 24 layers, last
token) into a fresh store, then the mean-difference directions from the stored sides
(:func:`refusal_dir.directions.compute_directions`, float64 sums streamed over the batch
files). The peak RSS is the child's own (``ru_maxrss`` from ``os.wait4``), so it covers the
whole process: imports, the model, collection and directions. The store is deleted afterwards.

The must-show of issue #18: peak(20,000 prompts) <= 1.2 x peak(2,000 prompts). The in-memory
path (:func:`~refusal_dir.activations.collect_activations`) would hold ``in_memory_bytes``
(prompts x 24 layers x 896 x 4 bytes) on top of the model.

``--synthetic`` measures the store alone, at sizes the CPU cannot run the model on: the forward
pass (``refusal_dir.store.collect_batch``) is replaced by seeded random activations of the
model's shape; everything else is the library's code (plan, key, batch files, checksums,
resume scan, streamed float64 means, directions). The model is still loaded (its tokenizer,
template and weights fingerprint make the key) but never run, so its weights are never read
in and the peak shows the store's own memory.

    python bench/bench_activation_store.py [--sizes 2000 20000] [--batch-size 32] [--threads 0]
    python bench/bench_activation_store.py --sizes 2000 --json bench/activation_store.json
    python bench/bench_activation_store.py --synthetic --sizes 2000 20000 100000 --json bench/activation_store.json

Results are merged into the ``--json`` file by size (a later run of one size replaces only its
own entry), with the machine, date and command.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (sets REFUSAL_DIR_CACHE and sys.path first)

MODEL = "qwen2.5-coder-0.5b-instruct-offline"
SITE = "resid_pre"


def _status_mib(field: str) -> float | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return None


def _synthetic_batches() -> None:
    """Replace the store's forward pass with seeded random activations of the same shape."""
    import torch

    from refusal_dir import store

    def collect_batch(model, plan, index):
        # Seeded by the batch's first prompt too, so that the two sides differ.
        generator = torch.Generator().manual_seed(index * 2**32 + zlib.crc32(plan.texts[plan.rows(index).start].encode()))
        shape = (len(plan.rows(index)), len(plan.labels), len(plan.layers), model.d_model)
        return {site: torch.randn(shape, generator=generator) for site in plan.sites}

    store.collect_batch = collect_batch


def worker(n: int, batch_size: int, threads: int, store: Path, synthetic: bool) -> None:
    """One size in this (fresh) process; prints one RESULT line of JSON."""
    common.set_threads(threads)
    import torch

    from refusal_dir import prompts as prompt_sets
    from refusal_dir.directions import compute_directions
    from refusal_dir.model import load_model
    from refusal_dir.store import collect_to_store

    if synthetic:
        _synthetic_batches()

    model = load_model(MODEL, device="cpu", with_bridge=False)
    rss_after_load = _status_mib("VmRSS")
    pairs = prompt_sets.refusal_pairs()
    base_harmful, base_harmless = pairs.positives, pairs.negatives
    harmful = [base_harmful[i % len(base_harmful)] for i in range(n // 2)]
    harmless = [base_harmless[i % len(base_harmless)] for i in range(n - n // 2)]
    tokens = [len(model._encode(t)) for t in model.format_prompts(base_harmful + base_harmless)]
    options = {"sites": (SITE,), "token": "last", "batch_size": batch_size, "progress": False}
    start, cpu_start = time.perf_counter(), time.process_time()
    positive = collect_to_store(model, harmful, store=store, name="harmful", **options)
    negative = collect_to_store(model, harmless, store=store, name="harmless", **options)
    collected, cpu_collected = time.perf_counter(), time.process_time()
    directions = compute_directions(positive, negative, site=SITE, method="mean_diff", model=model)
    finished = time.perf_counter()
    store_bytes = sum(f.stat().st_size for f in store.rglob("*.safetensors"))
    print(
        "RESULT "
        + json.dumps(
            {
                "prompts": n,
                "mode": "synthetic" if synthetic else "model",
                "batch_size": batch_size,
                "torch_threads": torch.get_num_threads(),
                "layers": model.n_layers,
                "d_model": model.d_model,
                "tokens_per_prompt_min_mean_max": [min(tokens), round(sum(tokens) / len(tokens), 1), max(tokens)],
                "collect_seconds": round(collected - start, 1),
                "collect_cpu_seconds": round(cpu_collected - cpu_start, 1),
                "directions_seconds": round(finished - collected, 2),
                "prompts_per_second": round(n / (collected - start), 2),
                "rss_after_load_mib": round(rss_after_load or 0, 1),
                "peak_rss_self_mib": round(_status_mib("VmHWM") or 0, 1),
                "store_bytes": store_bytes,
                "in_memory_bytes": n * model.n_layers * model.d_model * 4,
                "direction_norm_layer_12": round(float(directions.norms[0, 12]), 4),
            }
        ),
        flush=True,
    )


def run_size(n: int, args: argparse.Namespace) -> dict:
    """Run one size in a child process; its own peak RSS from os.wait4."""
    store = Path(tempfile.mkdtemp(prefix=f"bench-store-{n}-", dir=args.scratch))
    command = [sys.executable, __file__, "--worker", str(n), "--batch-size", str(args.batch_size),
               "--threads", str(args.threads), "--store", str(store / "store")]
    if args.synthetic:
        command.append("--synthetic")
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    shutil.rmtree(store, ignore_errors=True)  # the scratch folder this run made
    if child.returncode != 0:
        raise SystemExit(f"size {n} failed with exit code {child.returncode}:\n{output}")
    result = json.loads(next(line for line in output.splitlines() if line.startswith("RESULT "))[7:])
    result["peak_rss_child_mib"] = round(usage.ru_maxrss / 1024, 1)  # ru_maxrss is in KiB on Linux
    result["wall_seconds_child"] = round(time.perf_counter() - started, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--scratch", default=None, help="where the temporary stores go (default: the temp dir)")
    parser.add_argument("--synthetic", action="store_true", help="random activations instead of the forward pass (the store alone)")
    parser.add_argument("--json", default=None, help="merge the results into this file")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker, args.batch_size, args.threads, args.store, args.synthetic)
        return
    info = common.print_machine()
    results = []
    for n in args.sizes:
        print(f"{n} prompts: fresh subprocess ...", flush=True)
        results.append(run_size(n, args))
        print(json.dumps(results[-1]), flush=True)
    if args.json:
        path = Path(args.json)
        saved = json.loads(path.read_text()) if path.exists() else {}
        mode = "synthetic" if args.synthetic else "model"
        runs = saved.setdefault(mode, {"runs": {}})["runs"]
        command = f"python bench/{Path(__file__).name} {' '.join(sys.argv[1:])}"
        for result in results:
            runs[str(result["prompts"])] = {**result, "machine": info, "command": command}
        for size in ("20000", "100000"):
            if "2000" in runs and size in runs:
                ratio = runs[size]["peak_rss_child_mib"] / runs["2000"]["peak_rss_child_mib"]
                saved[mode][f"peak_ratio_{size}_over_2000"] = round(ratio, 3)
        path.write_text(json.dumps(saved, indent=2) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
