"""The core never imports grpc, directly or through the client package."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = """
import importlib, pkgutil, sys
import vitscope_server.core as core
for module in pkgutil.walk_packages(core.__path__, core.__name__ + "."):
    importlib.import_module(module.name)
loaded = sorted(m for m in sys.modules if m in ("grpc", "vitscope") or m.startswith(("grpc.", "vitscope.")))
print(",".join(loaded))
"""


def test_core_modules_import_neither_grpc_nor_the_client() -> None:
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
        check=True,
    )
    assert result.stdout.strip() == ""
