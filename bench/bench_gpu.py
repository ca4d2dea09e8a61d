"""The GPU benchmark: extraction, steered generation and the batched sweep, in one short run.

One command, a few minutes in all on one GPU (bf16)::

    python bench/bench_gpu.py --model qwen2.5-coder-0.5b-instruct-offline --out bench/results/gpu.json

Parts (each one warmed up before it is timed, ``torch.cuda.synchronize()`` around every timed
call, the methods of a part run in turn A B C, A B C, ...; rates from wall-clock medians):

* ``extraction``: prompts/s of ``collect_activations`` (every layer, ``resid_pre`` and
  ``resid_post``, last token) against a plain ``transformers`` forward pass with
  ``output_hidden_states=True, logits_to_keep=1`` (as ``transformers`` ships it, see
  ``common.plain_transformers``) on the same prompts and batch size, both storing the last-token
  residuals on the CPU;
* ``generation``: generated tokens/s of ``generate`` unsteered, with an addition
  (``Steer("addition", directions, layer=L).at(1.0)``) and with a directional ablation, and of
  plain ``model.hf.generate``, all greedy, one batch of ``--gen-prompts`` rows, every row forced
  to ``--new-tokens`` tokens (``generation_config.min_new_tokens``) so that every method computes
  the same token positions;
* ``sweep``: a 9-coefficient addition sweep over ``--sweep-prompts`` prompts, batched (one
  ``generate`` call with one coefficient per row, as ``refusal_dir.sweep`` does) against
  sequential (9 calls, one coefficient each), the same forced length;
* ``search``: trials/s of the ablation search of ``tune --objective remove`` (issue #17):
  ``--search-candidates`` random kernels of the heretic space scored in one batched pass, one
  kernel per row, against one kernel per pass as heretic scores its trials (refusal on
  ``--search-prompts`` harmful prompts by generation + judge, first-token KL on as many benign
  ones; projected, norm-preserving), the same forced length;
* peak GPU memory (``torch.cuda.max_memory_allocated``) of each part, reset between parts.

The directions are the mean differences of ``--direction-pairs`` shipped refusal pairs
(``refusal_dir.prompts.refusal_pairs()``), computed before any part and not timed.

``--budget-s`` caps the whole run (model loading included): each part gets an equal share of
what is left, runs as many timed rounds as fit (at most ``--repeats``, at least one when the
budget allows) and is skipped with a note when the budget has run out.

``--random-weights``: build the model from the config and tokenizer of ``--model`` (a local
directory or hub id; no weight files needed) with random weights, written to a scratch
directory and loaded with ``load_model``. Every timed call has a fixed length, so throughput and
memory are those of the real model; the texts are not. For a GPU machine that cannot download
or receive the weights (see BENCHMARKS.md, "GPU benchmark").

The same script runs on the CPU (``--device cpu --dtype float32``, a tiny model) as a smoke
test (``tests/unit/test_bench_gpu.py``); there peak GPU memory is ``null``.

GPU check of models split across devices and of quantized loads (docs/scaling.md), not part of
this script: on the GPU machine, with bitsandbytes installed (``pip install
'refusal-dir[quantization]'``, or the dev extra), run ::

    python -m pytest -q tests/unit/test_placement.py

There the tiny model is split between the GPU, CPU offload and disk offload, and must give the
plain GPU load's activations, directions, steered logits, generation, layer selection and
exported weights; the 8-bit and 4-bit tests load, steer and export (full-precision weights) on
the GPU. None of it has run on a GPU yet.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (sets REFUSAL_DIR_CACHE and sys.path first)
import torch  # noqa: E402

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct-offline"
PARTS = ("extraction", "generation", "sweep", "search")
SITES = ("resid_pre", "resid_post")
ALPHAS = (-2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0)
GOALS = {
    "steered_vs_unsteered": 0.95,
    "sweep_batched_vs_sequential": 5.0,
    # Issue #17: "several times heretic's trials per second" (heretic scores one trial per pass).
    "search_batched_vs_sequential": 3.0,
}


# ----------------------------------------------------------------------------------------------
# Device, budget, timing
# ----------------------------------------------------------------------------------------------


def is_cuda(device: str) -> bool:
    return str(device).startswith("cuda")


def synchronize(device: str) -> None:
    if is_cuda(device):
        torch.cuda.synchronize()


def synced(fn: Callable[[], Any], device: str) -> Callable[[], Any]:
    """``fn`` with the device drained before and after, so a wall clock around it is honest."""

    def run() -> Any:
        synchronize(device)
        result = fn()
        synchronize(device)
        return result

    return run


class Budget:
    """Seconds left of the whole run's cap."""

    def __init__(self, total_s: float) -> None:
        self.total_s = total_s
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.total_s - self.elapsed()


