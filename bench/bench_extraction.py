"""Benchmark: last-token residuals at every layer, ours against plain ``transformers``.

Default mode (speed), N prompts (default 32), batch size 16, left padding, same tokens for all:

(a) ``collect_activations(..., backend="fast")`` (PyTorch hooks on ``model.hf``, early stop);
(b) ``collect_activations(..., backend="bridge")`` (TransformerLens hooks, early stop);
(c) plain ``transformers`` forward, ``output_hidden_states=True`` (full logits);
(d) the same with ``logits_to_keep=1``: the floor the issue names;
(d2) (d) with the one change ``load_model`` makes to the plain model, a contiguous input to the
     unembedding (on this CPU the non-contiguous one costs several times more);
(e) the ``transformers`` base model (``model.hf.model``: no unembedding at all).

(c) and (d) run as ``transformers`` ships (our hook off, ``common.plain_transformers``). The
methods run interleaved (a b c d d2 e, a b c d d2 e, ...); the table gives medians and the
throughput ratio against (d).

``--scale``: extraction (backend fast) over 250/500/1000/2000 prompts, each size in a fresh
subprocess, measuring peak RSS against stored-activation bytes (prompts x 2 sites x layers x
d_model x 4) plus the model's parameter bytes. ``--boot-bridge`` also boots the TransformerLens
bridge (which ``load_model`` defers to first use); ``--repeat-text K`` makes every prompt K times
longer (peak memory must not follow the sequence length).

    python bench/bench_extraction.py [--n 32] [--repeats 3]
    python bench/bench_extraction.py --scale [--sizes 250 500 1000 2000] [--boot-bridge] [--repeat-text 8]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (sets REFUSAL_DIR_CACHE and sys.path first)
import torch  # noqa: E402

SITES = ("resid_pre", "resid_post")
BATCH = 16


# ----------------------------------------------------------------------------------------------
# The four methods
# ----------------------------------------------------------------------------------------------


def ours(model, prompts, backend):
    from refusal_dir.activations import collect_activations

    return collect_activations(
        model, prompts, sites=SITES, token="last", batch_size=BATCH, backend=backend,
        progress=False,
    )


@torch.no_grad()
def plain_forward(model, prompts, *, keep_one: bool):
    """Plain transformers forward with output_hidden_states, storing the same tensors.

    hidden_states[l] is resid_pre[l]; hidden_states[l + 1] is resid_post[l] except for the last
    layer, where transformers applies the final norm (the cost is what matters here).
    """
    return _hidden_states(model, prompts, model.hf, **({"logits_to_keep": 1} if keep_one else {}))


@torch.no_grad()
def base_forward(model, prompts):
    """Plain transformers base model (``model.hf.model``: no lm_head), output_hidden_states."""
    return _hidden_states(model, prompts, model.hf.model)


def _hidden_states(model, prompts, module, **kwargs):
    texts = model.format_prompts(prompts)
    n_layers, d_model = model.n_layers, model.d_model
    out = {site: torch.zeros(len(texts), 1, n_layers, d_model) for site in SITES}
    for start in range(0, len(texts), BATCH):
        batch = model.tokenize(texts[start : start + BATCH])
        result = module(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            output_hidden_states=True,
            use_cache=False,
            **kwargs,
        )
        hidden = torch.stack([h[:, -1, :] for h in result.hidden_states], dim=1).float()
        rows = slice(start, start + len(batch))
        out["resid_pre"][rows, 0] = hidden[:, :n_layers]
        out["resid_post"][rows, 0] = hidden[:, 1 : n_layers + 1]
    return out


def check_equal(model, prompts) -> str:
    """Our fast/bridge activations against the plain forward's hidden states."""
    fast = ours(model, prompts, "fast")
    bridge = ours(model, prompts, "bridge")
    plain = plain_forward(model, prompts, keep_one=True)
    n = model.n_layers

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max())

    lines = [
        f"fast vs plain resid_pre (all layers): max rel diff {rel(fast.acts['resid_pre'], plain['resid_pre']):.2e}",
        f"fast vs plain resid_post (layers 0..{n - 2}): max rel diff "
        f"{rel(fast.acts['resid_post'][:, :, : n - 1], plain['resid_post'][:, :, : n - 1]):.2e}",
        f"fast vs bridge (both sites, all layers): max rel diff "
        f"{max(rel(fast.acts[s], bridge.acts[s]) for s in SITES):.2e}",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Speed
# ----------------------------------------------------------------------------------------------


FLOOR = "(d) transformers, output_hidden_states + logits_to_keep=1"


def run_speed(args) -> None:
    common.set_threads(args.threads)
    common.print_machine()
    model = common.bench_model()
    prompts = common.instructions(args.n)
    lengths = [len(ids) for ids in (model._encode(t) for t in model.format_prompts(prompts))]
    print(
        f"{args.n} prompts from {common.instruction_source()}; tokens per prompt "
        f"{min(lengths)}-{max(lengths)} (mean {sum(lengths) / len(lengths):.1f}); batch {BATCH}, "
        f"left padding; sites {SITES} x {model.n_layers} layers, position last\n"
    )
    print(check_equal(model, prompts[:BATCH]), "\n", flush=True)
    methods = {
        "(a) ours, backend=fast": lambda: ours(model, prompts, "fast"),
        "(b) ours, backend=bridge": lambda: ours(model, prompts, "bridge"),
        "(c) transformers, output_hidden_states": common.plain(
            model, lambda: plain_forward(model, prompts, keep_one=False)
        ),
        FLOOR: common.plain(model, lambda: plain_forward(model, prompts, keep_one=True)),
        "(d2) = (d) + contiguous lm_head input (load_model's fix)": lambda: plain_forward(
            model, prompts, keep_one=True
        ),
        "(e) transformers base model (no lm_head), output_hidden_states": lambda: base_forward(
            model, prompts
        ),
    }
    timings = common.interleaved(methods, repeats=args.repeats, warmup=1)
    print()
    print(
        common.timing_table(
            timings, clock=args.clock, baseline=FLOOR, work=args.n, unit="prompts"
        )
    )
    print(
        f"\n{args.repeats} interleaved repetitions after 1 warm-up round; {args.n} prompts; "
        f"torch threads {torch.get_num_threads()}; ratios from {args.clock} time."
    )


# ----------------------------------------------------------------------------------------------
# Memory at scale
# ----------------------------------------------------------------------------------------------


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process (Linux >= 4.0)."""
    try:
        Path(f"/proc/{os.getpid()}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def scale_worker(n: int, backend: str, boot_bridge: bool, repeat_text: int) -> None:
    """One size in a fresh process: prints a JSON line with the measurements."""
    import gc

    from refusal_dir.model import load_model

    rss_start = _rss_mib()
    model = load_model(common.BENCH_MODEL, device="cpu")
    if boot_bridge or backend == "bridge":
        model.bridge  # noqa: B018 - boots it
    seen: set[int] = set()
    model_bytes = 0
    for tensor in [*model.hf.parameters(), *model.hf.buffers()]:
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            model_bytes += tensor.numel() * tensor.element_size()
    prompts = [" ".join([text] * repeat_text) for text in common.instructions(n)]
    tokens = max(len(model._encode(t)) for t in model.format_prompts(prompts[:BATCH]))
    gc.collect()
    peak_after_load = _hwm_mib()
    rss_before = _rss_mib()
    reset = _reset_peak()
    start = time.perf_counter()
    acts = ours(model, prompts, backend)
    seconds = time.perf_counter() - start
    peak_extract = _hwm_mib()
    stored = sum(t.numel() * t.element_size() for t in acts.acts.values())
    print(
        "RESULT "
        + json.dumps(
            {
                "n": n,
                "backend": backend,
                "bridge_booted": model._bridge is not None,
                "repeat_text": repeat_text,
                "max_tokens_first_batch": tokens,
                "seconds": seconds,
                "rss_start_mib": rss_start,
                "peak_after_load_mib": peak_after_load,
                "rss_before_extract_mib": rss_before,
                "peak_during_extract_mib": peak_extract if reset else None,
                "peak_process_mib": max(peak_after_load, peak_extract),
                "model_bytes": model_bytes,
                "stored_bytes": stored,
                "expected_stored_bytes": n * 2 * model.n_layers * model.d_model * 4,
            }
        ),
        flush=True,
    )


def run_scale(args) -> None:
    common.set_threads(args.threads)
    common.print_machine()
    results = []
    for n in args.sizes:
        print(f"size {n}: fresh subprocess ...", flush=True)
        proc = subprocess.run(
            [
                sys.executable, __file__, "--scale-worker", str(n), "--backend", args.backend,
                "--threads", str(args.threads), "--repeat-text", str(args.repeat_text),
                *(["--boot-bridge"] if args.boot_bridge else []),
            ],
            capture_output=True,
            text=True,
        )
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            print(proc.stdout[-2000:], proc.stderr[-4000:])
            raise SystemExit(f"worker for {n} prompts failed (rc {proc.returncode})")
        result = json.loads(line[0][len("RESULT ") :])
        print(f"  {result}", flush=True)
        results.append(result)
    mib = 2**20
    rows = []
    for r in results:
        bound = (r["stored_bytes"] + r["model_bytes"]) / mib
        rows.append(
            [
                r["n"],
                r["max_tokens_first_batch"],
                "yes" if r["bridge_booted"] else "no",
                f"{r['stored_bytes'] / mib:.0f}",
                f"{r['model_bytes'] / mib:.0f}",
                f"{bound:.0f}",
                f"{r['rss_start_mib']:.0f}",
                f"{r['peak_after_load_mib']:.0f}",
                f"{r['peak_process_mib']:.0f}",
                f"{r['peak_process_mib'] / bound:.2f}x",
                f"{(r['peak_process_mib'] - r['rss_start_mib']) / bound:.2f}x",
                f"{r['n'] / r['seconds']:.1f}",
            ]
        )
    print()
    print(
        common.markdown_table(
            [
                "prompts",
                "tokens/prompt (max, 1st batch)",
                "bridge booted",
                "stored acts MiB",
                "model MiB",
                "acts + model MiB",
                "RSS of the bare interpreter (torch, transformers imported) MiB",
                "peak RSS after loading MiB",
                "peak RSS whole process MiB",
                "peak / (acts + model)",
                "(peak - interpreter) / (acts + model)",
                "prompts/s (wall)",
            ],
            rows,
        )
    )
    print(
        "\nPeak RSS is VmHWM of a fresh process per size; backend "
        f"{args.backend}, load_model() (bridge booted: {args.boot_bridge or args.backend == 'bridge'}), "
        f"prompt text x{args.repeat_text}, batch {BATCH}, sites "
        f"resid_pre + resid_post, all layers, last token; torch threads {args.threads or 'default'}."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32, help="prompts (speed mode)")
    common.add_timing_args(parser)
    parser.add_argument("--scale", action="store_true", help="memory at 250..2000 prompts")
    parser.add_argument("--sizes", type=int, nargs="+", default=[250, 500, 1000, 2000])
    parser.add_argument("--backend", default="fast", choices=["fast", "bridge"])
    parser.add_argument("--boot-bridge", action="store_true", help="scale: also boot model.bridge")
    parser.add_argument("--repeat-text", type=int, default=1, help="scale: each prompt's text K times")
    parser.add_argument("--scale-worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    if args.scale_worker:
        common.set_threads(args.threads)
        scale_worker(args.scale_worker, args.backend, args.boot_bridge, args.repeat_text)
    elif args.scale:
        run_scale(args)
    else:
        run_speed(args)


if __name__ == "__main__":
    main()
