"""The documentation stays true to the repository: generated API page, links, the two commands."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def links(page: Path) -> list[str]:
    """Markdown link targets outside fenced code."""
    return LINK.findall(FENCE.sub("", page.read_text()))


def github_anchor(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_api_reference_matches_the_protos(tmp_path: Path) -> None:
    out = tmp_path / "api.md"
    subprocess.run(
        [sys.executable, str(REPO / "proto" / "docgen.py"), "--out", str(out)],
        check=True,
        timeout=120,
    )
    committed = REPO / "docs" / "api.md"
    assert out.read_text() == committed.read_text(), "docs/api.md drifted: run make docs"


def anchors(page: Path) -> set[str]:
    """The fragments GitHub gives the page's headings."""
    text = FENCE.sub("", page.read_text())
    return {github_anchor(h) for h in re.findall(r"^#+ (.+)$", text, re.MULTILINE)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page: Path) -> None:
    """Every relative link names a file that exists, and a heading of it when it has a #."""
    broken = []
    for target in links(page):
        if re.match(r"[a-z]+:", target):
            continue
        name, _, fragment = target.partition("#")
        path = page.parent / name if name else page
        heading_missing = fragment and path.suffix == ".md" and fragment not in anchors(path)
        if not path.exists() or heading_missing:
            broken.append(target)
    assert not broken, f"{page.name}: links to missing files or headings: {broken}"


def test_readme_keeps_the_two_commands() -> None:
    readme = (REPO / "README.md").read_text()
    assert "make serve" in readme
    assert "make test" in readme
