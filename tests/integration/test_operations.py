"""Health, reflection, metrics, auth, TLS, deadlines, cancellation, load shedding and shutdown."""

from __future__ import annotations

import datetime
import io
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from PIL import Image
from support.server_process import free_port
from support.waiting import HANG_SECONDS, sample, wait_until

from vitscope import (
    CancelledError,
    Client,
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from vitscope.v1 import activations_pb2, common_pb2, tensor_pb2
from vitscope.v1 import inspector_pb2_grpc as pb_grpc
from vitscope_server.settings import ServerSettings
from vitscope_server.transport.app import RunningServer, create_server

REPO = Path(__file__).resolve().parents[2]


def local_server(**overrides: object) -> RunningServer:
    """A server on loopback, an ephemeral port and no metrics endpoint."""
    settings = ServerSettings(host="127.0.0.1", port=0, metrics_port=-1, **overrides)  # type: ignore[arg-type]
    return create_server(settings)


def test_health_overall_and_per_model(client: Client) -> None:
    assert client.health() == "SERVING"
    assert client.health("vitscope.v1.Inspector") == "SERVING"
    for name in ("vit", "deit", "swin", "clip"):
        assert client.health(name) == "SERVING"


def test_list_and_describe(client: Client) -> None:
    models = {m.name: m for m in client.list_models()}
    assert {"vit", "deit", "swin", "clip", "vitscope-digits-random"} <= set(models)
    assert models["vit"].is_default and models["vit"].state == "ready"
    deit = client.describe("deit")
    assert deit.prefix_token_count == 2 and deit.grid == (4, 4) and deit.block_count == 2
    assert deit.input_size == (3, 64, 64) and len(deit.class_names) == 7
    assert deit.sites["blocks.1.mlp.hidden"]["shape"] == ["1", "18", "192"]
    assert deit.sites["blocks.0.attn.probs"]["layout"] == "SITE_LAYOUT_ATTENTION"
    swin = client.describe("swin")
    assert swin.prefix_token_count == 0 and swin.sites["blocks.2.out"]["grid_height"] == 8
    clip = client.describe("clip")
    assert clip.class_names == [] and clip.prefix_token_count == 1
    assert clip.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))


