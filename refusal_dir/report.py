"""Stage 3: the report: ``OUT/report.md`` from the result rows.

The results table (one line per method and alpha, 95% intervals, paired differences from the
unsteered model), a warning where the unsteered MMLU-style accuracy cannot be told from chance,
the layer selection that chose the direction, and the judges' agreement.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from refusal_dir.extraction import Extraction
from refusal_dir.outdir import atomic_write_bytes, display_path
from refusal_dir.selection import cosines_table, effects_table

logger = logging.getLogger(__name__)


TABLE_METRICS = (
    ("refusal_harmful", "refusal (harmful)"),
    ("refusal_benign", "refusal (benign)"),
    ("answered_benign", "answered (benign)"),
    ("mmlu_accuracy", "MMLU-style acc."),
    ("kl_benign", "KL (benign)"),
    ("ce_harmless", "CE (harmless answers)"),
    ("refusal_score_harmful", "refusal score (harmful)"),
)

TABLE_DIFFS = (
    ("refusal_harmful", "Δ refusal (harmful)"),
    ("answered_benign", "Δ answered (benign)"),
    ("mmlu_accuracy", "Δ MMLU"),
)
"""Metrics whose paired difference from alpha 0 gets its own column."""


def _cell(row: dict[str, Any] | None, *, diff: bool = False) -> str:
    if row is None:
        return "-"
    names = ("diff", "diff_ci_low", "diff_ci_high") if diff else ("value", "ci_low", "ci_high")
    value, low, high = (row.get(name, math.nan) for name in names)
    if any(not isinstance(x, int | float) or math.isnan(x) for x in (value, low, high)):
        return "-"
    sign = "+" if diff else ""
    return f"{value:{sign}.2f} [{low:{sign}.2f}, {high:{sign}.2f}]"


def results_table(rows: list[dict[str, Any]]) -> str:
    """The Markdown results table: one line per (method, alpha), 95% intervals in brackets.

    Rates carry Wilson intervals, means of continuous values bootstrap intervals; the Δ columns
    are paired differences from alpha 0 (the unsteered model) on the same prompts.
    """
    index = {(r["method"], r["alpha"], r["metric"]): r for r in rows}
    keys = sorted({(r["method"], r["alpha"]) for r in rows if not r["method"].startswith("honesty_")})
    labels = [label for _, label in TABLE_METRICS] + [label for _, label in TABLE_DIFFS]
    header = "| method | layer | alpha | " + " | ".join(labels) + " |"
    lines = [header, "|" + "---|" * (3 + len(labels))]
    layers = {(r["method"], r["alpha"]): "-" if r["layer"] is None else r["layer"] for r in rows}
    for method, alpha in keys:
        cells = [_cell(index.get((method, alpha, metric))) for metric, _ in TABLE_METRICS]
        cells += [_cell(index.get((method, alpha, metric)), diff=True) for metric, _ in TABLE_DIFFS]
        lines.append(f"| {method} | {layers[(method, alpha)]} | {alpha:+.2f} | " + " | ".join(cells) + " |")
    honesty = sorted({(r["method"], r["alpha"]) for r in rows if r["method"].startswith("honesty_")})
    if honesty:
        lines += ["", "| honesty method | layer | alpha | accuracy | balanced accuracy | true claims | false claims |", "|---|---|---|---|---|---|---|"]
        for method, alpha in honesty:
            cells = [
                _cell(index.get((method, alpha, metric)))
                for metric in ("honesty_accuracy", "honesty_balanced_accuracy", "honesty_accuracy_true_claims", "honesty_accuracy_false_claims")
            ]
            lines.append(f"| {method} | {layers[(method, alpha)]} | {alpha:+.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chance_warnings(rows: list[dict[str, Any]]) -> list[str]:
    """One warning per method whose unsteered (alpha 0) MMLU-style interval contains chance.

    Such an accuracy cannot show that steering costs capability: the model was guessing.
    """
    index = {(r["method"], r["alpha"], r["metric"]): r for r in rows}
    warnings = []
    for (method, alpha, metric), row in sorted(index.items()):
        chance = index.get((method, alpha, "mmlu_chance"))
        if metric != "mmlu_accuracy" or alpha != 0.0 or chance is None:
            continue
        if row["ci_low"] <= chance["value"] <= row["ci_high"]:
            warnings.append(
                f"{method}: the unsteered MMLU-style accuracy {row['value']:.2f} "
                f"[{row['ci_low']:.2f}, {row['ci_high']:.2f}] contains chance "
                f"({chance['value']:.2f}); capability changes under steering are not measurable"
            )
    return warnings


def write_report(rows: list[dict[str, Any]], output_dir: Path, *, extraction: Extraction | None, model_id: str, command: str) -> Path:
    lines = [
        f"# refusal_dir results: {display_path(model_id)}",
        "",
        f"Command: `{command}`",
        "",
    ]
    for warning in chance_warnings(rows):
        logger.warning(warning)
        lines += [f"**Warning**: {warning}.", ""]
    if extraction is not None:
        s = extraction.selected
        lines += [
            f"Steering direction: `{extraction.selected_key}`, position `{s.position}`, layer {s.layer} "
            f"(held-out separation accuracy {s.separation_accuracy:.2f}, AUROC {s.auroc:.2f}).",
            "",
        ]
        if extraction.effects:
            chosen = next(
                (e for e in extraction.effects if (e.layer, e.position) == (s.layer, s.position)), None
            )
            rule = (extraction.selection or {}).get("description", "effect")
            lines += [
                f"Layer selection rule that fired: {rule}. Every candidate, measured on the "
                "held-out extraction pairs (`*`: selected; also in `directions/layer_effects.csv`):",
                "",
                "```",
                effects_table(extraction.effects, selected=chosen),
                "```",
                "",
            ]
        elif extraction.cosines:
            picked = next(
                (c for c in extraction.cosines if (c.layer, c.position) == (s.layer, s.position)), None
            )
            rule = (extraction.selection or {}).get("description", "cosine")
            lines += [
                f"Layer selection rule that fired: {rule}. Every candidate, measured on the "
                "held-out extraction pairs (`*`: selected; also in `directions/layer_cosines.csv`):",
                "",
                "```",
                cosines_table(extraction.cosines, selected=picked),
                "```",
                "",
            ]
    lines += [
        "Rates are shares of prompts with 95% Wilson intervals; KL and refusal scores are means "
        "with 95% bootstrap intervals. Δ columns: the paired difference from alpha 0 (the "
        "unsteered model) on the same prompts, with a 95% paired interval (Newcombe's for rates, "
        "a paired bootstrap for means); prompts that share a topic are resampled together. "
        "`addition`: alpha x "
        "the raw mean-difference vector added at the layer; `ablation`: directional ablation of "
        "strength alpha at every layer (1 removes the component, 0 is the unsteered model); "
        "`conditional`: the addition applied only to prompts whose projection at the layer passes a "
        "threshold fit on the held-out extraction pairs; `prompt` (no direction, no layer): alpha +1 "
        "asks for a refusal in words (`steering.prompt_induce`), -1 asks for an answer "
        "(`steering.prompt_remove`), 0 is the plain prompt.",
        "",
        results_table(rows),
        "",
        "Every generation behind these rates, with its prompt and how it was judged: "
        "[`samples.jsonl`](samples.jsonl).",
        "",
    ]
    lines += judge_agreement_section(output_dir / "samples.jsonl")
    path = output_dir / "report.md"
    atomic_write_bytes(path, "\n".join(lines).encode())
    return path


def judge_agreement_section(samples_path: Path) -> list[str]:
    """The report's agreement of a model judge with the phrase judge, per set, from the
    ``refused`` and ``refused_substring`` verdicts of ``samples.jsonl`` (no lines when the run
    used the phrase judge)."""
    from refusal_dir.evaluation.agreement import agreement_markdown, agreement_rows

    try:
        samples = [json.loads(line) for line in samples_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, ValueError):
        return []
    judged = [s for s in samples if isinstance(s, dict) and "refused_substring" in s]
    if not judged:
        return []
    name = str(judged[0].get("judge", "model judge"))
    rows = agreement_rows(judged, [s["refused"] for s in judged], [s["refused_substring"] for s in judged])
    return [
        f"## Judge agreement: `{name}` against the phrase judge (`substring`)",
        "",
        "The rates above use the model judge. Counts of completions by the two verdicts, the "
        "share on which they agree, and Cohen's kappa (agreement beyond chance; `-`: undefined, "
        "one verdict throughout). Where they disagree, read the completions in `samples.jsonl`; "
        "`refusal-dir rejudge` adds the table per (method, alpha).",
        "",
        agreement_markdown(rows, judge="model", conditions=False),
        "",
    ]
