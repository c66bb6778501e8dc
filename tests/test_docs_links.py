"""Every relative link of the README, docs/ and bench/RESULTS.md points at a file and heading that exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", ROOT / "bench" / "RESULTS.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _prose_blocks_removed(markdown: str) -> str:
    return re.sub(r"^```.*?^```", "", markdown, flags=re.M | re.S)


def _prose(markdown: str) -> str:
    """``markdown`` without fenced blocks and code spans, where brackets are not links."""
    return re.sub(r"`[^`\n]*`", "", _prose_blocks_removed(markdown))


def anchors(markdown: str) -> set[str]:
    """The ids GitHub gives the headings of ``markdown``."""
    seen: dict[str, int] = {}
    ids = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", _prose_blocks_removed(markdown), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        ids.add(slug if count == 0 else f"{slug}-{count}")
    return ids


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in LINK.findall(_prose(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved.read_text()):
            broken.append(f"{target}: no heading with that anchor in {resolved.relative_to(ROOT)}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    assert broken_links(page) == []


def test_every_docs_page_is_in_the_index() -> None:
    index = (ROOT / "docs" / "README.md").read_text()
    pages = [page.name for page in sorted((ROOT / "docs").glob("*.md")) if page.name != "README.md"]
    unlisted = [name for name in pages if f"({name})" not in index]
    assert unlisted == []


def test_github_anchors() -> None:
    assert anchors("# Title\n## Checked seeks (`worker/media/seeking.py`)\n## Title\n") == {
        "title",
        "checked-seeks-workermediaseekingpy",
        "title-1",
    }
