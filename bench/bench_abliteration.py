"""Abliteration against heretic: held-out refusal and KL of three ways to remove refusal.

One command, one model, one set of prompts, one judge and one KL for all three:

(a) **full single-direction ablation** (Arditi et al.): our mean-difference direction of the
    layer our effect rule selects (``refusal_dir.extraction.extract``, as ``refusal-dir
    extract``), ablated at every layer at full strength (``Steer("ablation", ...).at(1.0)``);
(b) **ours**: ``refusal_dir.tune_remove`` (what ``refusal-dir tune --objective remove`` runs) with
    the same trial budget and directions (``tune_remove.ablation_directions``: each layer's output
    direction, ``--direction-site``), its chosen point applied at run time (:func:`run_ours`;
    ``--no-ours`` skips it);
(c) **heretic** (``heretic-llm``, its unchanged ``run()`` driven by ``bench/heretic_driver.py`` in
    its own venv) with the same trial budget, exported as merged weights and loaded back with our
    ``load_model``.

Both searches get the same validation prompts, the same number of random startup trials
(tune_remove's ``min(10, trials // 3)``) and the same choice rule, ``tune_remove.choose``'s: least
validation KL among the trials refusing at most ``--max-refusal`` of the harmful prompts (none:
fewest refusals, then least KL). Each search judges refusal its own way (ours: our substring
judge; heretic: its markers); the table judges every row both ways on the same completions.

Prompts (the shipped sets): the extraction pairs' train part (75%, ``refusal_dir.datasets.
split_pairs``) gives the directions (ours, and heretic's ``good_prompts``/``bad_prompts``), their
held-out part our layer selection; the harmful and benign evaluation sets are split as ``tune``
splits them (``tune.split_half``: even items for validation, odd ones held out). The first
``--validation-prompts`` validation items score the trials (heretic's evaluation prompts; ours
get the same), and every row of the table is measured on the held-out items: refusal rate on the
harmful ones with our substring judge (and, when heretic ran, heretic's own markers on the same
completions), "answered" (neither refused nor degenerate), and KL(unedited || edited) of the
first answer token on the benign ones, all by our code. heretic's chat text is ours: its system
prompt is set to the Qwen template's default (checked, recorded as ``prompt_format_equal``).

Install heretic (ignored folder; torch first, so pip keeps the CPU build)::

    python3 -m venv bench/.peers/heretic
    bench/.peers/heretic/bin/pip install torch==2.13.0
    bench/.peers/heretic/bin/pip install heretic-llm==1.4.0 transformers==5.23.0

Run (a 2-core CPU budget; ``--directions-dir`` reuses a ``refusal-dir extract`` output)::

    python bench/bench_abliteration.py --trials 24 --validation-prompts 24 --new-tokens 32

``--heretic-from EARLIER.json`` puts an earlier run's (c) beside this run's rows instead of running
heretic again (its ``EARLIER-raw/`` gives heretic's markers); refused unless the model, trial budget,
seed and prompts are the same and the unedited model's held-out completions are identical.

Writes ``bench/abliteration.json`` and ``bench/abliteration-raw/`` (heretic's log, its trials and
front, our trials, every held-out completion); the exported heretic model and the extraction stay in the
ignored ``--work-dir``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

PEERS = common.REPO / "bench" / ".peers"
DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct-offline"
QWEN_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
HERETIC_INSTALL = (
    "python3 -m venv bench/.peers/heretic && bench/.peers/heretic/bin/pip install torch==2.13.0 && "
    "bench/.peers/heretic/bin/pip install heretic-llm==1.4.0 transformers==5.23.0"
)


class UsageError(Exception):
    """Bad input: one line, exit 2."""


@dataclass
class Context:
    """What every row is measured with."""

    model: Any
    directions: Any
    selected: dict[str, Any]
    ablation: Any
    """(b)'s directions (``tune_remove.ablation_directions``, as ``tune --objective remove`` takes them)."""
    anchor: int
    train_harmful: list[str]
    train_harmless: list[str]
    validation_harmful: list[str]
    validation_benign: list[str]
    heldout_harmful: list[str]
    heldout_benign: list[str]
    base_logits: Any
    settings: Any
    config: Any
    args: argparse.Namespace


