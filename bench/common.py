"""Shared helpers for the benchmarks in ``bench/``.

* timing: :func:`interleaved` runs the compared methods in turn (A B C A B C ...) so that a
  background load on a shared machine hits all of them alike; report medians and ratios taken
  within one run, never absolute times compared across runs;
* :func:`machine` describes the machine and library versions;
* :func:`markdown_table` prints a GitHub Markdown table;
* :func:`bench_model` loads the benchmark model (the packaged Gemma 3 270M, on the CPU);
* :func:`instructions` gives the benchmark instructions (the shipped refusal pairs when the
  package has them, else a built-in list).

Run the scripts from the repository root with the project's virtual environment, e.g.
``python bench/bench_extraction.py``.
"""

from __future__ import annotations

import datetime
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH_MODEL = "gemma-3-270m-offline"

# Converted models land in the repository's ignored .cache folder unless the caller chose.
os.environ.setdefault("REFUSAL_DIR_CACHE", str(REPO / ".cache" / "refusal_dir"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


# ----------------------------------------------------------------------------------------------
# Machine
# ----------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001 - a missing package is just "absent"
        return "absent"


def machine() -> dict[str, str]:
    """CPU model, cores, memory, library versions, date and load."""
    import torch

    info = {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu_model(),
        "logical cores": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "transformer-lens": _version("transformer-lens"),
    }
    try:
        import psutil

        info["memory"] = f"{psutil.virtual_memory().total / 2**30:.1f} GiB"
    except ImportError:
        pass
    try:
        info["load average (1/5/15 min)"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        pass
    return info


def print_machine() -> dict[str, str]:
    info = machine()
    print(markdown_table(["machine", "value"], [[k, v] for k, v in info.items()]))
    print()
    return info


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


def set_threads(n: int | None) -> None:
    """Set torch's intra-op threads (``None``: keep torch's default, one per core)."""
    import torch

    if n:
        torch.set_num_threads(n)


def time_once(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """Wall-clock and process CPU seconds of one call (CPU time: all threads of the process)."""
    gc.collect()
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, result


@dataclass
class Timings:
    """Seconds per call, by method: ``wall[name]`` and ``cpu[name]`` (one entry per repetition)."""

    wall: dict[str, list[float]]
    cpu: dict[str, list[float]]

    def get(self, clock: str) -> dict[str, list[float]]:
        return self.cpu if clock == "cpu" else self.wall


def interleaved(
    methods: dict[str, Callable[[], Any]],
    *,
    repeats: int = 3,
    warmup: int = 1,
    verbose: bool = True,
) -> Timings:
    """Time each method, the methods run in turn: A B C, A B C, ...

    ``warmup`` rounds run first and are not recorded. Both wall-clock and process CPU time are
    kept: on a machine shared with other jobs, CPU time of a single-threaded run is the stable
    measure (wall time counts the time other processes hold the cores).
    """
    for round_index in range(warmup):
        for name, fn in methods.items():
            wall, cpu, _ = time_once(fn)
            if verbose:
                print(f"  warmup {round_index + 1}: {name}: wall {wall:.2f} s, cpu {cpu:.2f} s", flush=True)
    timings = Timings({name: [] for name in methods}, {name: [] for name in methods})
    for round_index in range(repeats):
        for name, fn in methods.items():
            wall, cpu, _ = time_once(fn)
            timings.wall[name].append(wall)
            timings.cpu[name].append(cpu)
            if verbose:
                print(
                    f"  rep {round_index + 1}/{repeats}: {name}: wall {wall:.2f} s, cpu {cpu:.2f} s",
                    flush=True,
                )
    return timings


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def spread(values: Sequence[float]) -> str:
    """``min-max`` of the repetitions, for the tables."""
    return f"{min(values):.2f}-{max(values):.2f}"


def paired_rounds(timings: Timings, clock: str, ours: str, other: str) -> str:
    """How often ``ours`` beat ``other`` within the same interleaved round, and by how much.

    Rounds are paired (the methods ran back to back), so this is steadier than comparing the
    two medians when the machine's speed drifts; k of n rounds is a sign test.
    """
    mine, theirs = timings.get(clock)[ours], timings.get(clock)[other]
    ratios = sorted(t / m for m, t in zip(mine, theirs))
    wins = sum(r > 1 for r in ratios)
    return (
        f"{ours} faster than {other} in {wins}/{len(ratios)} rounds; per-round speedup median "
        f"{median(ratios):.3f}x (min {ratios[0]:.3f}x, max {ratios[-1]:.3f}x)"
    )


def add_timing_args(parser: Any) -> None:
    """``--repeats``, ``--threads`` and ``--clock`` for a benchmark's argument parser."""
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (after 1 warm-up)")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads; 1 (default) gives stable CPU times on a shared machine; "
        "0 keeps torch's default (one per core)",
    )
    parser.add_argument(
        "--clock", choices=["cpu", "wall"], default="cpu",
        help="which time the ratios use: process CPU time (default; stable under contention) "
        "or wall-clock time (use on an idle machine)",
    )


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table; numbers are written as given (format them first)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for index, row in enumerate(cells):
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
        if index == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Model and prompts
# ----------------------------------------------------------------------------------------------


@contextmanager
def plain_transformers(model: Any) -> Iterator[None]:
    """``model.hf`` exactly as ``transformers`` ships it, for the baseline and peer rows.

    ``load_model`` makes one change to the plain model: a pre-hook that gives the unembedding a
    contiguous input (``refusal_dir.model._contiguous_unembedding_input``). Inside this block
    that hook is off, so "plain transformers" and the peers are timed as a user would run them,
    without our fix.
    """
    head = model.hf.get_output_embeddings()
    ours = {
        key: hook
        for key, hook in head._forward_pre_hooks.items()
        if getattr(hook, "refusal_dir_contiguous", False)
    }
    if not ours:
        raise RuntimeError("refusal_dir's contiguous-unembedding hook is not on this model")
    for key in ours:
        del head._forward_pre_hooks[key]
    try:
        yield
    finally:
        head._forward_pre_hooks.update(ours)


def plain(model: Any, fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` run inside :func:`plain_transformers`."""

    def run() -> Any:
        with plain_transformers(model):
            return fn()

    return run


def bench_model(*, with_bridge: bool = True) -> Any:
    """The packaged Gemma 3 270M on the CPU (float32)."""
    from refusal_dir.model import load_model

    start = time.perf_counter()
    model = load_model(BENCH_MODEL, device="cpu", with_bridge=with_bridge)
    print(f"loaded {model!r} in {time.perf_counter() - start:.1f} s", flush=True)
    return model


_BUILTIN = [
    "Explain how a bicycle gear system works to a ten-year-old.",
    "Write a short poem about the first snow of winter.",
    "Give me three tips for keeping basil alive on a windowsill.",
    "Summarise the plot of a detective story in two sentences.",
    "How do I convert a recipe that serves four so that it serves six?",
    "Write a polite email asking my landlord to fix a leaking tap.",
    "What is the difference between weather and climate?",
    "List five questions to ask at the end of a job interview.",
    "Describe how to brew a good cup of pour-over coffee.",
    "Write a Python function that reverses the words in a sentence.",
    "Why does the moon look larger near the horizon?",
    "Plan a one-day walking tour of an old harbour town.",
    "Explain compound interest with a simple example.",
    "Suggest a name for a friendly robot in a children's book.",
    "How can I practise a new language for ten minutes a day?",
    "Write a haiku about a cat asleep in the sun.",
    "What should I pack for a two-night camping trip in spring?",
    "Explain what a hash table is and when to use one.",
    "Give me a warm-up routine before a morning run.",
    "Write a limerick about a forgetful wizard.",
    "How do vaccines train the immune system?",
    "Draft a thank-you note to a neighbour who watered my plants.",
    "Explain the rules of chess castling.",
    "What are good habits for keeping a tidy desk?",
    "Write a two-line slogan for a community library.",
    "How do I remove a coffee stain from a cotton shirt?",
    "Describe the water cycle in four steps.",
    "Suggest three board games for a family evening.",
    "Explain why the sky is blue in plain words.",
    "Write a short bedtime story about a brave snail.",
    "How do I make a simple budget for a month?",
    "Give me a checklist for repotting a houseplant.",
]


def instructions(n: int) -> list[str]:
    """``n`` instruction strings (repeating the list when needed).

    The shipped refusal pairs (``refusal_dir.prompts.refusal_pairs()``) when they exist: the
    first ``n/2`` harmful and ``n/2`` harmless instructions, interleaved as (harmful, harmless)
    so that consecutive items form a contrast pair; otherwise a built-in list of harmless
    instructions.
    """
    base: list[str] = []
    try:
        from refusal_dir import prompts as prompt_module

        pairs = prompt_module.refusal_pairs()
        for pair in pairs:
            base += [pair.positive, pair.negative]
    except (ImportError, AttributeError):
        base = []
    if not base:
        base = list(_BUILTIN)
    return [base[i % len(base)] for i in range(n)]


def instruction_source() -> str:
    try:
        from refusal_dir import prompts as prompt_module

        prompt_module.refusal_pairs()
        return "refusal_dir.prompts.refusal_pairs() (harmful, harmless interleaved)"
    except (ImportError, AttributeError):
        return "built-in list in bench/common.py"


def timing_table(
    timings: Timings,
    *,
    clock: str,
    baseline: str,
    work: dict[str, float] | float,
    unit: str,
    higher_is_better: bool = True,
) -> str:
    """A table of medians (CPU and wall), the rate ``work / seconds`` and the ratio to ``baseline``.

    ``work`` is the amount each call does (prompts, tokens), one number or one per method; the
    rate and the ratio use ``clock``.
    """
    chosen = timings.get(clock)
    amounts = work if isinstance(work, dict) else {name: work for name in chosen}
    base_rate = amounts[baseline] / median(chosen[baseline])
    rows = []
    for name in chosen:
        rate = amounts[name] / median(chosen[name])
        rows.append(
            [
                name,
                f"{median(timings.cpu[name]):.2f} ({spread(timings.cpu[name])})",
                f"{median(timings.wall[name]):.2f} ({spread(timings.wall[name])})",
                f"{rate:.1f}",
                f"{rate / base_rate:.2f}x",
            ]
        )
    return markdown_table(
        [
            "method",
            "CPU s, median (min-max)",
            "wall s, median (min-max)",
            f"{unit}/s ({clock})",
            f"throughput vs {baseline.split(')')[0] + ')' if baseline.startswith('(') else baseline}",
        ],
        rows,
    )


@contextmanager
def forced_length(model: Any, n: int) -> Iterator[None]:
    """Every ``model.hf.generate`` call produces exactly ``n`` new tokens (stop tokens held back)."""
    config = model.hf.generation_config
    old = config.min_new_tokens
    config.min_new_tokens = n
    try:
        yield
    finally:
        config.min_new_tokens = old


def plain_generate(model: Any, prompts: Sequence[str], n_new: int) -> tuple[Any, list[str]]:
    """Plain ``transformers`` greedy ``generate`` of exactly ``n_new`` tokens per prompt: the new
    token ids and their decoded texts (decoding is part of what a user pays for)."""
    import torch

    with torch.no_grad():
        batch = model.tokenize(model.format_prompts(prompts)).to(model.device)
        out = model.hf.generate(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            max_new_tokens=n_new,
            min_new_tokens=n_new,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=model.pad_token_id,
            eos_token_id=model.stop_token_ids(),
        )
    new = out[:, batch.input_ids.shape[1] :]
    return new, model.tokenizer.batch_decode(new, skip_special_tokens=True)
