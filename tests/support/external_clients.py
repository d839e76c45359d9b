"""A virtualenv of its own for clients this project did not write and whose pins clash
with its own (tritonclient and the KServe SDK need protobuf below 7; the stubs here need 7).

Created once beside the test interpreter's environment and reused; a changed requirement
list rebuilds it.
"""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

REQUIREMENTS = ["tritonclient[grpc]>=2.50", "kserve>=0.15", "pyyaml>=6"]
LOCATION = Path(sys.prefix) / "external-clients"
EXTERNAL = Path(__file__).resolve().parent / "external"


def external_python() -> Path:
    """The environment's python, installing the clients on first use (needs the package index)."""
    python = LOCATION / "bin" / "python"
    stamp = LOCATION / "requirements.txt"
    wanted = "\n".join(REQUIREMENTS)
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    venv.create(LOCATION, with_pip=True, clear=True)
    subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            *REQUIREMENTS,
        ],
        check=True,
        timeout=900,
    )
    stamp.write_text(wanted)
    return python


def run_external(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(external_python()), str(EXTERNAL / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
