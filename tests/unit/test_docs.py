"""The documentation stays true to the repository: generated pages (API, configuration,
the client's sample digits), links, the two commands."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitscope_server.settings import ServerSettings
from vitscope_server.settings_flags import env_name

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


def _run_tool(name: str, *args: str) -> None:
    """Runs tools/NAME.py as `make` does, with this checkout's packages importable."""
    subprocess.run(
        [sys.executable, str(REPO / "tools" / f"{name}.py"), *args],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        check=True,
        timeout=120,
    )


def test_configuration_page_is_current(tmp_path: Path) -> None:
    _run_tool("settings_docs", str(tmp_path / "configuration.md"))
    page = (REPO / "docs" / "configuration.md").read_text()
    assert page == (tmp_path / "configuration.md").read_text(), (
        "stale docs/configuration.md: run `make docs`"
    )
    for name in ServerSettings.model_fields:
        assert f"`{env_name(name)}`" in page


def test_client_samples_are_the_first_test_digit_of_each_class(tmp_path: Path) -> None:
    _run_tool("export_samples", "--out", str(tmp_path))
    committed = REPO / "client" / "vitscope" / "samples"
    written = sorted(p.name for p in tmp_path.glob("*.png"))
    assert written == sorted(p.name for p in committed.glob("*.png")), "run `make samples`"
    for name in written:
        with Image.open(tmp_path / name) as fresh, Image.open(committed / name) as kept:
            np.testing.assert_array_equal(np.asarray(fresh), np.asarray(kept))


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
