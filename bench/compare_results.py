"""Compare two `results.json` files row by row (same method, alpha and metric).

    python bench/compare_results.py NEW.json SAVED.json

Prints the row counts, how many rows are identical, and the largest differences.
"""

from __future__ import annotations

import json
import sys


def rows(path: str) -> dict[tuple, float]:
    data = json.load(open(path))
    items = data["rows"] if isinstance(data, dict) else data
    return {(r["method"], r["alpha"], r["metric"]): r["value"] for r in items}


def main(new_path: str, saved_path: str) -> None:
    new, saved = rows(new_path), rows(saved_path)
    common = sorted(set(new) & set(saved))
    print(f"rows: {len(new)} new, {len(saved)} saved, {len(common)} in both")
    print(f"identical: {sum(new[k] == saved[k] for k in common)}")
    for gap, key in sorted(((abs(new[k] - saved[k]), k) for k in common), reverse=True)[:5]:
        print(f"  {gap:.2e}  {key}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
