"""The files of ``tune --objective remove``: ``tune.json``, ``trials.csv``, ``pareto.csv``,
``tune.md``, ``figures/pareto.html`` and the tuned point itself (:mod:`refusal_dir.tuned`)."""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Any

from refusal_dir.outdir import atomic_write_bytes, atomic_write_text
from refusal_dir.tune_remove import RemoveResult, Trial
from refusal_dir.tuned import TunedAblation, write_tuned

logger = logging.getLogger(__name__)


def _csv(trials: list[Trial]) -> str:
    rows = [t.as_row() for t in trials]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["trial"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def remove_table(result: RemoveResult) -> str:
    """Markdown: the unedited model, the chosen point, the Pareto front (validation), then the
    held-out comparison with its intervals."""
    lines = [
        "| point | trial | refusal | KL | answered | MMLU |",
        "|---|---|---|---|---|---|",
    ]
    rows = [("unedited", result.baseline), ("chosen", result.chosen)]
    rows += [("front", t) for t in result.front if t != result.chosen]
    for label, t in rows:
        lines.append(
            f"| {label} | {t.number if t.number >= 0 else '-'} | {t.refusal:.2f} | {_cell(t.kl)} | "
            f"{_cell(t.helpfulness)} | {_cell(t.mmlu)} |"
        )
    lines += ["", "Held out (chosen against the unedited model on the same items, 95% intervals):", ""]
    lines += ["| metric | unedited | chosen | difference |", "|---|---|---|---|"]
    for metric, diff in result.heldout["difference"].items():
        base, chosen = result.heldout["baseline"][metric], result.heldout["chosen"][metric]
        lines.append(
            f"| {metric} | {base['value']:.4g} [{base['ci'][0]:.4g}, {base['ci'][1]:.4g}] | "
            f"{chosen['value']:.4g} [{chosen['ci'][0]:.4g}, {chosen['ci'][1]:.4g}] | "
            f"{diff['value']:+.4g} [{diff['ci'][0]:+.4g}, {diff['ci'][1]:+.4g}] (n={diff['n']}) |"
        )
    return "\n".join(lines)


def payload(result: RemoveResult, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "objective": "remove",
        **extra,
        **result.settings,
        "baseline": result.baseline.as_row(),
        "chosen": result.chosen.as_row(),
        "chosen_point": result.chosen.point.to_dict(),
        "front": [t.as_row() for t in result.front],
        "trials": [t.as_row() for t in result.trials],
        "heldout": result.heldout,
    }


def write_remove_outputs(
    output_dir: Path, result: RemoveResult, tuned: TunedAblation, *, extra: dict[str, Any], figures: bool = True
) -> str:
    """Write every file; returns the markdown table."""
    write_tuned(output_dir, tuned)
    atomic_write_bytes(output_dir / "tune.json", json.dumps(payload(result, extra), indent=2, default=str).encode())
    atomic_write_text(output_dir / "trials.csv", _csv(result.trials))
    atomic_write_text(output_dir / "pareto.csv", _csv(result.front))
    table = remove_table(result)
    atomic_write_text(output_dir / "tune.md", table + "\n")
    if figures:
        try:
            from analysis.tune_figures import pareto_figure
        except ImportError as error:  # the analysis package is optional for the library
            logger.warning("figures skipped (%s)", error)
        else:
            directory = output_dir / "figures"
            directory.mkdir(exist_ok=True)
            html = pareto_figure(result).to_html(include_plotlyjs="cdn")
            atomic_write_text(directory / "pareto.html", html)
    return table
