"""Layer selection: the cosine rule against the effect rule, on the refusal organism (and a real model).

Directions: the mean difference of the organism's training pairs (``resid_pre``, last token).
Both rules (:mod:`refusal_dir.selection.effect`, :mod:`refusal_dir.selection.cosine`) get the
same candidates (the first 80% of the layers, non-zero directions) and the same validation
prompts (16 of each kind); neither sees the test prompts. Then, for every candidate layer, the
held-out harmful refusal rate under ablation of its direction and the held-out harmless refusal
rate under its addition (alpha 1, prompt positions), 8 generated tokens, substring judge: a rule
is right when its layer is one where ablation removes refusal.

Timing: the two rules run interleaved (``common.interleaved``; the direction computation is not
timed), process CPU seconds on one thread, medians of ``--repeats`` rounds after one warm-up.

    python bench/bench_selection.py [--repeats 5] [--run docs/qwen2.5-coder-0.5b-instruct-run]
        [--output docs/selection-comparison.txt]

``--run DIR`` adds a saved run of a real model (the offline Qwen2.5-Coder-0.5B-Instruct run):
both rules on that run's held-out extraction pairs and directions, held-out refusal measured at
the two chosen layers only (generation on a 0.5B model costs minutes per layer on this CPU).

``compare`` is also what ``tests/integration/test_organism_selection.py`` checks.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (sets REFUSAL_DIR_CACHE and sys.path first)

COMMAND = (
    "python bench/bench_selection.py --repeats 5 --run docs/qwen2.5-coder-0.5b-instruct-run "
    "--output docs/selection-comparison.txt"
)


def compare(model: Any, sets: Any, *, repeats: int = 3, verbose: bool = False) -> dict[str, Any]:
    """The organism: directions from its training pairs, every candidate's held-out behaviour."""
    from refusal_dir.activations import collect_activations
    from refusal_dir.directions import compute_directions
    from refusal_dir.selection import score_layers

    def acts(prompts: Any) -> Any:
        return collect_activations(model, list(prompts), sites=("resid_pre",), progress=False)

    directions = compute_directions(
        acts(sets.harmful_train), acts(sets.harmless_train), site="resid_pre", model=model, position_rule="last"
    )
    scores = score_layers(directions, acts(sets.harmful_val), acts(sets.harmless_val))
    return compare_rules(
        model, directions, scores, validation=(sets.harmful_val, sets.harmless_val),
        test=(sets.harmful_test, sets.harmless_test), repeats=repeats, verbose=verbose,
    )


