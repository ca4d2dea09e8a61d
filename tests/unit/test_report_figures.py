"""The sweep figures take the result rows as a list or as the ``.rows`` of a sweep result."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from analysis._rows import as_rows
from analysis.report_figures import frontier_figure, sweep_figure, write_report_figures

METRICS = ("refusal_harmful", "answered_benign", "mmlu_accuracy", "kl_benign")


def _row(method: str, alpha: float, metric: str, value: float) -> dict[str, Any]:
    return {
        "method": method, "layer": 2, "alpha": alpha, "metric": metric, "value": value,
        "ci_low": value - 0.1, "ci_high": value + 0.2, "n": 8,
        "diff": 0.0, "diff_ci_low": 0.0, "diff_ci_high": 0.0,
    }  # fmt: skip


# alpha 1.0 before 0.0: the figures sort by alpha themselves
ROWS = [
    _row(method, alpha, metric, value=index + alpha + (10 if method == "ablation" else 0))
    for method in ("addition", "ablation")
    for alpha in (1.0, 0.0)
    for index, metric in enumerate(METRICS)
]


@dataclass(frozen=True)
class StandIn:
    """What a sweep result offers the figures: the rows of results.json as ``.rows``."""

    rows: list[dict[str, Any]]


def test_as_rows_takes_a_list_or_an_object_with_rows() -> None:
    assert as_rows(ROWS) == ROWS
    assert as_rows(tuple(ROWS)) == ROWS
    assert as_rows(StandIn(ROWS)) == ROWS
    assert as_rows(StandIn([])) == []


@pytest.mark.parametrize("wrong", [ROWS[0], "rows", 3, StandIn(ROWS[0])])
def test_as_rows_rejects_anything_else(wrong: object) -> None:
    with pytest.raises(TypeError, match=r"\.rows"):
        as_rows(wrong)  # type: ignore[arg-type]


def test_sweep_figure_from_a_result_equals_from_its_rows() -> None:
    from_rows = sweep_figure(ROWS)
    assert sweep_figure(StandIn(ROWS)).to_dict() == from_rows.to_dict()
    ablation = [t for t in from_rows.data if t.name == "ablation" and t.xaxis == "x"][0]
    assert list(ablation.x) == [0.0, 1.0]  # refusal_harmful, sorted by alpha
    assert list(ablation.y) == [10.0, 11.0]
    assert list(ablation.error_y.array) == pytest.approx([0.2, 0.2])
    assert list(ablation.error_y.arrayminus) == pytest.approx([0.1, 0.1])


def test_frontier_figure_from_a_result_equals_from_its_rows() -> None:
    from_rows = frontier_figure(ROWS, capability="kl_benign")
    assert frontier_figure(StandIn(ROWS), capability="kl_benign").to_dict() == from_rows.to_dict()
    addition = [t for t in from_rows.data if t.name == "addition"][0]
    assert list(addition.x) == [3.0, 4.0] and list(addition.y) == [0.0, 1.0]


def test_write_report_figures_takes_a_result(tmp_path) -> None:
    written = write_report_figures(tmp_path, StandIn(ROWS))
    assert sorted(path.name for path in written) == [
        "frontier_helpfulness.html", "frontier_kl.html", "frontier_mmlu.html", "sweep.html",
    ]  # fmt: skip
    assert all(path.stat().st_size > 0 for path in written)
