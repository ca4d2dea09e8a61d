"""The result rows of a sweep, from either form the figures accept.

A row is one dict of ``results.json``: method, layer, alpha, metric, value, ci_low, ci_high, n,
diff, diff_ci_low, diff_ci_high. Figures take the list of rows itself or any object that holds
it as ``.rows`` (a sweep result), so that no figure has to know the result class.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, TypeAlias

Row: TypeAlias = Mapping[str, Any]


class HasRows(Protocol):
    """A sweep result: anything whose ``.rows`` is the list of result rows."""

    @property
    def rows(self) -> Sequence[Row]: ...


Rows: TypeAlias = Sequence[Row] | HasRows


def as_rows(results: Rows) -> list[Row]:
    """The rows of ``results``: a sequence of rows, or an object holding them as ``.rows``."""
    rows = getattr(results, "rows", results)
    if isinstance(rows, str | bytes | Mapping) or not isinstance(rows, Sequence):
        raise TypeError(
            f"expected the result rows (a list of dicts, as in results.json) or an object with "
            f"them as .rows (a sweep result), got {type(results).__name__}"
        )
    return list(rows)
