"""Code run in a fresh interpreter with this one's import path, to see what a module pulls in
when nothing else has been imported."""

from __future__ import annotations

import os
import subprocess
import sys


def fresh_python(code: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`code` run by a new interpreter of this Python, with its output captured."""
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=environment,
        timeout=timeout,
        check=False,
    )
