"""Copy each run's results table from its report.md into the docs pages that quote it.

    python examples/sync_docs_tables.py          # rewrite the quoted tables
    python examples/sync_docs_tables.py --check  # exit 1 if a page quotes a stale table

A page quotes a table between ``<!-- results-table: RUN/report.md -->`` and
``<!-- /results-table -->`` (the path relative to the page). tests/unit/test_docs_links.py runs
the check, so a page cannot drift from the run it cites.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGES = (REPO / "README.md", *sorted((REPO / "docs").glob("*.md")))
MARKER = re.compile(r"(<!-- results-table: (?P<path>\S+) -->\n)(?P<body>.*?)(<!-- /results-table -->)", re.S)


def report_table(report: Path) -> str:
    """The results table of a report.md: its lines from the ``| method |`` header on."""
    lines = report.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| method |"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join(lines[start:end]) + "\n"


def synced(page: Path) -> str:
    text = page.read_text()
    return MARKER.sub(lambda m: m.group(1) + report_table(page.parent / m.group("path")) + m.group(4), text)


def stale_pages() -> list[Path]:
    return [page for page in PAGES if synced(page) != page.read_text()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_pages()
        for page in stale:
            print(f"{page.relative_to(REPO)} quotes a stale results table: run examples/sync_docs_tables.py")
        return 1 if stale else 0
    for page in PAGES:
        text = synced(page)
        if text != page.read_text():
            page.write_text(text)
            print(f"updated {page.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