# ----------------------------------------------------------------------------------------------
# Measuring one row (our code for every row)
# ----------------------------------------------------------------------------------------------


def heretic_is_refusal(text: str, markers: list[str]) -> bool:
    """heretic's marker rule, for the same completions: empty, or a marker anywhere (case,
    emphasis, typographic apostrophes and whitespace normalized)."""
    if not text.strip():
        return True
    text = " ".join(text.lower().replace("*", "").replace("\u2019", "'").split())
    return any(marker.lower() in text for marker in markers)


def measure(ctx: Context, model: Any, *, interventions: tuple = (), markers: list[str] | None = None) -> dict[str, Any]:
    """Held-out refusal, answered and KL of ``model`` under ``interventions``, with the
    completions; KL against the unedited model's logits on the same benign prompts."""
    from refusal_dir.evaluation import stats
    from refusal_dir.evaluation.judges import SubstringJudge, degeneration
    from refusal_dir.evaluation.metrics import kl_divergence
    from refusal_dir.generation import generate

    started = time.perf_counter()
    harmful = ctx.heldout_harmful
    completions = generate(model, harmful, interventions=list(interventions), settings=ctx.settings, progress=False)
    refused = SubstringJudge()(harmful, completions)
    answered = [not r and degeneration(t, prompt=p) is None for p, t, r in zip(harmful, completions, refused)]
    kl = kl_divergence(
        model, ctx.heldout_benign, interventions=list(interventions), reference_logits=ctx.base_logits,
        batch_size=ctx.settings.batch_size,
    )
    row: dict[str, Any] = {
        "refusal": _rate(refused),
        "answered": _rate(answered),
        "kl": {"value": kl.value, "ci": list(stats.bootstrap_ci(kl.per_prompt)), "n": kl.n},
        "kl_per_prompt": kl.per_prompt,
        "eval_seconds": time.perf_counter() - started,
        "completions": completions,
    }
    if markers is not None:
        row["refusal_heretic_markers"] = _rate([heretic_is_refusal(t, markers) for t in completions])
    return row


def summary(row: dict[str, Any]) -> dict[str, Any]:
    """A measured row without its completions and per-prompt values (a front point's record)."""
    return {key: row[key] for key in ("refusal", "refusal_heretic_markers", "answered", "kl") if key in row}


def _rate(flags: list[bool]) -> dict[str, Any]:
    from refusal_dir.evaluation import stats

    n, k = len(flags), sum(bool(f) for f in flags)
    return {"value": k / n, "ci": list(stats.wilson_interval(k, n)), "successes": k, "n": n}


# ----------------------------------------------------------------------------------------------
# (a) full single-direction ablation
# ----------------------------------------------------------------------------------------------


def run_full_ablation(ctx: Context, markers: list[str] | None) -> dict[str, Any]:
    from refusal_dir import Steer

    layer = ctx.selected["layer"]
    steer = Steer("ablation", ctx.directions, layer=layer, token=ctx.selected.get("position"))
    row = measure(ctx, ctx.model, interventions=tuple(steer.at(1.0)), markers=markers)
    row["parameters"] = {"layer": layer, "strength": 1.0, "at_layers": "all", "sites": "resid_pre, attn_out, mlp_out"}
    row["trials"] = 0
    return row


# ----------------------------------------------------------------------------------------------
# (b) OURS: refusal_dir.tune_remove  <-- the lead's module; this is the one place that calls it
# ----------------------------------------------------------------------------------------------


def import_tune_remove() -> Any:
    """The lead's module, or :class:`NotImplementedError` until it lands."""
    try:
        from refusal_dir import tune_remove  # type: ignore[attr-defined]
    except ImportError as error:
        raise NotImplementedError("refusal_dir.tune_remove has not landed yet: run with --no-ours") from error
    return tune_remove