@contextmanager
def peak_memory(device: str, record: dict[str, Any]) -> Iterator[None]:
    """Reset the peak before, record ``peak_gpu_mib`` (None on the CPU) after."""
    if is_cuda(device):
        synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        yield
    finally:
        if is_cuda(device):
            synchronize(device)
            record["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        else:
            record["peak_gpu_mib"] = None


def timed_part(
    methods: dict[str, Callable[[], Any]],
    *,
    device: str,
    budget: Budget,
    share_s: float,
    max_repeats: int,
    work: dict[str, float],
    unit: str,
    baseline: str,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Warm up every method once, then as many interleaved timed rounds as ``share_s`` allows.

    Returns the result (rows of median, min, max seconds, rate, ratio to ``baseline``; or a
    ``skipped`` note when not one round fits in what is left of the budget after the warm-up)
    and each method's warm-up output, for the part's checks.
    """
    calls = {name: synced(fn, device) for name, fn in methods.items()}
    warm_start = time.perf_counter()
    warmup, outputs = {}, {}
    for name, fn in calls.items():
        wall, _, outputs[name] = common.time_once(fn)
        warmup[name] = round(wall, 4)
        print(f"  warm-up: {name}: {wall:.3f} s", flush=True)
    warm_s = time.perf_counter() - warm_start
    # The warm-up round holds first-call costs (kernels, autotuning); a timed round costs at
    # most as much.
    round_s = max(sum(warmup.values()), 1e-6)
    repeats = min(max_repeats, math.floor((share_s - warm_s) / round_s))
    if repeats < 1:
        repeats = 1 if budget.left() >= round_s else 0
    if repeats == 0:
        skipped = {
            "skipped": f"budget ran out after the warm-up ({budget.left():.0f} s left, a round "
            f"takes about {round_s:.1f} s)",
            "warmup_s": warmup,
        }
        return skipped, outputs
    timings = common.interleaved(calls, repeats=repeats, warmup=0)
    base_rate = work[baseline] / common.median(timings.wall[baseline])
    rows = {}
    for name, walls in timings.wall.items():
        rate = work[name] / common.median(walls)
        rows[name] = {
            "seconds_median": round(common.median(walls), 4),
            "seconds_min": round(min(walls), 4),
            "seconds_max": round(max(walls), 4),
            f"{unit}": work[name],
            f"{unit}_per_s": round(rate, 2),
            "vs_baseline": round(rate / base_rate, 3),
        }
    result = {
        "repeats": repeats,
        "warmup_s": warmup,
        "baseline": baseline,
        "unit": unit,
        "rows": rows,
    }
    return result, outputs


def ratio(part: dict[str, Any], numerator: str, denominator: str) -> float | None:
    """Throughput of ``numerator`` over ``denominator`` (None when the part was skipped)."""
    rows = part.get("rows")
    if not rows:
        return None
    unit = part["unit"]
    return round(rows[numerator][f"{unit}_per_s"] / rows[denominator][f"{unit}_per_s"], 3)


# ----------------------------------------------------------------------------------------------
# Model and directions
# ----------------------------------------------------------------------------------------------


def random_weights_dir(source: str, dtype: torch.dtype, target: Path) -> Path:
    """Write a model with the config and tokenizer of ``source`` and random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    template = Path(source) / "chat_template.jinja"
    if template.exists() and not (target / template.name).exists():
        shutil.copy(template, target / template.name)
    return target


def directions_for(model: Any, n_pairs: int, batch_size: int) -> tuple[Any, torch.Tensor]:
    """Mean-difference directions of the first ``n_pairs`` shipped refusal pairs, and the
    harmless side's mean at every layer (what projected ablation needs)."""
    from refusal_dir import collect_activations, compute_directions
    from refusal_dir.prompts import refusal_pairs

    pairs = refusal_pairs().pairs[:n_pairs]
    kwargs = dict(sites=("resid_pre",), token="last", batch_size=batch_size, progress=False)
    positive = collect_activations(model, [p.positive for p in pairs], **kwargs)
    negative = collect_activations(model, [p.negative for p in pairs], **kwargs)
    return compute_directions(positive, negative, model=model), negative.mean("resid_pre").float()


# ----------------------------------------------------------------------------------------------
# Parts
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def plain_last_token_residuals(
    model: Any, prompts: Sequence[str], batch_size: int
) -> dict[str, torch.Tensor]:
    """Plain ``transformers`` forward, ``output_hidden_states=True, logits_to_keep=1``.

    Stores the same tensors as ``collect_activations`` (last token, every layer, on the CPU):
    ``hidden_states[l]`` is ``resid_pre[l]``, ``hidden_states[l + 1]`` is ``resid_post[l]``
    (except the last layer's, to which ``transformers`` applies the final norm).
    """
    texts = model.format_prompts(prompts)
    n_layers, d_model = model.n_layers, model.d_model
    out = {site: torch.zeros(len(texts), 1, n_layers, d_model) for site in SITES}
    for start in range(0, len(texts), batch_size):
        batch = model.tokenize(texts[start : start + batch_size]).to(model.device)
        result = model.hf(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            output_hidden_states=True,
            use_cache=False,
            logits_to_keep=1,
        )
        hidden = torch.stack([h[:, -1, :] for h in result.hidden_states], dim=1).float().cpu()
        rows = slice(start, start + hidden.shape[0])
        out["resid_pre"][rows, 0] = hidden[:, :n_layers]
        out["resid_post"][rows, 0] = hidden[:, 1 : n_layers + 1]
    return out


def part_extraction(
    model: Any, args: argparse.Namespace, budget: Budget, share_s: float
) -> dict[str, Any]:
    from refusal_dir import collect_activations

    prompts = common.instructions(args.extract_prompts)
    ours_name = "ours: collect_activations (every layer, resid_pre + resid_post, last token)"
    plain_name = "transformers forward, output_hidden_states, logits_to_keep=1"

    def ours() -> Any:
        return collect_activations(
            model, prompts, sites=SITES, token="last", batch_size=args.extract_batch, progress=False
        )

    def plain() -> Any:
        return plain_last_token_residuals(model, prompts, args.extract_batch)

    result, outputs = timed_part(
        {ours_name: ours, plain_name: common.plain(model, plain)},
        device=args.device,
        budget=budget,
        share_s=share_s,
        max_repeats=args.repeats,
        work={ours_name: len(prompts), plain_name: len(prompts)},
        unit="prompts",
        baseline=plain_name,
    )
    reference = outputs[plain_name]["resid_pre"]
    difference = float(
        (outputs[ours_name].acts["resid_pre"] - reference).abs().max() / reference.abs().max()
    )
    print(
        f"  check: resid_pre, ours vs plain forward, max relative difference {difference:.2e}",
        flush=True,
    )
    result["setting"] = (
        f"{len(prompts)} prompts, batch {args.extract_batch}, {model.n_layers} layers x 2 sites, last token"
    )
    result["resid_pre_max_relative_difference"] = difference
    result["ours_vs_plain"] = ratio(result, ours_name, plain_name)
    return result


def plain_generate(model: Any, prompts: Sequence[str], n_new: int) -> list[str]:
    return common.plain_generate(model, prompts, n_new)[1]


def part_generation(
    model: Any, directions: Any, args: argparse.Namespace, budget: Budget, share_s: float
) -> dict[str, Any]:
    from refusal_dir import GenerationSettings, Steer, generate

    prompts = common.instructions(args.gen_prompts)
    settings = GenerationSettings(max_new_tokens=args.new_tokens, batch_size=len(prompts))
    added = Steer("addition", directions, layer=args.layer).at(1.0)
    ablated = Steer("ablation", directions, layer=args.layer).at(1.0)
    names = {
        "plain": "transformers model.hf.generate, unsteered (as shipped)",
        "unsteered": "ours: generate, unsteered",
        "addition": f"ours: generate + Steer('addition', layer={args.layer}).at(1.0)",
        "ablation": f"ours: generate + Steer('ablation', layer={args.layer}).at(1.0) (every layer)",
    }
    methods = {
        names["plain"]: common.plain(
            model, lambda: plain_generate(model, prompts, args.new_tokens)
        ),
        names["unsteered"]: lambda: generate(model, prompts, settings=settings, progress=False),
        names["addition"]: lambda: generate(
            model, prompts, interventions=added, settings=settings, progress=False
        ),
        names["ablation"]: lambda: generate(
            model, prompts, interventions=ablated, settings=settings, progress=False
        ),
    }
    tokens = len(prompts) * args.new_tokens
    with common.forced_length(model, args.new_tokens):
        result, _ = timed_part(
            methods,
            device=args.device,
            budget=budget,
            share_s=share_s,
            max_repeats=args.repeats,
            work={name: tokens for name in methods},
            unit="tokens",
            baseline=names["unsteered"],
        )
    result["setting"] = (
        f"{len(prompts)} rows in one batch x {args.new_tokens} new tokens (forced), greedy"
    )
    result["steered_vs_unsteered"] = ratio(result, names["addition"], names["unsteered"])
    result["ablation_vs_unsteered"] = ratio(result, names["ablation"], names["unsteered"])
    result["unsteered_vs_plain"] = ratio(result, names["unsteered"], names["plain"])
    return result


def part_sweep(
    model: Any, directions: Any, args: argparse.Namespace, budget: Budget, share_s: float
) -> dict[str, Any]:
    from refusal_dir import GenerationSettings, Steer, generate
    from refusal_dir.steer import tile

    prompts = common.instructions(args.sweep_prompts)
    spec = Steer("addition", directions, layer=args.layer)
    rows, per_row = tile(prompts, ALPHAS)
    batched_settings = GenerationSettings(max_new_tokens=args.new_tokens, batch_size=len(rows))
    single_settings = GenerationSettings(max_new_tokens=args.new_tokens, batch_size=len(prompts))
    batched_name = f"batched: 1 generate call of {len(rows)} rows, one coefficient per row"
    sequential_name = f"sequential: {len(ALPHAS)} generate calls of {len(prompts)} rows"

    def batched() -> list[str]:
        return generate(
            model, rows, interventions=spec.at(per_row), settings=batched_settings, progress=False
        )

    def sequential() -> list[str]:
        texts: list[str] = []
        for alpha in ALPHAS:
            texts += generate(
                model,
                prompts,
                interventions=spec.at(alpha),
                settings=single_settings,
                progress=False,
            )
        return texts

    work = len(rows) * args.new_tokens
    with common.forced_length(model, args.new_tokens):
        result, outputs = timed_part(
            {batched_name: batched, sequential_name: sequential},
            device=args.device,
            budget=budget,
            share_s=share_s,
            max_repeats=args.repeats,
            work={batched_name: work, sequential_name: work},
            unit="tokens",
            baseline=sequential_name,
        )
    same = sum(a == b for a, b in zip(outputs[batched_name], outputs[sequential_name], strict=True))
    print(f"  check: batched vs sequential texts, {same}/{len(rows)} rows equal", flush=True)
    result["setting"] = (
        f"{len(ALPHAS)} coefficients {list(ALPHAS)} x {len(prompts)} prompts, addition at layer "
        f"{args.layer}, {args.new_tokens} new tokens (forced), greedy"
    )
    result["rows_equal"] = f"{same}/{len(rows)}"
    result["batched_vs_sequential"] = ratio(result, batched_name, sequential_name)
    return result


class _RandomTrial:
    """The two calls :meth:`SearchSpace.suggest` makes of an Optuna trial, answered by seeded
    uniform draws (optuna may be missing on the device machine)."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def _uniform(self) -> float:
        return float(torch.rand((), generator=self.generator))

    def suggest_float(self, name: str, low: float, high: float) -> float:
        return low + (high - low) * self._uniform()

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        return choices[int(self._uniform() * len(choices))]


def search_points(n_layers: int, count: int) -> list[Any]:
    """``count`` seeded random points of the heretic search space (what a search's startup
    trials are)."""
    from refusal_dir.tune_remove import SearchSpace

    space, trial = SearchSpace("heretic"), _RandomTrial(0)
    return [space.suggest(trial, n_layers) for _ in range(count)]  # type: ignore[arg-type]


def part_search(
    model: Any, directions: Any, means: torch.Tensor, args: argparse.Namespace, budget: Budget, share_s: float
) -> dict[str, Any]:
    """Trials/s of the ablation search (issue #17): ``--search-candidates`` kernels scored in
    one batched pass (one kernel per row, as ``tune --objective remove`` does) against one
    kernel per pass (how heretic scores its trials), each trial = refusal on the harmful
    prompts by generation + judge and the first-token KL on the benign ones."""
    from refusal_dir import GenerationSettings
    from refusal_dir.prompts import benign_eval, harmful_eval
    from refusal_dir.tune import EvalSplit
    from refusal_dir.tune_remove import PointEvaluator

    points = search_points(model.n_layers, args.search_candidates)
    split = EvalSplit(harmful_eval()[: args.search_prompts], benign_eval()[: args.search_prompts], [])
    # Projected, norm-preserving ablation (tune --objective remove's default options); the
    # shared prefix is tune's default too, whole prompts what heretic runs.
    def evaluator(rows: int, share_prefix: bool) -> Any:
        return PointEvaluator(
            model, directions, harmless_means=means, measure=(),
            settings=GenerationSettings(max_new_tokens=args.new_tokens, batch_size=rows, share_prefix=share_prefix),
        )

    rows = len(points) * len(split.harmful)
    batched_eval, shared_eval, single_eval = evaluator(rows, False), evaluator(rows, True), evaluator(len(split.harmful), False)
    batched_name = f"batched: {len(points)} kernels per pass ({rows} rows)"
    shared_name = f"batched, shared prefix (tune's default): {len(points)} kernels per pass ({rows} rows)"
    sequential_name = f"sequential: 1 kernel per pass ({len(split.harmful)} rows), {len(points)} passes"

    def batched() -> list[Any]:
        return batched_eval.per_item(points, split)

    def shared() -> list[Any]:
        return shared_eval.per_item(points, split)

    def sequential() -> list[Any]:
        return [single_eval.per_item([point], split)[0] for point in points]

    methods = {batched_name: batched, shared_name: shared, sequential_name: sequential}
    with common.forced_length(model, args.new_tokens):
        result, outputs = timed_part(
            methods, device=args.device, budget=budget, share_s=share_s, max_repeats=args.repeats,
            work=dict.fromkeys(methods, len(points)), unit="trials", baseline=sequential_name,
        )
    result["setting"] = (
        f"{len(points)} random points of the heretic space, {len(split.harmful)} harmful + "
        f"{len(split.benign)} benign prompts each, {args.new_tokens} new tokens (forced), greedy"
    )
    for key, name in (("", batched_name), ("shared_prefix_", shared_name)):
        pairs = list(zip(outputs[name], outputs[sequential_name], strict=True))
        same = sum(a.values["refusal"] == b.values["refusal"] for a, b in pairs)
        print(f"  check: {name.split(':')[0]} vs sequential refusals, {same}/{len(points)} trials equal", flush=True)
        result[f"{key}trials_equal"] = f"{same}/{len(points)}"
        result[f"{key}kl_max_difference"] = max(abs(a.mean("kl") - b.mean("kl")) for a, b in pairs)
    result["batched_vs_sequential"] = ratio(result, batched_name, sequential_name)
    result["shared_prefix_vs_sequential"] = ratio(result, shared_name, sequential_name)
    return result


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=common.REPO,
            capture_output=True,
            text=True,
            timeout=10,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=common.REPO,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("REFUSAL_DIR_COMMIT", "unknown (no git)")
    if out.returncode != 0:
        return os.environ.get("REFUSAL_DIR_COMMIT", "unknown (no git)")
    return out.stdout.strip() + (" (uncommitted changes)" if dirty.stdout.strip() else "")


def machine_info(args: argparse.Namespace) -> dict[str, Any]:
    info: dict[str, Any] = dict(common.machine())
    info["date"] = datetime.date.today().isoformat()
    info["git commit"] = git_commit()
    info["device"] = args.device
    info["dtype"] = args.dtype
    if is_cuda(args.device):
        properties = torch.cuda.get_device_properties(0)
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu memory"] = f"{properties.total_memory / 2**30:.1f} GiB"
        info["cuda"] = str(torch.version.cuda)
    return info


def goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    parts = results["parts"]
    checks = [
        (
            "steered generation (addition) >= 0.95x unsteered",
            "generation",
            "steered_vs_unsteered",
            GOALS["steered_vs_unsteered"],
        ),
        (
            "steered generation (ablation, every layer) >= 0.95x unsteered",
            "generation",
            "ablation_vs_unsteered",
            GOALS["steered_vs_unsteered"],
        ),
        (
            "batched sweep >= 5x sequential",
            "sweep",
            "batched_vs_sequential",
            GOALS["sweep_batched_vs_sequential"],
        ),
        (
            "ablation search as tune runs it (batched, shared prefix) >= 3x one trial per pass on whole prompts (heretic's way)",
            "search",
            "shared_prefix_vs_sequential",
            GOALS["search_batched_vs_sequential"],
        ),
    ]
    out = []
    for goal, part, key, threshold in checks:
        value = parts.get(part, {}).get(key)
        met = None if value is None else value >= threshold
        out.append({"goal": goal, "measured": value, "threshold": threshold, "met": met})
    return out


def markdown(results: dict[str, Any]) -> str:
    rows = []
    for part, result in results["parts"].items():
        if "rows" not in result:
            rows.append([part, result.get("skipped", "skipped"), "", "", "", "", ""])
            continue
        unit = result["unit"]
        peak = result.get("peak_gpu_mib")
        for name, row in result["rows"].items():
            rows.append(
                [
                    part,
                    name,
                    f"{row['seconds_median']:.3f} ({row['seconds_min']:.3f}-{row['seconds_max']:.3f})",
                    f"{row[f'{unit}_per_s']:.1f} {unit}/s",
                    f"{row['vs_baseline']:.2f}x",
                    result["repeats"],
                    "n/a (CPU)" if peak is None else f"{peak:,.0f}",
                ]
            )
    table = common.markdown_table(
        [
            "part",
            "method",
            "wall s, median (min-max)",
            "throughput",
            "vs part's baseline",
            "rounds",
            "peak GPU MiB (part)",
        ],
        rows,
    )
    goal_rows = [
        [
            g["goal"],
            "not run" if g["measured"] is None else f"{g['measured']:.2f}x",
            "not run" if g["met"] is None else ("**met**" if g["met"] else "**not met**"),
        ]
        for g in results["goals"]
    ]
    goal_table = common.markdown_table(["goal", "measured", "met?"], goal_rows)
    settings = "\n".join(
        f"- {part}: {r['setting']}" for part, r in results["parts"].items() if "setting" in r
    )
    return f"{table}\n\n{settings}\n\n{goal_table}"


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomic: a temporary file beside ``path``, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(handle, "w") as stream:
        json.dump(data, stream, indent=2)
        stream.write("\n")
    os.replace(temporary, path)


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help="offline name, local directory or hub id"
    )
    parser.add_argument("--out", type=Path, default=common.REPO / "bench" / "results" / "gpu.json")
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument(
        "--dtype",
        default="bfloat16" if cuda else "float32",
        choices=["bfloat16", "float16", "float32"],
    )
    parser.add_argument(
        "--budget-s", type=float, default=240.0, help="cap on the whole run, loading included"
    )
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument(
        "--repeats", type=int, default=5, help="at most this many timed rounds per part"
    )
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="the model's config and tokenizer with random weights (module docstring)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: 1 on the CPU, torch's default on a GPU)",
    )
    parser.add_argument(
        "--layer", type=int, default=None, help="the steering layer (default: n_layers // 2)"
    )
    parser.add_argument("--direction-pairs", type=int, default=16)
    parser.add_argument("--extract-prompts", type=int, default=256)
    parser.add_argument("--extract-batch", type=int, default=32)
    parser.add_argument("--gen-prompts", type=int, default=32, help="generation: rows, one batch")
    parser.add_argument(
        "--new-tokens", type=int, default=64, help="generation and sweep: tokens per row"
    )
    parser.add_argument(
        "--sweep-prompts", type=int, default=16, help="sweep: prompts per coefficient"
    )
    parser.add_argument(
        "--search-candidates", type=int, default=16, help="search: kernels per batched pass"
    )
    parser.add_argument(
        "--search-prompts", type=int, default=12, help="search: harmful and benign prompts per trial"
    )
    args = parser.parse_args(argv)
    if is_cuda(args.device) and not cuda:
        parser.error("--device cuda but torch sees no GPU: pass --device cpu --dtype float32")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns what it writes to ``--out``.

    Gradients are off and torch's thread count is set only while it runs (the unit test calls
    it inside a pytest session).
    """
    args = parse_args(argv)
    threads = torch.get_num_threads()
    common.set_threads(
        args.threads if args.threads is not None else (0 if is_cuda(args.device) else 1)
    )
    try:
        with torch.no_grad():
            return run(args)
    finally:
        torch.set_num_threads(threads)


def run_part(
    part: str,
    index: int,
    chosen: Sequence[str],
    runners: dict[str, Callable[[float], dict[str, Any]]],
    results: dict[str, Any],
    budget: Budget,
    args: argparse.Namespace,
) -> None:
    """Run one part on an equal share of the budget left, or note why it was skipped."""
    left = budget.left()
    if left <= 0:
        results["parts"][part] = {
            "skipped": f"budget of {args.budget_s:g} s used up before this part"
        }
        print(f"{part}: skipped, budget used up", flush=True)
        return
    share = left / (len(chosen) - index)
    print(f"{part}: {share:.0f} s of the {left:.0f} s left", flush=True)
    record: dict[str, Any] = {}
    with peak_memory(args.device, record):
        result = runners[part](share)
    result.update(record)
    results["parts"][part] = result


def run(args: argparse.Namespace) -> dict[str, Any]:
    from refusal_dir import load_model

    budget = Budget(args.budget_s)
    scratch = None
    source = args.model
    if args.random_weights:
        scratch = Path(tempfile.mkdtemp(prefix="bench_gpu_"))
        source = str(random_weights_dir(args.model, getattr(torch, args.dtype), scratch / "model"))
    try:
        start = time.perf_counter()
        model = load_model(source, device=args.device, dtype=args.dtype, with_bridge=False)
        load_s = time.perf_counter() - start
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    if args.layer is None:
        args.layer = model.n_layers // 2
    synchronize(args.device)
    weights_mib = round(torch.cuda.memory_allocated() / 2**20, 1) if is_cuda(args.device) else None
    print(
        f"loaded {args.model} ({model.n_layers} layers, d_model {model.d_model}) on {args.device} "
        f"{args.dtype} in {load_s:.1f} s; weights on the GPU: {weights_mib} MiB",
        flush=True,
    )
    directions, means = directions_for(model, args.direction_pairs, args.extract_batch)

    results: dict[str, Any] = {
        "machine": machine_info(args),
        "model": {
            "name": args.model,
            "weights": "random (config and tokenizer of the model)"
            if args.random_weights
            else "as published",
            "n_layers": model.n_layers,
            "d_model": model.d_model,
            "parameters": sum(p.numel() for p in model.hf.parameters()),
            "load_s": round(load_s, 1),
            "weights_gpu_mib": weights_mib,
        },
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "parts": {},
    }
    runners = {
        "extraction": lambda share: part_extraction(model, args, budget, share),
        "generation": lambda share: part_generation(model, directions, args, budget, share),
        "sweep": lambda share: part_sweep(model, directions, args, budget, share),
        "search": lambda share: part_search(model, directions, means, args, budget, share),
    }
    chosen = [part for part in PARTS if part in args.parts]
    # common.time_once collects garbage before every timed call (outside the timed region);
    # freezing what exists now keeps that cheap in a large process (a pytest session).
    gc.freeze()
    try:
        for index, part in enumerate(chosen):
            run_part(part, index, chosen, runners, results, budget, args)
    finally:
        gc.unfreeze()
    results["total_s"] = round(budget.elapsed(), 1)
    results["goals"] = goals(results)
    write_json(args.out, results)
    print()
    print(
        common.markdown_table(["machine", "value"], [[k, v] for k, v in results["machine"].items()])
    )
    print()
    print(markdown(results))
    print(
        f"\ntotal {results['total_s']:.0f} s (budget {args.budget_s:.0f} s); JSON: {args.out}",
        flush=True,
    )
    return results


if __name__ == "__main__":
    main()
