"""Virtualenvs of their own for packages this project did not write and whose pins clash
with its own: tritonclient and the KServe SDK need protobuf below 7 (the stubs here need 7);
sae-lens pulls transformer-lens, transformers and datasets.

Each is created once beside the test interpreter's environment and reused; a changed
requirement list rebuilds it. A layered environment also sees this project's environment
(a .pth file after its own site-packages), so sae-lens runs on the torch already here
instead of downloading another; what it installs itself comes first.
"""

from __future__ import annotations

import site
import subprocess
import sys
import venv
from dataclasses import dataclass
from pathlib import Path

EXTERNAL = Path(__file__).resolve().parent / "external"


@dataclass(frozen=True)
class Environment:
    name: str
    requirements: tuple[str, ...]
    layered: bool = False

    @property
    def location(self) -> Path:
        return Path(sys.prefix) / self.name


CLIENTS = Environment("external-clients", ("tritonclient[grpc]>=2.50", "kserve>=0.15", "pyyaml>=6"))
SAE_LENS = Environment("sae-lens", ("sae-lens>=6.0,<7",), layered=True)


def _site_packages(python: Path) -> Path:
    found = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(found.stdout.strip())


def external_python(environment: Environment = CLIENTS) -> Path:
    """The environment's python, installing its packages on first use (needs the package index)."""
    python = environment.location / "bin" / "python"
    stamp = environment.location / "requirements.txt"
    wanted = "\n".join(environment.requirements)
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    venv.create(environment.location, with_pip=True, clear=True)
    if environment.layered:
        (_site_packages(python) / "project-environment.pth").write_text(
            "\n".join(site.getsitepackages()) + "\n"
        )
    subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            *environment.requirements,
        ],
        check=True,
        timeout=900,
    )
    stamp.write_text(wanted)
    return python


def run_external(
    script: str, *args: str, environment: Environment = CLIENTS
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(external_python(environment)), str(EXTERNAL / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
