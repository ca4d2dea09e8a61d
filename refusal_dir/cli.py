"""The ``refusal-dir`` command line: extract | steer | evaluate | run | tune | export | rejudge.

Bad input gets one line on stderr naming the problem and the fix, and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from refusal_dir.config import Config, load_config
from refusal_dir.errors import ConfigError, DataError, RefusalDirError

logger = logging.getLogger("refusal_dir")


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _err(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------


# Settings are declared once, as config fields (refusal_dir.config.setting); each command names
# the ones it exposes: a section (its fields that declare a flag) or a single section.field.
MODEL = ("model",)
DATA = ("data",)
SWEEP = (
    "steering.alphas", "steering.methods", "steering.layer", "generation", "evaluation.honesty",
    "evaluation.cross_entropy",
)
JUDGE = ("evaluation.judge",)


def declared_settings(keys: Sequence[str], *, root: type = Config) -> list[tuple[str, dataclasses.Field[Any]]]:
    """(``section.field``, field) of each setting ``keys`` names that declares a flag."""
    defaults = root()
    sections = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(root)}
    found: list[tuple[str, dataclasses.Field[Any]]] = []
    for key in keys:
        section_name, _, field_name = key.partition(".")
        items = dataclasses.fields(sections[section_name])
        chosen = [f for f in items if f.metadata.get("flag") and field_name in ("", f.name)]
        if field_name and not chosen:
            raise ValueError(f"config field {key} declares no flag")
        found += [(f"{section_name}.{f.name}", f) for f in chosen]
    return found


def add_setting_flags(
    parser: argparse.ArgumentParser, keys: Sequence[str], *, root: type = Config, **extra: Any
) -> None:
    """Add the flags of the settings ``keys`` names, built from their declaration: help, type,
    nargs, choices; a deprecated old name as a hidden alias. Defaults are None (keep the
    config's value). ``extra`` goes to every flag (``required=True``). :func:`_config` maps the
    parsed values onto the config through the parser's ``setting_flags`` default."""
    flags: dict[str, str] = dict(parser.get_default("setting_flags") or {})
    renamed: dict[str, tuple[str, str, str]] = dict(parser.get_default("renamed_flags") or {})
    for key, item in declared_settings(keys, root=root):
        flag, old_flag = item.metadata["flag"], item.metadata["old_flag"]
        details = dict(item.metadata["cli"])
        if "const" in details:
            details["action"] = "store_const"
        dest = flag.removeprefix("--").replace("-", "_")
        help_text = item.metadata["help"].replace("%", "%%")  # argparse formats help with %
        parser.add_argument(flag, dest=dest, default=None, help=help_text, **details, **extra)
        flags[dest] = key
        if old_flag:
            old_dest = f"{dest}__old_name"
            parser.add_argument(old_flag, dest=old_dest, default=None, help=argparse.SUPPRESS, **details)
            renamed[old_dest] = (old_flag, flag, dest)
    parser.set_defaults(setting_flags=flags, renamed_flags=renamed)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML settings file (default: configs/default.yaml)")
    add_setting_flags(parser, MODEL)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="refusal-dir",
        description="Find refusal and honesty directions, steer or ablate them, and measure the cost.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    extract = commands.add_parser("extract", help="compute and score directions at every layer")
    _common(extract)
    add_setting_flags(extract, DATA)
    extract.add_argument("--output-dir", required=True, help="where the directions are written")
    add_setting_flags(extract, ("extraction", "evaluation.honesty"))

    steer = commands.add_parser("steer", help="baseline and steered completions side by side")
    _common(steer)
    steer.add_argument("--directions-dir", required=True, help="output of `refusal-dir extract`")
    steer.add_argument("--alpha", type=float, default=1.0, help="coefficient (unit: raw mean difference)")
    steer.add_argument("--layer", type=int, help="layer to steer at (default: the selected layer)")
    steer.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    steer.add_argument("--prompts-file", help="instructions file (.json/.jsonl/.csv, field instruction)")
    steer.add_argument("--ablate", action="store_true", help="directional ablation at every layer instead of addition")
    add_setting_flags(steer, ("steering.apply_to",))
    steer.add_argument("--max-new-tokens", type=int, default=48, help="tokens generated per prompt")
    steer.add_argument("--json", action="store_true", help="print JSON lines instead of text")

    evaluate = commands.add_parser("evaluate", help="sweep alphas with saved directions and report")
    _common(evaluate)
    add_setting_flags(evaluate, (*DATA, *SWEEP))
    evaluate.add_argument("--directions-dir", required=True, help="output of `refusal-dir extract`")
    evaluate.add_argument("--output-dir", required=True)
    evaluate.add_argument("--fresh", action="store_true", help="delete earlier results in --output-dir")
    add_setting_flags(evaluate, JUDGE)

    run = commands.add_parser("run", help="extract -> select layer -> sweep -> report, resumable")
    _common(run)
    add_setting_flags(run, (*DATA, *SWEEP))
    run.add_argument("--output-dir", required=True)
    run.add_argument("--fresh", action="store_true", help="delete earlier results in --output-dir")
    run.add_argument("--no-figures", action="store_true", help="skip the plotly HTML figures")
    add_setting_flags(run, (*JUDGE, "extraction.selection_prompts", "extraction.activation_store"))

    tune = commands.add_parser(
        "tune", help="induce: search layer x alpha x method under a capability limit; "
        "remove: search ablation kernels for least refusal at least KL",
    )
    _common(tune)
    add_setting_flags(tune, (*DATA, *SWEEP))
    tune.add_argument("--directions-dir", required=True, help="output of `refusal-dir extract`")
    tune.add_argument("--output-dir", required=True)
    tune.add_argument(
        "--objective", choices=["induce", "remove"], default="induce",
        help="induce refusal (steering) or remove it (ablation kernels, Optuna TPE; docs/abliteration.md)",
    )
    remove = tune.add_argument_group("--objective remove")
    remove.add_argument("--trials", type=int, default=48, help="ablation points tried")
    remove.add_argument("--seed", type=int, default=0, help="the sampler's seed (same seed, same trials)")
    remove.add_argument("--candidates-per-batch", type=int, default=8, help="points measured in one batched pass")
    remove.add_argument("--max-refusal", type=float, default=0.1, help="refusal rate to reach; least KL among those reaching it")
    remove.add_argument("--search-space", choices=["heretic", "wide"], default="heretic", help="parameter ranges (heretic's, or every layer)")
    remove.add_argument("--no-anchor", action="store_true", help="start from random points only, not from the selected direction ablated at weight 1 everywhere")
    remove.add_argument(
        "--direction-site", choices=["auto", "resid_post", "resid_pre"], default="auto",
        help="whose directions layer L's writes lose: layer L's output (resid_post, heretic's) or input (resid_pre); "
        "auto: resid_post when extracted",
    )
    remove.add_argument("--projected", action=argparse.BooleanOptionalAction, default=True, help="orthogonalize each direction against the harmless mean")
    remove.add_argument("--norm-preserving", action=argparse.BooleanOptionalAction, default=True, help="edited matrices keep their row norms")
    remove.add_argument(
        "--share-prefix", action=argparse.BooleanOptionalAction, default=True,
        help="prefill the prompts' common first tokens (a system prompt) once per candidate in each batch, not once per "
        "prompt, for refusal, KL, answered rate and letter-scored MMLU (same tokens up to float rounding; --no-share-prefix: every prompt whole)",
    )
    remove.add_argument("--no-figures", action="store_true", help="skip figures/pareto.html")
    tune.add_argument("--tune-methods", nargs="+", choices=["addition", "ablation", "conditional"], default=["addition", "ablation", "conditional"])
    tune.add_argument("--n-layers", type=int, default=3, help="try the N best candidate layers of the extraction")
    tune.add_argument("--max-mmlu-drop", type=float, default=0.01, help="accuracy points (0.01 = 1 point)")
    tune.add_argument("--max-kl", type=float, default=0.1)
    tune.add_argument("--max-helpfulness-drop", type=float, default=1.0)
    tune.add_argument(
        "--limits-on", choices=["mean", "bound"], default="mean",
        help="check each limit on the paired drop (mean) or on its 95%% upper bound (bound)",
    )

    export = commands.add_parser("export", help="bake an ablation into a new model directory (or a LoRA adapter)")
    _common(export)
    export.add_argument("--directions-dir", help="output of `refusal-dir extract`: full ablation of one layer's direction")
    export.add_argument("--from-tune", help="output of `refusal-dir tune --objective remove`: its tuned ablation point")
    export.add_argument("--output-dir", required=True, help="new model directory (transformers format)")
    export.add_argument("--layer", type=int, help="with --directions-dir: direction of this layer (default: the selected one)")
    export.add_argument("--lora", action="store_true", help="write a peft LoRA adapter of the edit instead of full weights")

    rejudge = commands.add_parser(
        "rejudge", help="judge a finished run's samples again and compare with the phrase judge"
    )
    rejudge.add_argument("run_dir", metavar="RUN_DIR", help="the --output-dir of a finished run or evaluate")
    add_setting_flags(rejudge, JUDGE, required=True)
    rejudge.add_argument("--device", help="where a model judge runs: cpu, cuda, cuda:1 ... (default: the GPU if any)")
    rejudge.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _config(args: argparse.Namespace) -> Config:
    """The config file (``--config`` or the default) with the setting flags given on top."""
    config = load_config(getattr(args, "config", None))
    values = {dest: getattr(args, dest) for dest in getattr(args, "setting_flags", {})}
    for old_dest, (old_flag, flag, dest) in getattr(args, "renamed_flags", {}).items():
        if getattr(args, old_dest) is None:
            continue
        warnings.warn(f"{old_flag} is deprecated: use {flag} (docs/glossary.md)", DeprecationWarning, stacklevel=2)
        if values[dest] is not None:
            raise ConfigError(f"{old_flag} and {flag} both given: give {flag} only ({old_flag} is its old name)")
        values[dest] = getattr(args, old_dest)
    overrides: dict[str, Any] = {
        key: tuple(values[dest]) if isinstance(values[dest], list) else values[dest]
        for dest, key in getattr(args, "setting_flags", {}).items()
    }
    methods = overrides.get("extraction.methods")
    if methods:
        overrides["extraction.method"] = config.extraction.method if config.extraction.method in methods else methods[0]
    return config.with_overrides(overrides)


def _load(config: Config) -> Any:
    from refusal_dir.model import load_model

    return load_model(config.model.name, **config.model.load_options())


# ----------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------


def cmd_extract(args: argparse.Namespace) -> int:
    from refusal_dir import outdir, pipeline
    from refusal_dir.datasets import load_datasets
    from refusal_dir.extraction import check_activation_store, extract, extraction_prompts
    from refusal_dir.selection import format_score_table

    config = _config(args)
    output_dir = outdir.check_output_dir(args.output_dir)
    check_activation_store(config, output_dir)
    datasets = load_datasets(config)
    model = _load(config)
    pipeline.check_prompt_lengths(model, extraction_prompts(datasets, config), max_new_tokens=0)
    with pipeline.open_output_dir(output_dir, config, overwrite_config=True) as output_dir:
        extraction = extract(model, config, datasets, output_dir, progress=not args.quiet)
        pipeline.record_config(output_dir, config)
    _out(f"model {model.model_id}: {model.n_layers} layers, d_model {model.d_model}")
    _out(f"steering set {extraction.selected_key} (held-out pairs scored per layer):")
    _out(format_score_table(extraction.scores[extraction.selected_key], selected=extraction.selected))
    s = extraction.selected
    if extraction.effects:
        from refusal_dir.selection import effects_table

        chosen = next(e for e in extraction.effects if e.layer == s.layer and e.position == s.position)
        _out("candidate effects on held-out pairs (ablation KL on harmless, bypass, induce):")
        _out(effects_table(extraction.effects, selected=chosen))
        rule = (extraction.selection or {}).get("description", "effect")
    elif extraction.cosines:
        from refusal_dir.selection import cosines_table

        picked = next(c for c in extraction.cosines if c.layer == s.layer and c.position == s.position)
        _out("candidate cosines on held-out pairs (ablated harmful vs harmless, steered harmless vs harmful):")
        _out(cosines_table(extraction.cosines, selected=picked))
        rule = (extraction.selection or {}).get("description", "cosine")
    else:
        rule = "best held-out separation"
    _out(
        f"selected layer {s.layer} at position {s.position}: separation accuracy "
        f"{s.separation_accuracy:.3f}, AUROC {s.auroc:.3f} (rule: {rule}, in the first "
        f"{config.extraction.max_layer_fraction:.0%} of layers)"
    )
    if extraction.honesty_selected is not None:
        h = extraction.honesty_selected
        _out(f"honesty direction: layer {h.layer}, separation accuracy {h.separation_accuracy:.3f}")
    _out(f"wrote {output_dir / 'directions'}")
    return 0


def _steer_prompts(args: argparse.Namespace) -> list[str]:
    from refusal_dir import prompts as prompt_sets

    items = list(args.prompt)
    if args.prompts_file:
        items += prompt_sets.load_instructions(args.prompts_file)
    if not items:
        items = prompt_sets.benign_eval()[:3] + prompt_sets.harmful_eval()[:3]
    if any(not item.strip() for item in items):
        raise DataError("a --prompt is empty: give non-empty prompts")
    return items


def _model_and_directions(args: argparse.Namespace, config: Config) -> tuple[Any, Any, dict[str, Any], int]:
    """Load and check the steering directions, then the model they were made for (or --model)."""
    from refusal_dir.extraction import load_selected

    if not str(args.directions_dir).strip():
        raise DataError("--directions-dir is empty: pass the output of `refusal-dir extract`")
    directions, selected = load_selected(Path(args.directions_dir))
    if args.model is None:
        config = config.with_overrides({"model.name": directions.meta.model_id})
    layer = args.layer if args.layer is not None else selected.get("layer")
    if layer is None:
        raise ConfigError("this direction set has no selected layer: pass --layer")
    directions.unit(int(layer), selected.get("position"))  # layer and position exist in the set
    model = _load(config)
    directions.check_fits(model)
    return model, directions, selected, int(layer)


def cmd_steer(args: argparse.Namespace) -> int:
    from refusal_dir.generation import GenerationSettings, generate
    from refusal_dir.pipeline import check_prompt_lengths
    from refusal_dir.steer import Steer

    prompts = _steer_prompts(args)
    config = _config(args)
    model, directions, selected, layer = _model_and_directions(args, config)
    check_prompt_lengths(model, {"--prompt/--prompts-file": prompts}, max_new_tokens=args.max_new_tokens)
    token = selected.get("position")
    method = "ablation" if args.ablate else "addition"
    spec = Steer(
        method, directions, layer=layer, token=token, apply_to=config.steering.apply_to,
        site=directions.meta.site, unit=config.steering.unit,  # the site the directions were read at
    )
    if args.ablate:
        interventions = spec.at(1.0)
        label = f"ablation of the layer-{layer} direction at every layer"
    else:
        interventions = spec.at(args.alpha)
        label = f"addition at layer {layer}, alpha {args.alpha:+g} x raw mean difference (norm {directions.norm(layer, token):.1f})"
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    baseline = generate(model, prompts, settings=settings, progress=not args.quiet)
    steered = generate(model, prompts, interventions=interventions, settings=settings, progress=not args.quiet)
    if args.json:
        for prompt, base, new in zip(prompts, baseline, steered):
            _out(json.dumps({"prompt": prompt, "baseline": base, "steered": new, "intervention": label}))
        return 0
    _out(f"{model.model_id}: {label}")
    for prompt, base, new in zip(prompts, baseline, steered):
        _out("=" * 80)
        _out(f"PROMPT   {prompt}")
        _out(f"BASELINE {base.strip()!r}")
        _out(f"STEERED  {new.strip()!r}")
    return 0


class _StageReporter:
    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.start = time.monotonic()

    def __call__(self, stage: str) -> None:
        if not self.quiet:
            _err(f"[{time.monotonic() - self.start:7.1f}s] {stage}")


def _write_figures(output_dir: Path, rows: list[dict[str, Any]], extraction: Any) -> None:
    try:
        from analysis.report_figures import write_report_figures
    except ImportError as error:  # the analysis package is optional for the library
        logger.warning("figures skipped (%s)", error)
        return
    write_report_figures(output_dir, rows, extraction)


def cmd_run(args: argparse.Namespace) -> int:
    from refusal_dir import pipeline
    from refusal_dir.report import results_table

    config = _config(args)
    reporter = _StageReporter(args.quiet)
    command = _display_command(args.argv)
    output_dir = Path(args.output_dir)

    def figures(directory: Path, rows: list[dict[str, Any]], extraction: Any) -> None:
        reporter("writing figures")
        _write_figures(directory, rows, extraction)

    rows, _ = pipeline.run(
        config, output_dir, fresh=args.fresh, progress=not args.quiet,
        command=command, on_stage=reporter, finish=None if args.no_figures else figures,
    )
    _out(results_table(rows))
    _out(f"wrote {output_dir / 'report.md'}, results.json and results.csv")
    return 0


def _saved_extraction(args: argparse.Namespace, config: Config) -> tuple[Config, Path, Any]:
    """The extraction in ``--directions-dir`` (every file checked, no model needed yet) and the
    config naming the model it was made for (unless --model was given)."""
    from refusal_dir.extraction import extraction_directory, load_extraction

    directions_dir = extraction_directory(Path(args.directions_dir))
    extraction = load_extraction(directions_dir)
    if args.model is None:
        config = config.with_overrides({"model.name": extraction.steering_set.meta.model_id})
    return config, directions_dir, extraction


def _checked_model(config: Config, extraction: Any, reporter: _StageReporter) -> Any:
    from refusal_dir import pipeline
    from refusal_dir.extraction import check_extraction_fits

    reporter("loading model")
    model = _load(config)
    check_extraction_fits(extraction, model)
    pipeline.check_steering_layer(config, model)
    return model


def cmd_evaluate(args: argparse.Namespace) -> int:
    from refusal_dir import outdir, pipeline
    from refusal_dir.datasets import load_datasets
    from refusal_dir.extraction import check_pairs_match
    from refusal_dir.report import results_table, write_report

    config, directions_dir, extraction = _saved_extraction(args, _config(args))
    reporter = _StageReporter(args.quiet)
    output_dir = outdir.check_output_dir(args.output_dir, fresh=args.fresh, protect=[directions_dir])
    if not args.fresh:
        pipeline.check_resumable(output_dir, config)
    datasets = load_datasets(config)
    check_pairs_match(extraction, datasets, directions_dir=directions_dir)
    model = _checked_model(config, extraction, reporter)
    pipeline.check_prompt_lengths(
        model, pipeline.evaluation_prompts(datasets, config), max_new_tokens=config.generation.max_new_tokens
    )
    command = _display_command(args.argv)
    with pipeline.open_output_dir(output_dir, config, fresh=args.fresh, protect=[directions_dir]) as output_dir:
        ctx = pipeline.SweepContext(model, config, datasets, extraction, not args.quiet, directions_dir=directions_dir)
        rows = pipeline.sweep(ctx, output_dir, on_group=lambda m, g: reporter(f"sweep: {m} / {g}"))
        write_report(rows, output_dir, extraction=extraction, model_id=model.model_id, command=command)
        _write_figures(output_dir, rows, extraction)
    _out(results_table(rows))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from refusal_dir import export, outdir
    from refusal_dir.extraction import load_selected
    from refusal_dir.model import names_local_path, resolve_model_source
    from refusal_dir.tuned import read_tuned

    config = _config(args)
    if (args.directions_dir is None) == (args.from_tune is None):
        raise ConfigError("give one of --directions-dir (full ablation of one direction) or --from-tune (a tuned point)")
    protect = [Path(args.directions_dir or args.from_tune)]
    if args.model is not None and Path(args.model).expanduser().is_dir():
        protect.append(Path(resolve_model_source(args.model)))
    outdir.check_output_dir(args.output_dir, kind="model", fresh=True, protect=protect)
    if args.from_tune is not None:
        if args.layer is not None:
            raise ConfigError("--layer picks a direction of --directions-dir; a tuned point brings its own: drop --layer")
        tuned = read_tuned(args.from_tune)
        name = tuned.model
        if args.model is None and names_local_path(name) and not Path(name).expanduser().is_absolute():
            raise ConfigError(
                f"{args.from_tune} names its model by the relative path {name!r} (written before "
                "tuned points recorded absolute paths): pass --model with the model it was tuned on"
            )
        bake, model_name, what = export.Bake.tuned(tuned), name, "the tuned ablation point"
    else:
        directions, selected = load_selected(Path(args.directions_dir))
        layer = args.layer if args.layer is not None else selected.get("layer")
        if layer is None:
            raise ConfigError("this direction set has no selected layer: pass --layer")
        bake = export.Bake.full_ablation(directions, int(layer), selected.get("position"))
        model_name, what = directions.meta.model_id, f"directional ablation of the layer-{layer} direction"
    if args.model is not None:
        model_name = config.model.name
    source = Path(resolve_model_source(model_name))
    if source.is_dir():  # also when the directions named the model
        protect.append(source)
    path = export.export(
        model_name, bake, args.output_dir, load_options=config.model.load_options(),
        lora_adapter=args.lora, protect=protect, progress=not args.quiet,
    )
    _out(f"wrote {path}: {what} {'as a LoRA adapter' if args.lora else 'baked into the weights'}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from refusal_dir import outdir, tune

    if args.objective == "remove":
        return cmd_tune_remove(args)
    limits = tune.Limits(args.max_mmlu_drop, args.max_kl, args.max_helpfulness_drop, check=args.limits_on)
    if args.n_layers < 1:
        raise ConfigError(f"--n-layers must be >= 1, got {args.n_layers}")
    config, datasets, model, extraction, output_dir, reporter = _tune_inputs(args)
    with outdir.claim_output_dir(output_dir) as output_dir:
        return _tune(args, config, limits, datasets, model, extraction, output_dir, reporter)


def _tune_inputs(
    args: argparse.Namespace, check_extraction: Callable[[Any], object] | None = None
) -> tuple[Config, Any, Any, Any, Path, _StageReporter]:
    """Everything checked before a tune claims its output directory: the saved extraction (and
    ``check_extraction`` of it, before anything slow), the data sets (the same refusal pairs),
    the model it fits, the prompts' lengths."""
    from refusal_dir import outdir, pipeline
    from refusal_dir.datasets import load_datasets
    from refusal_dir.extraction import check_pairs_match

    config, directions_dir, extraction = _saved_extraction(args, _config(args))
    if check_extraction is not None:
        check_extraction(extraction)
    output_dir = outdir.check_output_dir(args.output_dir, protect=[directions_dir])
    reporter = _StageReporter(args.quiet)
    datasets = load_datasets(config)
    check_pairs_match(extraction, datasets, directions_dir=directions_dir)
    model = _checked_model(config, extraction, reporter)
    pipeline.check_prompt_lengths(
        model, pipeline.evaluation_prompts(datasets, config), max_new_tokens=config.generation.max_new_tokens
    )
    return config, datasets, model, extraction, output_dir, reporter


def _tune(
    args: argparse.Namespace, config: Config, limits: Any, datasets: Any, model: Any,
    extraction: Any, output_dir: Path, reporter: _StageReporter,
) -> int:
    from refusal_dir import tune
    from refusal_dir.datasets import mc_formatter, split_pairs
    from refusal_dir.generation import GenerationSettings
    from refusal_dir.outdir import atomic_write_bytes
    from refusal_dir.selection import ranked_layers

    layers = ranked_layers(extraction, args.n_layers)
    _, heldout_pairs = split_pairs(datasets.refusal_pairs, config)
    validation = tune.EvalSplit(*(tune.split_half(x)[0] for x in (datasets.harmful_eval, datasets.benign_eval, datasets.mmlu)))
    heldout = tune.EvalSplit(*(tune.split_half(x)[1] for x in (datasets.harmful_eval, datasets.benign_eval, datasets.mmlu)))
    formatter = mc_formatter(config)
    result = tune.tune(
        model, extraction.steering_set, layers=layers, alphas=config.steering.alphas,
        methods=args.tune_methods, validation=validation, heldout=heldout,
        condition_positive=heldout_pairs.positives, condition_negative=heldout_pairs.negatives,
        limits=limits, token=extraction.selected.position,
        settings=GenerationSettings(max_new_tokens=config.generation.max_new_tokens, batch_size=config.generation.batch_size),
        apply_to=config.steering.apply_to, site=config.extraction.site, unit=config.steering.unit,
        mmlu_scoring=config.evaluation.mmlu_scoring,
        mmlu_formatter=formatter, bootstrap_resamples=config.evaluation.bootstrap_resamples,
        on_event=reporter,
    )
    payload = {
        "limits": {
            "max_mmlu_drop": limits.max_mmlu_drop, "max_kl": limits.max_kl,
            "max_helpfulness_drop": limits.max_helpfulness_drop, "check": limits.check,
        },
        "layers": layers,
        "baseline": result.baseline.as_row(),
        "chosen": result.chosen.as_row(),
        "frontier": [p.as_row() for p in result.front],
        "points": [p.as_row() for p in result.points],
        "heldout": result.heldout,
    }
    atomic_write_bytes(output_dir / "tune.json", json.dumps(payload, indent=2, default=str).encode())
    table = tune.tune_table(result)
    atomic_write_bytes(output_dir / "tune.md", (table + "\n").encode())
    _out(table)
    chosen = result.chosen
    _out(f"chosen (validation): {chosen.method} layer {chosen.layer} alpha {chosen.alpha:+g}")
    for label, metrics in result.heldout.items():
        cells = ", ".join(f"{m} {v['value']:.2f} [{v['ci'][0]:.2f}, {v['ci'][1]:.2f}]" for m, v in metrics.items())
        _out(f"held-out {label}: {cells}")
    return 0


def cmd_tune_remove(args: argparse.Namespace) -> int:
    from refusal_dir import outdir
    from refusal_dir.abliteration import AblationOptions
    from refusal_dir.tune_remove import (
        RemoveLimits,
        SearchSettings,
        SearchSpace,
        ablation_directions,
    )

    for flag, value in (("--trials", args.trials), ("--candidates-per-batch", args.candidates_per_batch)):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    search = SearchSettings(
        args.trials, args.seed, args.candidates_per_batch, SearchSpace(args.search_space),
        RemoveLimits(args.max_refusal, args.max_mmlu_drop, args.max_helpfulness_drop),
    )
    chosen: dict[str, Any] = {}

    def choose_directions(extraction: Any) -> None:  # a site the extraction lacks: refused before the model loads
        chosen["directions"] = ablation_directions(extraction, args.direction_site)

    config, datasets, model, extraction, output_dir, reporter = _tune_inputs(args, choose_directions)
    directions, anchor = chosen["directions"]
    if not args.no_anchor:
        search = dataclasses.replace(search, anchor_layer=anchor)
    options = AblationOptions(args.projected, args.norm_preserving, extraction.selected.position)
    with outdir.claim_output_dir(output_dir) as output_dir:
        return _tune_remove(args, config, search, options, datasets, model, directions, output_dir, reporter)


def _tune_remove(
    args: argparse.Namespace, config: Config, search: Any, options: Any, datasets: Any, model: Any,
    directions: Any, output_dir: Path, reporter: _StageReporter,
) -> int:
    from refusal_dir import tune
    from refusal_dir.abliteration import harmless_means
    from refusal_dir.datasets import mc_formatter, split_pairs
    from refusal_dir.generation import GenerationSettings
    from refusal_dir.tune_remove import tune_remove
    from refusal_dir.tune_report import write_remove_outputs
    from refusal_dir.tuned import TunedAblation

    train_pairs, _ = split_pairs(datasets.refusal_pairs, config)
    means = None
    if options.projected:
        reporter("harmless means")
        means = harmless_means(
            model, train_pairs.negatives, site=directions.meta.site, token=config.extraction.token,
            batch_size=config.extraction.batch_size,
        )
    halves = [tune.split_half(x) for x in (datasets.harmful_eval, datasets.benign_eval, datasets.mmlu)]
    result = tune_remove(
        model, directions,
        validation=tune.EvalSplit(*(half[0] for half in halves)), heldout=tune.EvalSplit(*(half[1] for half in halves)),
        search=search, options=options, harmless_means=means,
        settings=GenerationSettings(
            max_new_tokens=config.generation.max_new_tokens, batch_size=config.generation.batch_size,
            share_prefix=args.share_prefix,
        ),
        mmlu_scoring=config.evaluation.mmlu_scoring, mmlu_formatter=mc_formatter(config),
        bootstrap_resamples=config.evaluation.bootstrap_resamples, on_event=reporter,
    )
    # The loaded model's id: a local directory as an absolute path, so that `export --from-tune`
    # run from another folder loads this model and not whatever the relative name points at there.
    tuned = TunedAblation(model.model_id, result.chosen.point, options, directions, means)
    table = write_remove_outputs(
        output_dir, result, tuned, figures=not args.no_figures,
        extra={"model": model.model_id, "directions_dir": str(args.directions_dir), "direction_site": directions.meta.site},
    )
    _out(table)
    _out(f"wrote {output_dir}: export the chosen point with `refusal-dir export --from-tune {output_dir} --output-dir DIR`")
    return 0


def cmd_rejudge(args: argparse.Namespace) -> int:
    from refusal_dir.evaluation.agreement import agreement_markdown
    from refusal_dir.rejudge import AGREEMENT_JSON, AGREEMENT_MD, rejudge

    record = rejudge(args.run_dir, args.judge, device=args.device)
    _out(agreement_markdown(record, judge=record["judge"], conditions=False))
    _out(f"wrote {Path(args.run_dir) / AGREEMENT_JSON} and {AGREEMENT_MD}")
    return 0


def _quiet_hub() -> None:
    """Offline, the hub client logs every retry twice (about 45 lines) before the load fails;
    the load error says it all. Its own logging setup, run on import, would reset a level set
    earlier, so it is imported and told here."""
    try:
        from huggingface_hub.utils import logging as hub_logging
    except ImportError:  # pragma: no cover
        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
        return
    hub_logging.set_verbosity_error()


def _quiet_libraries() -> None:
    """--quiet also silences the weight-loading progress bars of transformers and the hub."""
    try:
        from huggingface_hub.utils import disable_progress_bars
        from transformers.utils import logging as transformers_logging
    except ImportError:  # pragma: no cover
        return
    disable_progress_bars()
    transformers_logging.disable_progress_bar()


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


COMMANDS = {
    "extract": cmd_extract,
    "steer": cmd_steer,
    "evaluate": cmd_evaluate,
    "run": cmd_run,
    "export": cmd_export,
    "tune": cmd_tune,
    "rejudge": cmd_rejudge,
}


def _display_command(argv: Sequence[str]) -> str:
    """The command as reports record it (paths as :func:`outdir.display_path` shows them)."""
    from refusal_dir.outdir import display_path

    return "refusal-dir " + " ".join(shlex.quote(display_path(a)) for a in argv)


def _show_deprecations() -> None:
    """Inside a ``warnings.catch_warnings()`` block: the library's DeprecationWarnings (old
    config keys and flags), hidden by Python's default filters, are logged as one line each."""
    package = Path(__file__).resolve().parent
    show = warnings.showwarning

    def shown(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None, line: str | None = None) -> None:
        if issubclass(category, DeprecationWarning) and Path(filename).resolve().is_relative_to(package):
            logger.warning("%s", message)
        else:
            show(message, category, filename, lineno, file, line)

    warnings.filterwarnings("always", category=DeprecationWarning, module="refusal_dir")
    warnings.showwarning = shown


def main(argv: Sequence[str] | None = None) -> int:
    with warnings.catch_warnings():
        _show_deprecations()
        return _main(argv)


def _main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _quiet_hub()
    if getattr(args, "quiet", False):
        _quiet_libraries()
    try:
        for name in ("output_dir", "directions_dir", "from_tune"):
            if getattr(args, name, None) is not None and not getattr(args, name).strip():
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{flag} is empty: name a directory (an empty path means the current one)")
        return COMMANDS[args.command](args)
    except RefusalDirError as error:
        _err(f"refusal-dir {args.command}: error: {_one_line(error)}")
        return 2
    except OSError as error:  # disk full, read-only or vanished paths met outside the checks
        from refusal_dir.outdir import os_error_message

        _err(f"refusal-dir {args.command}: error: {os_error_message(error)}")
        return 2
    except KeyboardInterrupt:
        _err(f"refusal-dir {args.command}: interrupted; finished parts are kept: re-run the same command to resume")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
