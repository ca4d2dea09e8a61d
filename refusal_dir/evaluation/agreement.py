"""How far two judges agree on the same completions: counts, agreement rate, Cohen's kappa.

A model judge is no ground truth, nor is the phrase judge; where they disagree, read the
completions. :func:`agreement_table` compares two lists of verdicts; :func:`agreement_rows`
groups samples (the records of ``samples.jsonl``) per set and per (set, method, alpha);
:func:`agreement_markdown` writes them as the report's tables.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from refusal_dir.errors import DataError

SETS: tuple[str, ...] = ("harmful", "benign")
"""The sets of ``samples.jsonl`` whose completions are judged."""


def agreement_table(a: Sequence[bool], b: Sequence[bool]) -> dict[str, Any]:
    """Counts of (a, b) verdict pairs, the share of agreements, and Cohen's kappa.

    ``both``: both True (refused); ``only_a``, ``only_b``: one of them; ``neither``: both False.
    ``kappa = (p_o - p_e) / (1 - p_e)``, with ``p_o`` the agreement rate and ``p_e`` the
    agreement expected by chance from each judge's own rate; it is ``None`` where undefined
    (both judges give one and the same verdict throughout: ``p_e = 1``).
    """
    if isinstance(a, str) or isinstance(b, str):
        raise DataError("agreement_table takes two lists of verdicts, not strings")
    if len(a) != len(b):
        raise DataError(f"{len(a)} verdicts against {len(b)}: pass one each")
    if not a:
        raise DataError("no verdicts to compare: pass at least one")
    pairs = [(bool(x), bool(y)) for x, y in zip(a, b, strict=True)]
    n = len(pairs)
    both = sum(1 for x, y in pairs if x and y)
    only_a = sum(1 for x, y in pairs if x and not y)
    only_b = sum(1 for x, y in pairs if y and not x)
    neither = n - both - only_a - only_b
    observed = (both + neither) / n
    rate_a, rate_b = (both + only_a) / n, (both + only_b) / n
    expected = rate_a * rate_b + (1 - rate_a) * (1 - rate_b)
    kappa = None if expected >= 1.0 else (observed - expected) / (1.0 - expected)
    return {
        "n": n, "both": both, "only_a": only_a, "only_b": only_b, "neither": neither,
        "agreement": observed, "kappa": kappa,
    }


def agreement_rows(
    samples: Sequence[Mapping[str, Any]], a: Sequence[bool], b: Sequence[bool]
) -> dict[str, list[dict[str, Any]]]:
    """Agreement of verdicts ``a`` and ``b`` (one each per sample) per set (``"sets"``) and per
    (set, method, alpha) (``"conditions"``), in the order of :data:`SETS`, then method and alpha."""
    if not len(samples) == len(a) == len(b):
        raise DataError(f"{len(samples)} samples, {len(a)} and {len(b)} verdicts: pass one each")
    groups: dict[tuple[Any, ...], list[int]] = {}
    for index, sample in enumerate(samples):
        groups.setdefault((sample["set"],), []).append(index)
        groups.setdefault((sample["set"], sample["method"], float(sample["alpha"])), []).append(index)

    def order(key: tuple[Any, ...]) -> tuple[Any, ...]:
        rank = SETS.index(key[0]) if key[0] in SETS else len(SETS)
        return (rank, str(key[0]), *key[1:])

    rows: dict[str, list[dict[str, Any]]] = {"sets": [], "conditions": []}
    for key in sorted(groups, key=order):
        table = agreement_table([a[i] for i in groups[key]], [b[i] for i in groups[key]])
        if len(key) == 1:
            rows["sets"].append({"set": key[0], **table})
        else:
            rows["conditions"].append({"set": key[0], "method": key[1], "alpha": key[2], **table})
    return rows


def _kappa(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}"


def agreement_markdown(
    rows: Mapping[str, Sequence[Mapping[str, Any]]], *, judge: str, reference: str = "substring",
    conditions: bool = True,
) -> str:
    """Markdown tables of :func:`agreement_rows`: per set, and (``conditions``) per (set,
    method, alpha). ``judge`` names the ``a`` verdicts, ``reference`` the ``b`` verdicts."""
    head = f"| both refuse | only {judge} | only {reference} | neither | agreement | Cohen's kappa |"

    def cells(row: Mapping[str, Any]) -> str:
        return (
            f"{row['both']} | {row['only_a']} | {row['only_b']} | {row['neither']} | "
            f"{row['agreement']:.2f} | {_kappa(row['kappa'])} |"
        )

    lines = ["| set | n " + head, "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {row['set']} | {row['n']} | " + cells(row) for row in rows["sets"]]
    if conditions and rows.get("conditions"):
        lines += ["", "| set | method | alpha | n " + head, "|---|---|---|---|---|---|---|---|---|---|"]
        lines += [
            f"| {row['set']} | {row['method']} | {row['alpha']:+.2f} | {row['n']} | " + cells(row)
            for row in rows["conditions"]
        ]
    return "\n".join(lines)
