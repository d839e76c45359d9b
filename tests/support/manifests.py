"""Rendering deploy/: kustomize output, the objects in it, and the settings a pod would run."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml

from vitscope_server.cli import build_parser
from vitscope_server.settings import ServerSettings
from vitscope_server.settings_flags import settings_from_args

ROOT = Path(__file__).resolve().parents[2]


DEPLOY = ROOT / "deploy"


K8S = DEPLOY / "k8s"


CONTAINER = "vitscope"


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail("kubectl is required to render deploy/k8s (kubectl kustomize); install it")
    return path


@cache
def kustomize(folder: Path) -> str:
    result = subprocess.run(
        [kubectl(), "kustomize", str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"kubectl kustomize {folder} failed:\n{result.stderr}"
    return result.stdout


def rendered_text(overlay: str) -> str:
    return kustomize(K8S / "overlays" / overlay)


def render(overlay: str) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(rendered_text(overlay)) if d]
    assert docs, f"overlay {overlay} renders nothing"
    return docs


def only(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container_of(docs: list[dict[str, Any]]) -> dict[str, Any]:
    pod = only(docs, "Deployment", "vitscope")["spec"]["template"]["spec"]
    found = [c for c in pod["containers"] if c["name"] == CONTAINER]
    assert len(found) == 1
    return found[0]


def settings_from(container: dict[str, Any]) -> ServerSettings:
    """ServerSettings as `vitscope-server serve` builds them in the pod, from its args and env."""
    args = build_parser().parse_args(["serve", *container.get("args", [])])
    assert args.command == "serve"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VITSCOPE_")}
    with mock.patch.dict(os.environ, {**env, **container_env(container)}, clear=True):
        return settings_from_args(args, ServerSettings)


def cpu_limit(container: dict[str, Any]) -> int:
    quantity = str(container["resources"]["limits"]["cpu"])
    cores = int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)
    return math.ceil(cores)


def container_env(container: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the kubelet would set it (resource refs resolved)."""
    env = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
            continue
        source = item["valueFrom"]
        if "secretKeyRef" in source or "configMapKeyRef" in source:
            continue  # test_referenced_keys_exist checks those
        ref = source.get("resourceFieldRef")
        assert ref is not None, f"env {item['name']}: unexpected source {source}"
        assert ref["resource"] == "limits.cpu" and str(ref.get("divisor", "1")) == "1"
        env[item["name"]] = str(cpu_limit(container))
    return env