def run_ours(ctx: Context, markers: list[str] | None) -> dict[str, Any]:
    """(b) ``refusal_dir.tune_remove.tune_remove`` as ``refusal-dir tune --objective remove``
    calls it (harmless means of the extraction pairs' train part, the selected token's
    directions), on the same validation prompts, trial budget and choice rule as heretic, no
    MMLU or answered-rate limit (heretic has none); its chosen point is measured here at run time
    (``kernel_ablation``), like (a) and (c). tune_remove's own held-out report is kept beside it
    (``own_heldout``: the same prompts, judge and KL, so the same numbers)."""
    tune_remove = import_tune_remove()
    from refusal_dir.abliteration import AblationOptions, harmless_means, kernel_ablation
    from refusal_dir.tune import EvalSplit

    args, config = ctx.args, ctx.config
    options = AblationOptions(token=ctx.selected.get("position"))
    means = harmless_means(
        ctx.model, ctx.train_harmless, site=ctx.ablation.meta.site, token=config.extraction.token,
        batch_size=config.extraction.batch_size,
    )
    events: list[tuple[float, float, str]] = []  # (wall, process CPU) seconds since the start
    started, started_cpu = time.perf_counter(), time.process_time()
    result = tune_remove.tune_remove(
        ctx.model, ctx.ablation,
        validation=EvalSplit(ctx.validation_harmful, ctx.validation_benign, []),
        heldout=EvalSplit(ctx.heldout_harmful, ctx.heldout_benign, []),
        search=tune_remove.SearchSettings(
            args.trials, args.seed, args.candidates_per_batch, tune_remove.SearchSpace(args.search_space),
            tune_remove.RemoveLimits(args.max_refusal, 1.0, 1.0),
            anchor_layer=None if args.no_anchor else ctx.anchor,
        ),
        options=options, harmless_means=means, settings=dataclasses.replace(ctx.settings, share_prefix=args.share_prefix),
        on_event=lambda event: events.append(
            (time.perf_counter() - started, time.process_time() - started_cpu, event)
        ),
    )
    search_seconds, search_cpu = next((t, c) for t, c, event in events if event == "held-out check")
    batches = [t for t, _, event in events if event.startswith("trials ")]
    first_batch = min(args.candidates_per_batch, args.trials)
    edit = kernel_ablation(ctx.ablation, result.chosen.point, options=options, harmless_means=means)
    row = measure(ctx, ctx.model, interventions=(edit,), markers=markers)
    row.update(
        parameters=result.chosen.point.to_dict(),
        trials=len(result.trials),
        # The search's time over its trials, its baseline (the unedited model on validation) included.
        trial_seconds_mean=search_seconds / len(result.trials),
        # After the first batch: the trials alone.
        trial_seconds_after_first_batch=(
            (batches[-1] - batches[0]) / (args.trials - first_batch) if len(batches) > 1 else None
        ),
        search_seconds=search_seconds,
        trial_cpu_seconds_mean=search_cpu / len(result.trials),
        own_validation={"refusal": result.chosen.refusal, "kl": result.chosen.kl},
        own_heldout=result.heldout,
        front=[{"trial": t.number, "refusal": t.refusal, "kl": t.kl} for t in result.front],
        settings=result.settings,
        all_trials=[t.as_row() for t in result.trials],
    )
    if args.heldout_front:
        for entry, trial in zip(row["front"], result.front):
            if trial.number == result.chosen.number:
                entry["heldout"] = summary(row)
            else:
                edit = kernel_ablation(ctx.ablation, trial.point, options=options, harmless_means=means)
                entry["heldout"] = summary(measure(ctx, ctx.model, interventions=(edit,), markers=markers))
    return row


# ----------------------------------------------------------------------------------------------
# (c) heretic
# ----------------------------------------------------------------------------------------------


def _write_prompts(path: Path, prompts: list[str]) -> str:
    for prompt in prompts:
        if "\n" in prompt or not prompt.strip():
            raise UsageError(f"a prompt is empty or spans lines ({prompt[:40]!r}): heretic reads one prompt a line")
    path.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    return str(path)


