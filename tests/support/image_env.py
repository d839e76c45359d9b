"""Subprocesses that can import only what an image installs: the base dependencies and the
extras its Dockerfile names, with their own dependencies. Everything else in the test
environment (pytest, the dev tools, any extra the image lacks) fails to import there, as it
would in the image."""

from __future__ import annotations

import importlib.metadata as metadata
import json
import os
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = (ROOT / "deploy" / "Dockerfile.cpu", ROOT / "deploy" / "Dockerfile.gpu")
_INSTALL = re.compile(r'pip install "\.\[([a-z0-9_,-]+)\]"')

# Every finder answers "not found" for a blocked module, as in an image without it: imports
# raise ModuleNotFoundError and importlib.util.find_spec returns None.
SITECUSTOMIZE = """
import sys
BLOCKED = frozenset({blocked!r})

class _NotInImage:
    def __init__(self, finder):
        self._finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            return None
        return self._finder.find_spec(name, path, target)

    def __getattr__(self, attribute):
        return getattr(self._finder, attribute)

sys.meta_path[:] = [_NotInImage(f) if hasattr(f, "find_spec") else f for f in sys.meta_path]
"""


def image_extras() -> tuple[str, ...]:
    """The extras every Dockerfile installs (the same in each)."""
    found = {tuple(_INSTALL.findall(path.read_text())) for path in DOCKERFILES}
    assert len(found) == 1, f"the Dockerfiles install different extras: {found}"
    (extras,) = found
    assert len(extras) == 1, f"expected one `pip install .[...]` per Dockerfile: {extras}"
    return tuple(extras[0].split(","))


def _requirements(extras: tuple[str, ...]) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


def _closure(requirements: list[Requirement]) -> set[str]:
    """Canonical names of the installed distributions these requirements pull in."""
    seen: set[str] = set()
    pending = list(requirements)
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        if name in seen:
            continue
        seen.add(name)
        try:
            needs = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            continue
        for line in needs:
            nested = Requirement(line)
            extras = ["", *requirement.extras]
            if nested.marker is None or any(nested.marker.evaluate({"extra": e}) for e in extras):
                pending.append(nested)
    return seen


@cache
def blocked_modules() -> frozenset[str]:
    """Top-level modules that only distributions outside the image provide."""
    allowed = _closure(_requirements(image_extras())) | {"vitscope"}
    blocked = set()
    for module, owners in metadata.packages_distributions().items():
        if all(canonicalize_name(owner) not in allowed for owner in owners):
            blocked.add(module)
    return frozenset(blocked - set(sys.stdlib_module_names) - {"vitscope", "vitscope_server"})


def console_script(name: str) -> list[str]:
    """The argv prefix that runs pyproject's console script `name` from this checkout."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, function = scripts[name].partition(":")
    assert function == "main", scripts[name]
    return [sys.executable, "-m", module]


def image_environment(folder: Path) -> dict[str, str]:
    """os.environ for a subprocess that sees only the image's packages (plus this checkout)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        SITECUSTOMIZE.format(blocked=sorted(blocked_modules()))
    )
    path = [str(folder), str(ROOT / "client"), str(ROOT / "server")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), "HF_HUB_OFFLINE": "1"}


RUNNER = """
import importlib, json, sys
module, function, argvs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
main = getattr(importlib.import_module(module), function)
for argv in argvs:
    main(argv)
"""


def run_in_image(
    script: str, argvs: list[list[str]], folder: Path, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Runs console script `script` once per argv, in one process that sees only the image's
    packages; fails the test with its output when it fails."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, function = scripts[script].partition(":")
    result = subprocess.run(
        [sys.executable, "-c", RUNNER, module, function, json.dumps(argvs)],
        env=image_environment(folder / "image-site"),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, f"{script} {argvs} failed:\n{result.stdout}\n{result.stderr}"
    return result
