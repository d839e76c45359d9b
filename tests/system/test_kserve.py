"""deploy/kserve: vitscope as a KServe predictor speaking gRPC v2.

Rendered with `kubectl kustomize`, checked field by field against the KServe SDK's
models (in the external-clients virtualenv), and held to the Deployment's probes,
security context and shutdown timing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from support.external_clients import run_external
from support.manifests import (
    DEPLOY,
    container_of,
    kustomize,
    only,
    render,
    settings_from,
)

from vitscope_server.core.model.specs import load_models_file

KSERVE = DEPLOY / "kserve"
OVERLAYS = {"cpu": "cpu", "gpu": "cuda"}


def kserve_docs(overlay: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(kustomize(KSERVE / "overlays" / overlay)) if d]


def runtime_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    runtime = only(docs, "ServingRuntime", "vitscope")
    (container,) = runtime["spec"]["containers"]
    return container


def quantities(resources: dict[str, dict[str, Any]]) -> dict[str, dict[str, str]]:
    return {kind: {k: str(v) for k, v in values.items()} for kind, values in resources.items()}


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_manifests_match_the_kserve_sdk_models(overlay: str, tmp_path: Path) -> None:
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(kustomize(KSERVE / "overlays" / overlay))
    result = run_external("validate_kserve.py", str(rendered))
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    assert "checked ServingRuntime/vitscope" in result.stdout
    assert "checked InferenceService/vitscope" in result.stdout


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_predictor_serves_grpc_v2_with_the_runtime(overlay: str) -> None:
    docs = kserve_docs(overlay)
    runtime = only(docs, "ServingRuntime", "vitscope")["spec"]
    service = only(docs, "InferenceService", "vitscope")["spec"]["predictor"]
    assert "grpc-v2" in runtime["protocolVersions"]
    assert service["model"]["protocolVersion"] == "grpc-v2"
    assert service["model"]["runtime"] == "vitscope"
    formats = {f["name"] for f in runtime["supportedModelFormats"]}
    assert service["model"]["modelFormat"]["name"] in formats
    container = runtime_container(docs)
    settings = settings_from(container)
    assert settings.device == OVERLAYS[overlay]
    (port,) = container["ports"]
    assert port["name"] == "h2c" and port["containerPort"] == settings.port
    # The web explorer is off behind KServe unless an overlay asks for it.
    assert settings.ui_port == -1


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_models_come_from_the_config_map(overlay: str, tmp_path: Path) -> None:
    docs = kserve_docs(overlay)
    container = runtime_container(docs)
    settings = settings_from(container)
    mount = next(
        m for m in container["volumeMounts"] if m["mountPath"] == str(settings.models_file)
    )
    volumes = only(docs, "ServingRuntime", "vitscope")["spec"]["volumes"]
    volume = next(v for v in volumes if v["name"] == mount["name"])
    config_map = only(docs, "ConfigMap", volume["configMap"]["name"])
    models_file = tmp_path / "models.yaml"
    models_file.write_text(config_map["data"][mount["subPath"]])
    assert all(spec.weights == "random" for spec in load_models_file(models_file).models)


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_probes_security_and_shutdown_match_the_deployment(overlay: str) -> None:
    docs = kserve_docs(overlay)
    container = runtime_container(docs)
    deployment_docs = render(overlay)
    native = container_of(deployment_docs)
    port = container["ports"][0]["containerPort"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        expected = {**native[probe], "grpc": {"port": port}}
        assert container[probe] == expected, probe
    assert container["lifecycle"] == native["lifecycle"]
    assert native["securityContext"].items() <= container["securityContext"].items()
    assert quantities(container["resources"]) == quantities(native["resources"])
    pod = only(deployment_docs, "Deployment", "vitscope")["spec"]["template"]["spec"]
    predictor = only(docs, "InferenceService", "vitscope")["spec"]["predictor"]
    assert predictor["securityContext"] == pod["securityContext"]
    settings = settings_from(container)
    drain = settings.drain_delay_seconds + settings.grace_seconds
    sleep = float(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert predictor["terminationGracePeriodSeconds"] == pod["terminationGracePeriodSeconds"]
    assert predictor["terminationGracePeriodSeconds"] > drain + sleep
    annotations = only(docs, "InferenceService", "vitscope")["metadata"]["annotations"]
    assert annotations["prometheus.kserve.io/port"] == str(settings_from(container).metrics_port)
