"""Layers: the core never imports grpc or the client; the server never imports the client's
plotting, commands or demo (only its stubs and the wire codec)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from support.probes import fresh_python

PROBE = """
import importlib, pkgutil, sys
import vitscope_server.core as core
for module in pkgutil.walk_packages(core.__path__, core.__name__ + "."):
    importlib.import_module(module.name)
loaded = sorted(m for m in sys.modules if m in ("grpc", "vitscope") or m.startswith(("grpc.", "vitscope.")))
print(",".join(loaded))
"""


def test_core_modules_import_neither_grpc_nor_the_client() -> None:
    result = fresh_python(PROBE)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


SERVER_PROBE = """
import importlib, pkgutil, sys
import vitscope_server as server
for module in pkgutil.walk_packages(server.__path__, server.__name__ + "."):
    importlib.import_module(module.name)
client = sorted(m for m in sys.modules if m.startswith("vitscope.") and not m.startswith("vitscope.v1"))
print(",".join(client))
"""
# The client's presentation: plotting, figures, commands and the demo.
CLIENT_PRESENTATION = re.compile(r"vitscope\.(overlay|figures|plot_\w+|cli(_\w+)?|demo(_\w+)?)$")


def test_server_never_imports_the_clients_plotting_or_commands() -> None:
    result = fresh_python(SERVER_PROBE)
    assert result.returncode == 0, result.stderr
    imported = set(filter(None, result.stdout.strip().split(",")))
    assert "vitscope.tensors" in imported, "the server encodes tensors with the shared codec"
    assert not [m for m in imported if CLIENT_PRESENTATION.match(m)]


MAX_FUNCTION_LINES = 60


def test_no_server_function_is_longer_than_a_screen() -> None:
    server = Path(__file__).resolve().parents[2] / "server"
    long = []
    for path in sorted(server.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(server)}:{node.lineno} {node.name} ({lines})")
    assert not long, long


CORE = Path(__file__).resolve().parents[2] / "server" / "vitscope_server" / "core"
# The shared layers every method family may use; everything else under core is a family.
SHARED_LAYERS = {"model", "runtime"}


def _core_imports(path: Path) -> set[str]:
    """The core subpackages a module imports (vitscope_server.core.<name>...)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        modules = []
        if isinstance(node, ast.ImportFrom) and node.module:
            modules = [node.module]
        elif isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        for module in modules:
            parts = module.split(".")
            if parts[:2] == ["vitscope_server", "core"] and len(parts) > 2:
                names.add(parts[2])
    return names


def test_core_is_split_into_shared_layers_and_families() -> None:
    loose = [p.name for p in CORE.glob("*.py") if p.name != "__init__.py"]
    assert not loose, f"every core module belongs to a layer or a family: {loose}"
    packages = {p.name for p in CORE.iterdir() if (p / "__init__.py").exists()}
    assert packages >= SHARED_LAYERS
    assert {"activations", "features", "projection", "inversion", "explain", "sae"} <= packages


def test_a_family_imports_only_the_shared_layers_and_itself() -> None:
    packages = {p.name for p in CORE.iterdir() if (p / "__init__.py").exists()}
    families = packages - SHARED_LAYERS
    crossing = []
    for family in sorted(packages):
        allowed = SHARED_LAYERS | {family}
        for path in sorted((CORE / family).rglob("*.py")):
            for imported in _core_imports(path) - allowed:
                if family in SHARED_LAYERS and imported in SHARED_LAYERS:
                    continue
                crossing.append(f"{path.relative_to(CORE)} imports core.{imported}")
    assert families, "no method families found"
    assert not crossing, crossing