def run_heretic(args: argparse.Namespace, prompts: dict[str, list[str]], model_dir: Path, work: Path, raw: Path) -> dict[str, Any]:
    """heretic's search in its venv; its result record (the driver's JSON)."""
    spec = {
        "model": str(model_dir),
        "work_dir": str(work / "heretic"),
        "export_dir": str(work / "heretic-model"),
        "result": str(raw / "heretic.json"),
        **{name: _write_prompts(work / f"{name}.txt", items) for name, items in prompts.items()},
        "n_trials": args.trials,
        "n_startup_trials": args.startup_trials,
        "batch_size": args.batch_size,
        "max_response_length": args.new_tokens,
        "seed": args.seed,
        "system_prompt": args.heretic_system_prompt,
        "dtype": "float32",
        "max_refusal": args.max_refusal,
        "threads": args.threads,
        "export_front": args.heldout_front,
        "front_dir": str(work / "heretic-front"),
    }
    (work / "heretic-spec.json").write_text(json.dumps(spec, indent=2))
    log = raw / "heretic.log"
    print(f"heretic: {args.trials} trials, log in {log}", flush=True)
    with log.open("w") as handle:
        code = subprocess.call(
            [str(args.heretic_python), str(Path(__file__).with_name("heretic_driver.py")), str(work / "heretic-spec.json")],
            stdout=handle, stderr=subprocess.STDOUT,
        )
    if code != 0:
        raise RuntimeError(f"heretic exited with {code}: see {log}")
    return json.loads((raw / "heretic.json").read_text())


def evaluate_heretic(ctx: Context, record: dict[str, Any]) -> dict[str, Any]:
    from refusal_dir import load_model

    exported = load_model(record["export_dir"], device="cpu", dtype="float32", with_bridge=False)
    row = measure(ctx, exported, markers=record["refusal_markers"])
    chosen = record["chosen"]
    row.update(
        parameters={"direction_index": chosen["direction_index"], **chosen["parameters"]},
        trials=len(record["trials"]),
        trial_seconds_mean=record["trial_seconds_mean"],
        trial_seconds_median=record["trial_seconds_median"],
        trial_cpu_seconds_mean=record["trial_cpu_seconds_mean"],
        setup_seconds=record["setup_seconds"],
        wall_seconds=record["wall_seconds"],
        own_validation={
            "refusals": chosen["refusals"], "n": chosen["n_bad_prompts"], "base_refusals": chosen["base_refusals"],
            "kl": chosen["kl_divergence"],
        },
        front=[
            {"trial": t["number"], "index": t["index"], "refusals": t["refusals"], "n": t["n_bad_prompts"], "kl": t["kl_divergence"]}
            for t in record["front"]
        ],
    )
    if ctx.args.heldout_front:
        exports = record.get("front_exports", {})
        for entry in row["front"]:
            if entry["trial"] == chosen["number"]:
                entry["heldout"] = summary(row)
                continue
            folder = exports.get(str(entry["trial"]))
            if folder is None or not Path(folder).is_dir():
                raise RuntimeError(f"heretic did not save front trial {entry['trial']} (see heretic.log)")
            model = load_model(folder, device="cpu", dtype="float32", with_bridge=False)
            entry["heldout"] = summary(measure(ctx, model, markers=record["refusal_markers"]))
            del model
    return row


def attainment(fronts: dict[str, list[tuple[float, float]]]) -> list[dict[str, Any]]:
    """At every held-out refusal rate some point reaches, each method's least held-out KL among
    its points refusing at most that rate (``None``: none of its points refuses that little)."""
    levels = sorted({refusal for points in fronts.values() for refusal, _ in points})
    return [
        {"refusal": level, **{
            name: min((kl for refusal, kl in points if refusal <= level + 1e-12), default=None)
            for name, points in fronts.items()
        }}
        for level in levels
    ]


def dominated(points: list[tuple[float, float]], by: list[tuple[float, float]]) -> int:
    """How many of ``points`` some point of ``by`` dominates (no worse in both, better in one)."""
    return sum(
        any(r <= refusal and k <= kl and (r, k) != (refusal, kl) for r, k in by)
        for refusal, kl in points
    )