def compare_rules(
    model: Any,
    directions: Any,
    scores: Any,
    *,
    validation: tuple[Any, Any],
    test: tuple[Any, Any],
    max_prompts: int = 16,
    max_new_tokens: int = 8,
    every_layer: bool = True,
    repeats: int = 3,
    verbose: bool = False,
) -> dict[str, Any]:
    """Both rules' choices and CPU times; held-out refusal under ablation (harmful) and addition
    (harmless) at every candidate layer, or only at the two chosen ones (``every_layer=False``)."""
    from refusal_dir.evaluation import refusal_rate
    from refusal_dir.generation import GenerationSettings
    from refusal_dir.interventions import ablation, addition
    from refusal_dir.selection import choose_by_cosine, choose_layer, layer_cosines, layer_effects

    given = dict(harmful=list(validation[0]), harmless=list(validation[1]), max_prompts=max_prompts)
    results: dict[str, Any] = {}

    def effect() -> None:
        effects = layer_effects(model, directions, scores, **given)
        results["effect"] = (effects, choose_layer(effects))

    def cosine() -> None:
        scan = layer_cosines(model, directions, scores, **given)
        results["cosine"] = (scan, choose_by_cosine(scan))

    timings = common.interleaved(
        {"effect": effect, "cosine": cosine}, repeats=repeats, warmup=1 if repeats > 1 else 0, verbose=verbose
    )
    effects, effect_choice = results["effect"]
    scan, cosine_choice = results["cosine"]
    settings = GenerationSettings(max_new_tokens=max_new_tokens, batch_size=64)

    def rate(prompts: Any, interventions: list) -> float:
        return refusal_rate(model, list(prompts), interventions=interventions, settings=settings, progress=False).value

    chosen = {effect_choice.chosen.layer, cosine_choice.chosen.layer}
    by_layer = {c.layer: c for c in scan.cosines}
    rows = []
    for e in effects:
        c = by_layer[e.layer]
        measured = every_layer or e.layer in chosen
        rows.append({
            "layer": e.layer,
            "separation_accuracy": e.separation_accuracy,
            "ablation_kl": e.ablation_kl,
            "bypass": e.bypass,
            "induce": e.induce,
            "steering_score": e.steering_score,
            "comply_cosine": c.comply_cosine,
            "refuse_cosine": c.refuse_cosine,
            "cosine_score": c.cosine_score,
            "harmful_refusal_ablated": rate(test[0], [ablation(directions, layer=e.layer)]) if measured else None,
            "harmless_refusal_added": rate(
                test[1], [addition(directions, layer=e.layer, alpha=1.0, apply_to="prompt")]
            ) if measured else None,
        })
    return {
        "rows": rows,
        "baseline_harmful_refusal": rate(test[0], []),
        "baseline_harmless_refusal": rate(test[1], []),
        "effect_layer": effect_choice.chosen.layer,
        "effect_rule": effect_choice.describe(),
        "cosine_layer": cosine_choice.chosen.layer,
        "cosine_rule": cosine_choice.describe(),
        "measured_layers": list(scan.measured_layers),
        "cpu_seconds": {name: common.median(values) for name, values in timings.cpu.items()},
        "wall_seconds": {name: common.median(values) for name, values in timings.wall.items()},
        "cpu_spread": {name: common.spread(values) for name, values in timings.cpu.items()},
    }


def compare_run(model: Any, run: Path, *, repeats: int = 1, verbose: bool = False) -> tuple[dict[str, Any], str]:
    """A saved run of a real model (its ``config.resolved.yaml`` and ``directions/``): both rules
    on its held-out extraction pairs, held-out refusal at the two chosen layers on its evaluation
    sets (as many prompts and new tokens as the run used)."""
    from refusal_dir.config import load_config
    from refusal_dir.datasets import load_datasets, split_pairs
    from refusal_dir.extraction import load_extraction

    config = load_config(run / "config.resolved.yaml")
    datasets = load_datasets(config)
    extraction = load_extraction(run / "directions", model=model)
    _, heldout = split_pairs(datasets.refusal_pairs, config)
    result = compare_rules(
        model, extraction.steering_set, extraction.scores[extraction.selected_key],
        validation=(heldout.positives, heldout.negatives), test=(datasets.harmful_eval, datasets.benign_eval),
        max_prompts=config.extraction.selection_prompts, max_new_tokens=config.generation.max_new_tokens,
        every_layer=False, repeats=repeats, verbose=verbose,
    )
    described = (
        f"the saved run `{run.relative_to(common.REPO) if run.is_relative_to(common.REPO) else run}` "
        f"({config.model.name}, {model.n_layers} layers): its directions "
        f"(`{extraction.selected_key}`, last token), its {len(heldout)} held-out extraction pairs "
        f"({config.extraction.selection_prompts} of each kind per candidate); held-out columns: its "
        f"{len(datasets.harmful_eval)} harmful and {len(datasets.benign_eval)} benign evaluation prompts, "
        f"{config.generation.max_new_tokens} new tokens, at the two chosen layers only"
    )
    return result, described