def test_reflection_lists_the_service_with_grpcurl(server: RunningServer) -> None:
    grpcurl = Path(sys.executable).parent / "grpcurl"
    listed = subprocess.run(
        [str(grpcurl), "-plaintext", f"127.0.0.1:{server.port}", "list"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 0, listed.stderr
    assert "vitscope.v1.Inspector" in listed.stdout.split()
    assert "grpc.health.v1.Health" in listed.stdout.split()
    described = subprocess.run(
        [
            str(grpcurl),
            "-plaintext",
            f"127.0.0.1:{server.port}",
            "describe",
            "vitscope.v1.Inspector",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "rpc GetActivations" in described.stdout


def test_metrics_endpoint(server: RunningServer, client: Client) -> None:
    client.list_models()
    with pytest.raises(NotFoundError):
        client.describe("not-served-7")
    with pytest.raises(InvalidArgumentError):
        client.activations([b"junk"], ["embed"], model="vit")
    # Bad images fail before queueing; a good call records queue wait and compute time.
    client.activations([np.zeros((8, 8, 3), np.uint8)], ["embed"], model="vit")
    body = (
        urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10)
        .read()
        .decode()
    )
    assert 'vitscope_requests_total{code="OK",method="ListModels",model="vit"}' in body
    assert (
        'vitscope_requests_total{code="INVALID_ARGUMENT",method="GetActivations",model="vit"}'
        in body
    )
    for name in (
        "vitscope_request_duration_seconds_bucket",
        "vitscope_queue_wait_seconds_bucket",
        "vitscope_compute_seconds_bucket",
        "vitscope_sent_bytes_total",
        "vitscope_requests_in_flight",
        'vitscope_model_load_seconds{model="swin"}',
        'vitscope_model_ready{model="clip"} 1.0',
        'vitscope_requests_total{code="NOT_FOUND",method="DescribeModel",model="unknown"}',
    ):
        assert name in body, name


def test_every_stage_of_a_get_activations_call_is_recorded(
    server: RunningServer, client: Client
) -> None:
    """Each stage's histogram counts the call (decode, as the image comes encoded)."""
    stages = ("decode", "preprocess", "forward", "reduce", "device_to_host", "encode", "send")
    labels = {"method": "GetActivations", "model": "vit"}
    before = {s: sample(server, f"vitscope_{s}_seconds_count", **labels) for s in stages}
    encoded = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(encoded, format="PNG")
    client.activations([encoded.getvalue()], ["blocks.0.out"], model="vit")
    for stage in stages:
        counted = sample(server, f"vitscope_{stage}_seconds_count", **labels)
        assert counted == before[stage] + 1, stage


def test_stubs_match_the_protos(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(REPO / "proto" / "generate.py"), "--out", str(tmp_path)],
        check=True,
        timeout=120,
    )
    generated = sorted((tmp_path / "vitscope").glob("*/*_pb2*"))
    assert {path.parent.name for path in generated} == {"v1", "oip"}
    for path in generated:
        committed = REPO / "client" / path.relative_to(tmp_path)
        assert path.read_bytes() == committed.read_bytes(), f"{path.name} drifted: run make proto"


# --- auth and TLS -----------------------------------------------------------------


@pytest.fixture(scope="module")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = local_server(auth_token="s3cret", max_workers=4)
    assert running.registry.wait_until_settled(60)
    yield running
    running.stop(0)


def test_bearer_token(token_server: RunningServer) -> None:
    target = f"127.0.0.1:{token_server.port}"
    with Client(target) as anonymous, pytest.raises(UnauthenticatedError) as caught:
        anonymous.list_models()
    assert caught.value.reason == "TOKEN_INVALID"
    with Client(target, token="wrong") as wrong, pytest.raises(UnauthenticatedError):
        wrong.activations([np.zeros((28, 28), np.uint8)], ["embed"])
    with Client(target) as anonymous:
        assert anonymous.health() == "SERVING"
    with Client(target, token="s3cret") as good:
        assert good.list_models()[0].name.startswith("vitscope-digits")


def _certificate(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple | None, ca: bool
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, issuer_key = (issuer[0].subject, issuer[1]) if issuer else (name, key)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        import ipaddress

        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write_pair(
    folder: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> None:
    (folder / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / f"{stem}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def test_mutual_tls(tmp_path: Path) -> None:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("vitscope-test-ca", ca_key, None, ca=True)
    _write_pair(tmp_path, "ca", ca, ca_key)
    for stem in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        _write_pair(tmp_path, stem, _certificate(stem, key, (ca, ca_key), ca=False), key)
    running = local_server(
        tls_cert=tmp_path / "server.crt",
        tls_key=tmp_path / "server.key",
        tls_client_ca=tmp_path / "ca.crt",
        max_workers=4,
    )
    try:
        assert running.registry.wait_until_settled(60)
        target = f"localhost:{running.port}"
        with Client(
            target,
            ca_cert=tmp_path / "ca.crt",
            client_cert=tmp_path / "client.crt",
            client_key=tmp_path / "client.key",
        ) as trusted:
            assert trusted.health() == "SERVING"
            assert trusted.list_models()
        no_client_cert = Client(target, ca_cert=tmp_path / "ca.crt", retries=2, timeout=5)
        with no_client_cert, pytest.raises(UnavailableError):
            no_client_cert.list_models()
        with Client(target, retries=2, timeout=5) as plaintext, pytest.raises(UnavailableError):
            plaintext.list_models()
    finally:
        running.stop(0)


# --- deadlines, cancellation, load shedding --------------------------------------


@pytest.fixture(scope="module")
def heavy_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One compute slot, one queue place, a model slow enough on CPU to interrupt."""
    running = local_server(
        builtin_models=False,
        models=["base=timm:vit_base_patch16_224@random", "tiny=timm:test_vit@random"],
        default_model="base",
        max_running=1,
        max_queue=1,
        max_workers=8,
    )
    assert running.registry.wait_until_settled(120)
    yield running
    running.stop(0)


def _preprocessed(batch: int, size: int = 224) -> list[np.ndarray]:
    return [
        np.random.default_rng(i).standard_normal((3, size, size)).astype(np.float32)
        for i in range(batch)
    ]


def _slow_request(batch: int = 24) -> activations_pb2.GetActivationsRequest:
    images = [
        common_pb2.Image(
            preprocessed=tensor_pb2.Tensor(
                dtype=tensor_pb2.DTYPE_FLOAT32, shape=[3, 224, 224], data=a.tobytes()
            )
        )
        for a in _preprocessed(batch)
    ]
    return activations_pb2.GetActivationsRequest(
        model="base",
        sites=["blocks.11.out"],
        images=images,
        reduction=activations_pb2.REDUCTION_MEAN,
    )


def _in_flight(server: RunningServer) -> float:
    return sample(server, "vitscope_requests_in_flight", method="GetActivations")


class HeldForward:
    """Holds the next forward of `model` after its first block until released, and counts
    how often its last block starts: work that was stopped never reaches it."""

    def __init__(self, server: RunningServer, model: str) -> None:
        adapter = server.registry.get(model).adapter
        self.first = adapter.root.get_submodule(adapter.blocks[0].path)
        self.last = adapter.root.get_submodule(adapter.blocks[-1].path)
        self.entered, self.released = threading.Event(), threading.Event()
        self.last_block_runs = 0

    def _hold(self, *_: object) -> None:
        if not self.released.is_set():
            self.entered.set()
            assert self.released.wait(HANG_SECONDS), "the test never released the forward"

    def _count(self, *_: object) -> None:
        self.last_block_runs += 1

    def __enter__(self) -> HeldForward:
        self._handles = [
            self.first.register_forward_hook(self._hold),
            self.last.register_forward_pre_hook(self._count),
        ]
        return self

    def __exit__(self, *_: object) -> None:
        self.released.set()
        for handle in self._handles:
            handle.remove()


def _tiny_call_is_served(target: str) -> None:
    with Client(target, timeout=60) as c:
        assert c.activations(_preprocessed(1, 160), ["embed"], model="tiny").sites


def test_deadline_stops_the_work(heavy_server: RunningServer) -> None:
    target = f"127.0.0.1:{heavy_server.port}"
    with HeldForward(heavy_server, "base") as held:
        with Client(target) as c, pytest.raises(DeadlineExceededError):
            c.activations(
                _preprocessed(24), ["blocks.11.out"], model="base", reduction="mean", timeout=1.0
            )
        # Expired in its first block (held there) or before: either way it must stop.
        held.released.set()
        wait_until(lambda: _in_flight(heavy_server) == 0, "the expired call to return")
        assert held.last_block_runs == 0, "the expired forward ran to its last block"
    _tiny_call_is_served(target)
    with Client(target) as c:
        assert c.health("base") == "SERVING"


def test_cancellation_stops_the_work_and_queue_overflow_is_refused(
    heavy_server: RunningServer,
) -> None:
    target = f"127.0.0.1:{heavy_server.port}"
    queued = "vitscope_queued_requests"
    with HeldForward(heavy_server, "base") as held, grpc.insecure_channel(target) as channel:
        stub = pb_grpc.InspectorStub(channel)
        running_call = stub.GetActivations(_slow_request(), timeout=120)
        wait_until(held.entered.is_set, "the first call's forward")
        waiting_call = stub.GetActivations(_slow_request(), timeout=120)
        wait_until(lambda: sample(heavy_server, queued) == 1, "the second call to queue")
        with Client(target, retries=1) as c, pytest.raises(ResourceExhaustedError) as caught:
            c.activations(_preprocessed(1), ["embed"], model="base")
        assert caught.value.reason == "QUEUE_FULL"
        with Client(target, timeout=2, retries=1) as c:
            assert c.health() == "SERVING"  # answered while compute is saturated
        running_call.cancel()
        waiting_call.cancel()
        wait_until(lambda: sample(heavy_server, queued) == 0, "the queued call to leave")
        held.released.set()
        wait_until(lambda: _in_flight(heavy_server) == 0, "both calls to return")
        assert held.last_block_runs == 0, "a cancelled forward ran to its last block"
    _tiny_call_is_served(target)


def test_cancelled_error_class_maps_from_status() -> None:
    from vitscope.errors import from_rpc_error

    class FakeCall(grpc.RpcError, grpc.Call):  # a status as the channel reports it
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.CANCELLED

        def details(self) -> str:
            return "gone"

        def initial_metadata(self) -> None: ...
        def trailing_metadata(self) -> None: ...
        def is_active(self) -> bool:
            return False

        def time_remaining(self) -> None: ...
        def cancel(self) -> None: ...
        def add_callback(self, callback: object) -> None: ...

    assert isinstance(from_rpc_error(FakeCall()), CancelledError)


def test_stop_drains_in_flight_work_within_grace() -> None:
    running = local_server(
        builtin_models=False,
        models=["tiny=timm:test_vit@random"],
        max_workers=4,
    )
    assert running.registry.wait_until_settled(60)
    target = f"127.0.0.1:{running.port}"
    outcome: dict[str, object] = {}

    def call() -> None:
        with Client(target, timeout=60) as c:
            outcome["result"] = c.activations(
                _preprocessed(32, 160), ["blocks.5.out"], model="tiny", reduction="mean"
            )

    worker = threading.Thread(target=call)
    worker.start()
    wait_until(lambda: _in_flight(running) == 1, "the call to be in flight")
    running.stop(grace=30)
    worker.join(60)
    assert outcome["result"].sites["blocks.5.out"].values.shape == (32, 64)  # type: ignore[attr-defined]
    with Client(target, timeout=3, retries=2) as c, pytest.raises(UnavailableError):
        c.list_models()


@pytest.mark.parametrize("loading", [False, True], ids=["idle", "while-loading"])
def test_sigterm_drains_and_exits_cleanly(loading: bool, tmp_path: Path) -> None:
    """SIGTERM drains and exits 0, also while a model is still loading (that load cannot be
    interrupted: the process must neither hang nor abort in the interpreter's finalisation)."""
    port = free_port()
    command = [sys.executable, "-m", "vitscope_server.cli", "serve", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--metrics-port=-1", "--grace-seconds", "5"]
    if loading:
        # Takes well over the 5 s the server waits for a running load, even on a fast machine;
        # no drain delay, so that SIGTERM reaches the load while it runs.
        command += ["--models", "huge=timm:vit_huge_patch14_224@random"]
        command += ["--drain-delay-seconds", "0"]
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            command,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 90
        with Client(f"127.0.0.1:{port}", timeout=2) as c:
            while True:
                assert process.poll() is None, log_path.read_text()
                try:
                    serving = c.health() == "SERVING"
                except (UnavailableError, DeadlineExceededError):
                    # Refused connections are retried with backoff until the deadline.
                    serving = False
                if serving and (not loading or b"loading model huge" in log_path.read_bytes()):
                    break
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log_path.read_text()
        log = log_path.read_bytes()
        assert b"draining" in log
        assert (
            b"still loading" if loading else b"INFO vitscope_server.transport.app: stopped"
        ) in log
    finally:
        process.kill()
        process.wait()


def test_client_retries_while_a_model_loads() -> None:
    running = local_server(
        builtin_models=False,
        models=["base=timm:vit_base_patch16_224@random"],
        max_workers=4,
    )
    try:
        with Client(f"127.0.0.1:{running.port}", retries=5, timeout=60) as c:
            assert c.describe("base").block_count == 12
        counts = {
            sample.labels["code"]: sample.value
            for metric in running.metrics.requests.collect()
            for sample in metric.samples
            if sample.name == "vitscope_requests_total"
        }
        assert counts.get("UNAVAILABLE", 0) >= 1 and counts["OK"] == 1
    finally:
        running.stop(0)
