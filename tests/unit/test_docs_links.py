"""Every Markdown link to a local path in README.md and docs/*.md points at a file that exists
(and, for a link into a Markdown file with a #fragment, at a heading of that file) (issue #16)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^[ \t]*(```|~~~).*?^[ \t]*\1", flags=re.M | re.S)
# [text](target) or [text](target "title"); the text may hold `code` and span lines.
_LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", flags=re.I)  # http:, https:, mailto:, ...


def _prose(text: str) -> str:
    """The text without its fenced code blocks (a link inside one is an example, not a link)."""
    return _FENCE.sub("", text)


def local_links(page: Path) -> list[str]:
    targets = []
    for target in _LINK.findall(_prose(page.read_text())):
        if not _EXTERNAL.match(target):
            targets.append(target)
    return targets


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", _prose(page.read_text()), flags=re.M)
    slugs: set[str] = set()
    for heading in headings:
        slug, n = github_slug(heading), 1
        while slug in slugs:  # GitHub numbers repeated headings: slug, slug-1, ...
            slug, n = f"{github_slug(heading)}-{n}", n + 1
        slugs.add(slug)
    return slugs


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in local_links(page):
        path, _, fragment = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target} (no such file: {resolved})")
        elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            broken.append(f"{target} (no heading #{fragment} in {resolved.name})")
    return broken


def test_the_pages_exist() -> None:
    names = {page.name for page in PAGES}
    assert {
        "README.md",
        "pipeline.md",
        "results.md",
        "organism.md",
        "mechanistic.md",
        "development.md",
        "glossary.md",
    } <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(ROOT).as_posix())
def test_every_local_link_resolves(page: Path) -> None:
    assert local_links(page) or page.name == "glossary.md", f"{page.name} links to nothing"
    assert broken_links(page) == []


def test_the_readme_links_every_docs_page() -> None:
    linked = {
        (ROOT / target.partition("#")[0]).resolve() for target in local_links(ROOT / "README.md")
    }
    assert [page.name for page in PAGES[1:] if page.resolve() not in linked] == []


def test_a_broken_link_is_found(tmp_path: Path) -> None:
    (tmp_path / "there.md").write_text("# A heading\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](there.md) [ok](there.md#a-heading) [web](https://example.org/x.md)\n"
        "```\n[in code](missing-in-code.md)\n```\n"
        "[gone](missing.md) [`gone`](sub/missing.txt) [anchor](there.md#no-such-heading)\n"
    )
    assert [entry.split(" ")[0] for entry in broken_links(page)] == [
        "missing.md",
        "sub/missing.txt",
        "there.md#no-such-heading",
    ]


@pytest.mark.parametrize(
    ("heading", "slug"),
    [
        ("Gemma 3 270M base (the earlier main job)", "gemma-3-270m-base-the-earlier-main-job"),
        (
            "Output directories, interrupting and `--fresh`",
            "output-directories-interrupting-and---fresh",
        ),
        ("Judging, intervals and result columns", "judging-intervals-and-result-columns"),
    ],
)
def test_github_slug(heading: str, slug: str) -> None:
    assert github_slug(heading) == slug


def test_docs_pages_quote_the_current_results_tables(tmp_path) -> None:
    """Every results table a page quotes equals the table in the report.md it cites
    (examples/sync_docs_tables.py); a stale copy is caught."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "examples" / "sync_docs_tables.py"
    spec = importlib.util.spec_from_file_location("sync_docs_tables", path)
    sync = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sync)
    assert sync.stale_pages() == []
    quoted = [page for page in sync.PAGES if "<!-- results-table:" in page.read_text()]
    assert len(quoted) >= 2
    report = tmp_path / "run" / "report.md"
    report.parent.mkdir()
    report.write_text("# r\n\n| method | layer |\n|---|---|\n| addition | 3 |\n\nafter\n")
    page = tmp_path / "page.md"
    page.write_text("x\n<!-- results-table: run/report.md -->\n| method | layer |\n|---|---|\n| addition | 2 |\n<!-- /results-table -->\n")
    assert "| addition | 3 |" in sync.synced(page) and "| addition | 2 |" not in sync.synced(page)