ORGANISM = (
    "the default trained refusal organism (`OrganismConfig()`, 4 layers): directions from the mean "
    "difference of its 64 training pairs at resid_pre, last token; 16 validation prompts of each kind "
    "per candidate; held-out columns: 48 test prompts of each kind (topics never trained on), 8 new tokens"
)


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def report(result: dict[str, Any], described: str, repeats: int) -> str:
    """One section: the table of every candidate, both choices, both times."""
    header = [
        "layer", "sep. acc.", "abl. KL", "bypass", "induce", "effect score", "comply cos", "refuse cos",
        "cosine score", "harmful refusal, ablated", "harmless refusal, added",
    ]
    table = [
        [
            str(r["layer"]), f"{r['separation_accuracy']:.3f}", f"{r['ablation_kl']:.4f}", f"{r['bypass']:.2f}",
            f"{r['induce']:.2f}", f"{r['steering_score']:.2f}", f"{r['comply_cosine']:.4f}",
            f"{r['refuse_cosine']:.4f}", f"{r['cosine_score']:.4f}", _number(r["harmful_refusal_ablated"], 2),
            _number(r["harmless_refusal_added"], 2),
        ]
        for r in result["rows"]
    ]
    cpu, wall, spread = result["cpu_seconds"], result["wall_seconds"], result["cpu_spread"]
    rounds = f"medians of {repeats} interleaved rounds after a warm-up" if repeats > 1 else "one round each"
    return "\n".join([
        f"Model: {described}; substring judge (unsteered: harmful {result['baseline_harmful_refusal']:.2f}, "
        f"harmless {result['baseline_harmless_refusal']:.2f}). Both rules get the same candidates (first 80% "
        "of layers, non-zero direction) and the same validation prompts.",
        "",
        common.markdown_table(header, table),
        "",
        f"Effect rule picks layer {result['effect_layer']} ({result['effect_rule']}).",
        f"Cosine rule picks layer {result['cosine_layer']} ({result['cosine_rule']}).",
        "",
        f"Time per selection ({rounds}, one torch thread; process CPU seconds, range in brackets; wall "
        "seconds on a shared machine):",
        f"- effect rule: {cpu['effect']:.2f} s CPU [{spread['effect']}], {wall['effect']:.2f} s wall",
        f"- cosine rule: {cpu['cosine']:.2f} s CPU [{spread['cosine']}], {wall['cosine']:.2f} s wall",
        f"- ratio effect / cosine (CPU): {cpu['effect'] / cpu['cosine']:.2f}x",
        "",
    ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_timing_args(parser)
    parser.add_argument("--output", type=Path, default=None, help="also write the report to this file")
    parser.add_argument(
        "--run", type=Path, default=None,
        help="also compare on a saved run of a real model (its folder: config.resolved.yaml, directions/)",
    )
    parser.add_argument("--run-repeats", type=int, default=1, help="timed rounds on the saved run's model")
    args = parser.parse_args()
    common.set_threads(args.threads)
    from refusal_dir.model import load_model
    from refusal_dir.testing.organism import (
        OrganismConfig,
        load_or_train_organism,
        organism_eval_sets,
    )

    info = common.machine()
    cache = Path(os.environ.get("REFUSAL_DIR_TEST_CACHE") or common.REPO / ".cache" / "test")
    organism = load_model(str(load_or_train_organism(cache, OrganismConfig(), progress=True)), device="cpu")
    sections = [
        "# Layer selection: the cosine rule (COSMIC-style) against the effect rule",
        "",
        f"Command: `{COMMAND}` (made this file).",
        f"Machine: {info['cpu']}, {info['logical cores']} logical cores shared with other jobs, no GPU; "
        f"torch {info['torch']}, transformers {info['transformers']}; {info['date']}; load average at the "
        f"start {info.get('load average (1/5/15 min)', 'unknown')}.",
        "",
        "## The refusal organism",
        "",
        report(compare(organism, organism_eval_sets(0), repeats=args.repeats, verbose=True), ORGANISM, args.repeats),
    ]
    if args.run is not None:
        from refusal_dir.config import load_config

        name = load_config(args.run / "config.resolved.yaml").model.name
        model = load_model(name, device="cpu", with_bridge=False)
        result, described = compare_run(model, args.run, repeats=args.run_repeats, verbose=True)
        sections += [f"## {name}", "", report(result, described, args.run_repeats)]
    text = "\n".join(sections)
    print(text)
    if args.output is not None:
        from refusal_dir.outdir import atomic_write_text

        atomic_write_text(args.output, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