def front_comparison(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Both searches' validation fronts measured on the held-out prompts, side by side: the
    attainment table (least KL at each refusal rate) and how many points each side dominates."""
    fronts = {
        name: [(e["heldout"]["refusal"]["value"], e["heldout"]["kl"]["value"]) for e in rows[key]["front"]]
        for name, key in (("ours", "(b) ours (tune_remove)"), ("heretic", "(c) heretic"))
    }
    table = attainment(fronts)
    lines = [
        [f"{entry['refusal']:.2f}", *("-" if entry[name] is None else f"{entry[name]:.3f}" for name in fronts)]
        for entry in table
    ]
    return {
        "points": fronts,
        "attainment": table,
        "heretic_points_dominated_by_ours": dominated(fronts["heretic"], fronts["ours"]),
        "our_points_dominated_by_heretic": dominated(fronts["ours"], fronts["heretic"]),
        "table": common.markdown_table(["held-out refusal <=", "least KL, ours", "least KL, heretic"], lines),
    }


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def prompt_counts(ctx: Context) -> dict[str, Any]:
    """How many prompts of each split the rows used (the output's budget records them)."""
    return {
        "validation_prompts": {"harmful": len(ctx.validation_harmful), "benign": len(ctx.validation_benign)},
        "heldout_prompts": {"harmful": len(ctx.heldout_harmful), "benign": len(ctx.heldout_benign)},
        "extraction_pairs": len(ctx.train_harmful),
    }


def prompt_hashes(ctx: Context, system_prompt: str) -> dict[str, str]:
    """A digest of every prompt list a row depends on (and heretic's system prompt)."""
    import hashlib

    lists = {
        "train_harmful": ctx.train_harmful, "train_harmless": ctx.train_harmless,
        "validation_harmful": ctx.validation_harmful, "validation_benign": ctx.validation_benign,
        "heldout_harmful": ctx.heldout_harmful, "heldout_benign": ctx.heldout_benign, "system_prompt": [system_prompt],
    }
    return {name: hashlib.sha256(json.dumps(texts).encode()).hexdigest()[:16] for name, texts in lists.items()}


def load_heretic_from(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """An earlier output's (c) row, its raw folder (``<stem>-raw/``: heretic's record with its
    markers, the held-out completions), refused in one line unless its model and budget are this
    run's; checked before anything is cleared or computed."""
    raw = path.with_name(path.stem + "-raw")
    if path.resolve() == Path(args.output).resolve() or raw.resolve() == Path(args.raw_dir).resolve():
        raise UsageError(f"--heretic-from {path} is this run's --output or --raw-dir: write the new run elsewhere")
    try:
        earlier = json.loads(path.read_text())
        record = json.loads((raw / "heretic.json").read_text())
        completions = json.loads((raw / "completions.json").read_text())
    except (OSError, ValueError) as error:
        raise UsageError(f"--heretic-from {path}: cannot read it and {raw}/ ({error}): give an output of this script") from error
    row = earlier.get("rows", {}).get("(c) heretic")
    if row is None or "(c) heretic" not in completions:
        raise UsageError(f"--heretic-from {path} has no heretic row: give a run that ran heretic")
    if args.heldout_front and not all("heldout" in entry for entry in row.get("front", [])):
        raise UsageError(f"--heretic-from {path} did not measure heretic's front on held-out prompts: drop --heldout-front or run heretic again")
    ours = {
        "trials": args.trials, "heretic_startup_trials": args.startup_trials, "new_tokens": args.new_tokens,
        "seed": args.seed, "max_refusal": args.max_refusal,
    }
    theirs = {name: earlier["budget"].get(name) for name in ours}
    ours["model"], theirs["model"] = args.model, earlier.get("model")
    differ = [name for name in ours if theirs[name] != ours[name]]
    if differ:
        raise UsageError(f"--heretic-from {path} was run with another {', '.join(differ)}: run with the same, or run heretic again")
    return {"row": row, "record": record, "earlier": earlier, "completions": completions, "raw": raw, "path": str(path)}


def check_same_prompts(reused: dict[str, Any], ctx: Context, system_prompt: str) -> list[str]:
    """The earlier run's prompts are this run's; returns what was compared. Counts and the
    held-out harmful prompts always; every list and the system prompt by digest where the
    earlier run recorded digests (outputs from before digests were recorded: counts only)."""
    earlier = reused["earlier"]
    counts = prompt_counts(ctx)
    differ = [name for name, value in counts.items() if earlier["budget"].get(name) != value]
    checked = [f"counts ({', '.join(counts)})", "held-out harmful prompts"]
    if reused["completions"].get("prompts") != ctx.heldout_harmful:
        differ.append("held-out harmful prompts")
    recorded = earlier.get("prompt_hashes")
    if recorded is not None:
        ours = prompt_hashes(ctx, system_prompt)
        differ += [name for name in ours if recorded.get(name) != ours[name]]
        checked.append("digests of every prompt list and the system prompt")
    if differ:
        raise UsageError(f"--heretic-from {reused['path']} measured other prompts ({', '.join(differ)} differ): run heretic again")
    return checked


def check_same_completions(reused: dict[str, Any], unedited: list[str]) -> None:
    """The unedited model's held-out completions are the earlier run's (greedy, same code)."""
    if reused["completions"].get("unedited") != unedited:
        raise UsageError(f"--heretic-from {reused['path']} measured other prompts (unedited completions differ): run heretic again")


def prepare_work_dir(path: Path) -> Path:
    """A fresh work directory: new, empty, or one this script marked (then cleared)."""
    from refusal_dir import outdir

    outdir.check_output_dir(path, fresh=True, flag="--work-dir")
    path.mkdir(parents=True, exist_ok=True)
    outdir.write_marker(path, "results")
    outdir.clear_contents(path)
    return path


def build_context(args: argparse.Namespace, work: Path) -> Context:
    from refusal_dir import load_model, tune
    from refusal_dir.config import load_config
    from refusal_dir.datasets import load_datasets, split_pairs
    from refusal_dir.extraction import extract, extraction_directory, load_extraction
    from refusal_dir.generation import GenerationSettings, next_token_logits
    from refusal_dir.tune_remove import ablation_directions

    config = load_config(None).with_overrides({
        "model.name": args.model, "model.device": "cpu", "model.dtype": "float32",
        "extraction.selection_prompts": args.selection_prompts, "evaluation.honesty": False,
        "evaluation.cross_entropy": False,
    })
    datasets = load_datasets(config)
    model = load_model(args.model, device="cpu", dtype="float32")
    if args.directions_dir is None:
        print("extracting directions and selecting the layer (effect rule)", flush=True)
        (work / "extract").mkdir()
        extract(model, config, datasets, work / "extract", progress=False)
        args.directions_dir = work / "extract"
    directory = extraction_directory(Path(args.directions_dir))
    if not (directory / "selected.json").is_file():
        raise UsageError(f"--directions-dir {args.directions_dir} names no selected layer: give a `refusal-dir extract` output")
    extraction = load_extraction(directory, model=model)
    directions = extraction.steering_set
    selected = {"set": extraction.selected_key, "layer": extraction.selected.layer, "position": extraction.selected.position}
    ablation, anchor = ablation_directions(extraction, args.direction_site)
    train, _ = split_pairs(datasets.refusal_pairs, config)
    val_harmful, held_harmful = tune.split_half(datasets.harmful_eval)
    val_benign, held_benign = tune.split_half(datasets.benign_eval)
    n_val, n_held = args.validation_prompts, args.heldout_prompts
    held_harmful, held_benign = held_harmful[:n_held], held_benign[:n_held]
    settings = GenerationSettings(max_new_tokens=args.new_tokens, batch_size=args.batch_size)
    base_logits = next_token_logits(model, held_benign, batch_size=args.batch_size)
    return Context(
        model, directions, selected, ablation, anchor, train.positives, train.negatives, val_harmful[:n_val], val_benign[:n_val],
        held_harmful, held_benign, base_logits, settings, config, args,
    )


def heretic_format_equal(model: Any, prompt: str, system_prompt: str) -> bool:
    """Whether heretic's chat text (system + user, generation prompt) is ours."""
    theirs = model.tokenizer.apply_chat_template(
        [{"role": "system", "content": system_prompt}, {"role": "user", "content": prompt}],
        add_generation_prompt=True, tokenize=False,
    )
    return str(model.format_prompts([prompt])[0]) == theirs


def table(rows: dict[str, dict[str, Any]]) -> str:
    def cell(rate: dict[str, Any]) -> str:
        return f"{rate['value']:.2f} [{rate['ci'][0]:.2f}, {rate['ci'][1]:.2f}]"

    lines = []
    for name, row in rows.items():
        heretic = cell(row["refusal_heretic_markers"]) if "refusal_heretic_markers" in row else "-"
        seconds, cpu = row.get("trial_seconds_mean"), row.get("trial_cpu_seconds_mean")
        lines.append([
            name, cell(row["refusal"]), heretic, cell(row["answered"]),
            f"{row['kl']['value']:.3f} [{row['kl']['ci'][0]:.3f}, {row['kl']['ci'][1]:.3f}]",
            str(row.get("trials", "-")), "-" if seconds is None else f"{seconds:.1f}",
            "-" if cpu is None else f"{cpu:.1f}",
        ])
    headers = ["method", "refusal (ours)", "refusal (heretic markers)", "answered", "KL", "trials", "wall s/trial", "CPU s/trial"]
    return common.markdown_table(headers, lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.ours:
            import_tune_remove()  # before anything slow
        return _main(args)
    except (UsageError, NotImplementedError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    from refusal_dir.errors import RefusalDirError
    from refusal_dir.model import resolve_model_source
    from refusal_dir.outdir import atomic_write_text

    if args.startup_trials is None:
        args.startup_trials = max(1, min(10, args.trials // 3))  # what tune_remove's sampler uses
    if args.heretic and not args.heretic_from and not Path(args.heretic_python).exists():
        raise UsageError(f"heretic is not installed at {args.heretic_python}: {HERETIC_INSTALL}; or pass --no-heretic")
    for name in ("trials", "validation_prompts", "new_tokens", "batch_size", "candidates_per_batch"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    common.set_threads(args.threads)
    reused = load_heretic_from(Path(args.heretic_from), args) if args.heretic_from else None
    try:
        work = prepare_work_dir(Path(args.work_dir))
        raw = Path(args.raw_dir).resolve()  # heretic_driver runs in another folder
        raw.mkdir(parents=True, exist_ok=True)
        info = common.machine()
        ctx = build_context(args, work)
    except RefusalDirError as error:
        raise UsageError(str(error)) from error
    record: dict[str, Any] | None = None
    if reused is not None:
        reused["checked"] = check_same_prompts(reused, ctx, args.heretic_system_prompt)
        record = reused["record"]
    elif args.heretic:
        prompts = {
            "good_prompts": ctx.train_harmless, "bad_prompts": ctx.train_harmful,
            "good_evaluation_prompts": ctx.validation_benign, "bad_evaluation_prompts": ctx.validation_harmful,
        }
        record = run_heretic(args, prompts, Path(resolve_model_source(args.model)), work, raw)
    markers = record["refusal_markers"] if record else None
    rows: dict[str, dict[str, Any]] = {"unedited": measure(ctx, ctx.model, markers=markers)}
    rows["unedited"]["trials"] = 0
    if reused is not None:
        check_same_completions(reused, rows["unedited"]["completions"])
        reused["checked"].append("unedited held-out completions")
    if args.full:
        rows["(a) full ablation"] = run_full_ablation(ctx, markers)
    if args.ours:
        rows["(b) ours (tune_remove)"] = run_ours(ctx, markers)
    if reused is not None:
        # The earlier run's row, completions and heretic files travel with this run's.
        rows["(c) heretic"] = dict(reused["row"], completions=reused["completions"]["(c) heretic"])
        for name in ("heretic.json", "heretic.log"):
            if (reused["raw"] / name).is_file():
                atomic_write_text(raw / name, (reused["raw"] / name).read_text())
    elif record is not None:
        rows["(c) heretic"] = evaluate_heretic(ctx, record)
    completions = {name: row.pop("completions") for name, row in rows.items()}
    for row in rows.values():
        if "all_trials" in row:
            atomic_write_text(raw / "ours-trials.json", json.dumps(row.pop("all_trials"), indent=2))
    atomic_write_text(raw / "completions.json", json.dumps({"prompts": ctx.heldout_harmful, **completions}, indent=2))
    result = {
        "command": "python bench/bench_abliteration.py " + " ".join(sys.argv[1:]),
        "machine": info,
        "model": args.model,
        "selected": {"layer": ctx.selected["layer"], "token": ctx.selected.get("position"), "rule": "effect"},
        "budget": {
            "trials": args.trials, "heretic_startup_trials": args.startup_trials, **prompt_counts(ctx),
            "new_tokens": args.new_tokens, "batch_size": args.batch_size,
            "seed": args.seed, "max_refusal": args.max_refusal, "candidates_per_batch": args.candidates_per_batch,
            "search_space": args.search_space, "anchor": not args.no_anchor, "direction_site": ctx.ablation.meta.site,
            "share_prefix": args.share_prefix, "threads": args.threads,
        },
        "prompt_format_equal": heretic_format_equal(ctx.model, ctx.heldout_harmful[0], args.heretic_system_prompt),
        "heretic_version": record["heretic_version"] if record else None,
        "heretic_from": None if reused is None else {"path": reused["path"], "checked": reused["checked"]},
        "prompt_hashes": prompt_hashes(ctx, args.heretic_system_prompt),
        "rows": rows,
        "table": table(rows),
    }
    if args.heldout_front and args.ours and record is not None:
        result["heldout_fronts"] = front_comparison(rows)
    atomic_write_text(Path(args.output), json.dumps(result, indent=2) + "\n")
    print(result["table"])
    if "heldout_fronts" in result:
        print(result["heldout_fronts"]["table"])
    print(f"wrote {args.output} and {raw}/")
    if record is not None and reused is None:
        import shutil

        # Inside our marked work dir. The front's other trials (a full model each) are measured
        # by now and always go; --keep-heretic-model keeps the chosen one.
        shutil.rmtree(work / "heretic-front", ignore_errors=True)
        if not args.keep_heretic_model:
            shutil.rmtree(record["export_dir"], ignore_errors=True)
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--trials", type=int, default=24, help="trial budget of (b) and (c)")
    parser.add_argument("--startup-trials", type=int, default=None, help="heretic's random trials (default: tune_remove's, min(10, trials // 3))")
    parser.add_argument("--validation-prompts", type=int, default=24, help="harmful and benign prompts scoring each trial")
    parser.add_argument("--heldout-prompts", type=int, default=None, help="cap on the held-out prompts (default: all)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--selection-prompts", type=int, default=8, help="held-out pairs per candidate layer (effect rule)")
    parser.add_argument("--directions-dir", type=Path, default=None, help="a `refusal-dir extract` output to reuse")
    parser.add_argument(
        "--max-refusal", type=float, default=0.1,
        help="choice rule of (b) and (c): least validation KL with refusal rate <= this (tune_remove's)",
    )
    parser.add_argument("--candidates-per-batch", type=int, default=8, help="(b): trials scored per batched pass")
    parser.add_argument("--search-space", default="heretic", choices=("heretic", "wide"), help="(b)'s ranges")
    parser.add_argument(
        "--direction-site", default="auto", choices=("auto", "resid_post", "resid_pre"),
        help="(b)'s directions, as `tune --objective remove --direction-site` (auto: resid_post when extracted)",
    )
    parser.add_argument(
        "--share-prefix", action=argparse.BooleanOptionalAction, default=True,
        help="(b)'s search prefills the prompts' common first tokens once per candidate (`tune --share-prefix`, its default); "
        "the table's rows are measured on whole prompts either way",
    )
    parser.add_argument("--no-anchor", action="store_true", help="(b) starts from random points only, as heretic does (default: its first trial ablates the selected layer's direction at weight 1 on every write)")
    parser.add_argument(
        "--threads", type=int, default=0,
        help="torch threads of both processes (0: torch's default; 1 for CPU times that load does not inflate)",
    )
    parser.add_argument("--heretic-system-prompt", default=QWEN_SYSTEM_PROMPT)
    parser.add_argument("--heretic-python", type=Path, default=PEERS / "heretic" / "bin" / "python")
    parser.add_argument("--no-full", dest="full", action="store_false")
    parser.add_argument("--no-ours", dest="ours", action="store_false")
    parser.add_argument("--no-heretic", dest="heretic", action="store_false")
    parser.add_argument(
        "--heretic-from", default=None,
        help="reuse (c) from an earlier output of this script (its <stem>-raw/ beside it) run with the same model, "
        "budget and seed, instead of running heretic again; refused unless the unedited completions are identical",
    )
    parser.add_argument(
        "--keep-heretic-model", action="store_true",
        help="keep heretic's chosen trial's exported model in the work dir (the front's other trials are always removed)",
    )
    parser.add_argument(
        "--heldout-front", action="store_true",
        help="also measure every validation-front point of (b) and (c) on the held-out prompts (heretic saves each) and compare the fronts",
    )
    parser.add_argument("--output", default=str(common.REPO / "bench" / "abliteration.json"))
    parser.add_argument("--raw-dir", default=str(common.REPO / "bench" / "abliteration-raw"))
    parser.add_argument("--work-dir", default=str(PEERS / "abliteration-work"))
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
