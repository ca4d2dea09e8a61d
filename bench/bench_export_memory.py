"""Benchmark: peak memory of exporting an ablation to a model directory, against the model's size.

On the offline instruction model (Qwen2.5-Coder-0.5B-Instruct, float32 safetensors, about 2.5 GB),
each export runs in a child process of its own, which reports its peak resident memory
(``VmHWM`` of ``/proc/self/status``: anonymous and file-backed pages alike; ``getrusage``'s
``ru_maxrss`` would not do, as a child started by ``fork`` and ``exec`` inherits the parent's
peak):

(baseline) the child imports torch, transformers and refusal_dir, and does nothing else;
(i)   streamed export of a tuned point (``refusal_dir.export``, norm-preserving and projected: the
      heaviest edit, at every layer);
(ii)  streamed full single-direction ablation (``Bake.full_ablation``, the embedding too);
(iii) the old path: ``load_model`` and ``save_orthogonalized`` (a deep copy of the model).

Each peak is reported as a ratio to the model's size on disk (the sum of its safetensors files),
with and without the baseline. The outputs of (ii) and (iii) are then compared tensor for tensor
(one tensor in memory at a time): the streamed full ablation must be the old path's output.
The directions and the tuned point are random (memory does not depend on their values); their
weights sample is the model's, so the exports' fingerprint check runs as it does for real.

    python bench/bench_export_memory.py [--model qwen2.5-coder-0.5b-instruct-offline] [--scratch DIR]

Writes bench/export_memory.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (sets REFUSAL_DIR_CACHE and sys.path first)

MODEL = "qwen2.5-coder-0.5b-instruct-offline"
KINDS = ("baseline", "streamed-tuned", "streamed-full", "deep-copy")
LAYER = 12


def child(kind: str, model: str, scratch: Path) -> dict[str, float]:
    """One export in this process; its peak RSS and wall time."""
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from refusal_dir.directions import DirectionSet
    from refusal_dir.export import Bake, export
    from refusal_dir.model import load_model
    from refusal_dir.orthogonalize import save_orthogonalized
    from refusal_dir.tuned import read_tuned

    start = time.perf_counter()
    out = scratch / kind
    if kind == "streamed-tuned":
        export(model, Bake.tuned(read_tuned(scratch / "tune")), out, progress=False)
    elif kind == "streamed-full":
        export(model, Bake.full_ablation(DirectionSet.load(scratch / "directions"), LAYER), out, progress=False)
    elif kind == "deep-copy":
        loaded = load_model(model, with_bridge=False, device="cpu", dtype="float32")
        save_orthogonalized(loaded, DirectionSet.load(scratch / "directions"), out, layer=LAYER)
    seconds = time.perf_counter() - start
    return {"peak_rss_bytes": peak_rss(), "seconds": round(seconds, 1)}


def peak_rss() -> int:
    """This process's peak resident memory in bytes (Linux ``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status: this benchmark needs Linux")


def prepare(model: str, scratch: Path) -> Path:
    """Random directions and a tuned point carrying the model's weights sample; the model's
    directory."""
    import torch

    from refusal_dir.abliteration import AblationOptions, AblationPoint, Kernel
    from refusal_dir.directions import DirectionMeta, DirectionSet, weights_sample
    from refusal_dir.model import load_model, resolve_model_source
    from refusal_dir.tuned import TunedAblation, write_tuned

    skeleton = load_model(model, device_map={"": "disk"}, offload_folder=scratch / "offload", with_bridge=False)
    generator = torch.Generator().manual_seed(0)
    n_layers, d_model = skeleton.n_layers, skeleton.d_model
    meta = DirectionMeta(
        model_id=model, model_revision=None, d_model=d_model, n_layers=n_layers, site="resid_pre",
        position="last", positions=("last",), method="mean_diff", prompt_set_hash="0" * 16,
        package_version="bench", weights_sample=weights_sample(skeleton),
    )
    directions = DirectionSet.from_raw(torch.randn(1, n_layers, d_model, generator=generator), meta)
    directions.save(scratch / "directions")
    point = AblationPoint(Kernel(1.0, n_layers / 2, 0.2, n_layers), Kernel(0.8, n_layers / 2, 0.1, n_layers), direction_index=None)
    means = torch.randn(n_layers, d_model, generator=generator)
    write_tuned(scratch / "tune", TunedAblation(model, point, AblationOptions(True, True, None), directions, means))
    shutil.rmtree(scratch / "offload", ignore_errors=True)
    return Path(resolve_model_source(model))


def same_tensors(first: Path, second: Path) -> bool:
    """Whether two model directories hold the same tensors, read one at a time."""
    import torch

    from refusal_dir.shards import read_header

    def tensors(directory: Path) -> dict[str, object]:
        return {t.key: t for f in sorted(directory.glob("*.safetensors")) for t in read_header(f)}

    a, b = tensors(first), tensors(second)
    return a.keys() == b.keys() and all(torch.equal(a[k].read(), b[k].read()) for k in a)  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--scratch", help="where the exports are written (default: a temporary directory)")
    parser.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--output", default=str(common.REPO / "bench" / "export_memory.json"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model, Path(args.scratch))))
        return
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="export-memory-"))
    scratch.mkdir(parents=True, exist_ok=True)
    source = prepare(args.model, scratch)
    model_bytes = sum(f.stat().st_size for f in source.glob("*.safetensors"))
    results: dict[str, dict[str, float]] = {}
    for kind in KINDS:
        command = [sys.executable, __file__, "--child", kind, "--model", args.model, "--scratch", str(scratch)]
        done = subprocess.run(command, check=True, capture_output=True, text=True)
        results[kind] = json.loads(done.stdout.strip().splitlines()[-1])
        print(kind, results[kind], flush=True)
    baseline = results["baseline"]["peak_rss_bytes"]
    for row in results.values():
        row["ratio_to_model"] = round(row["peak_rss_bytes"] / model_bytes, 3)
        row["ratio_above_baseline"] = round((row["peak_rss_bytes"] - baseline) / model_bytes, 3)
    equal = same_tensors(scratch / "streamed-full", scratch / "deep-copy")
    payload = {
        "command": "python bench/bench_export_memory.py" + (f" --model {args.model}" if args.model != MODEL else ""),
        "machine": {**common.machine(), "note": "2-core CPU shared with other agents, no GPU"},
        "model": args.model,
        "model_bytes_on_disk": model_bytes,
        "results": results,
        "streamed_full_ablation_equals_deep_copy_tensor_for_tensor": equal,
    }
    Path(args.output).write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps(payload, indent=2))
    if not args.scratch:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
