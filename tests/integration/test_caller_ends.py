"""A call its caller ends (its deadline passes, or it cancels) at any point of a streaming
RPC is the caller's doing: the server logs it at info level and counts it under
DEADLINE_EXCEEDED or CANCELLED in vitscope_requests_total, never as INTERNAL.

The counters are read from the server's Prometheus endpoint; every wait is on the server's
metrics or on the stream's own messages.
"""

from __future__ import annotations

import logging
import threading
import urllib.request
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.servers import start
from support.waiting import wait_until

from vitscope.tensors import to_proto
from vitscope.v1 import activations_pb2 as apb
from vitscope.v1 import common_pb2
from vitscope.v1 import features_pb2 as fpb
from vitscope.v1 import inspector_pb2_grpc as pb_grpc
from vitscope_server.transport.app import RunningServer

MODEL = "vitscope-digits"
DIGIT = common_pb2.Image(pixels=to_proto(np.zeros((28, 28), np.uint8)))


def _requests(server: RunningServer, method: str) -> dict[str, float]:
    """vitscope_requests_total of one method on the model, by code, as Prometheus reads it."""
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    body = urllib.request.urlopen(url, timeout=10).read().decode()
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            labels = sample.labels
            ours = labels.get("method") == method and labels.get("model") == MODEL
            if sample.name == "vitscope_requests_total" and ours:
                counts[labels["code"]] = sample.value
    return counts


def _counted(server: RunningServer, method: str, code: str, before: dict[str, float]) -> bool:
    return _requests(server, method).get(code, 0) > before.get(code, 0)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A server of this module's own: its counters and gauges see only these calls."""
    running = start(tmp_path_factory.mktemp("caller-ends"), [], default_model=MODEL)
    yield running
    running.stop(0)


@pytest.fixture
def stub(server: RunningServer) -> Iterator[pb_grpc.InspectorStub]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.InspectorStub(channel)


def _first_upload() -> apb.TopActivatingImagesRequest:
    return apb.TopActivatingImagesRequest(
        model=MODEL, site="blocks.0.out", channels=[0], top_k=1, images=[DIGIT]
    )


def _assert_quiet(caplog: pytest.LogCaptureFixture, code: str) -> None:
    """Logged at info level as the caller's end; nothing at error level."""
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert f"call ended by its caller: {code}" in caplog.text, caplog.text


def test_a_deadline_passing_between_two_uploads(
    server: RunningServer, stub: pb_grpc.InspectorStub, caplog: pytest.LogCaptureFixture
) -> None:
    method = "TopActivatingImages"
    before = _requests(server, method)
    counted = threading.Event()

    def uploads() -> Iterator[apb.TopActivatingImagesRequest]:
        yield _first_upload()
        counted.wait(60)  # the second message is held back past the deadline

    with caplog.at_level(logging.INFO):
        with pytest.raises(grpc.RpcError) as caught:
            stub.TopActivatingImages(uploads(), timeout=1.0)
        wait_until(lambda: _counted(server, method, "DEADLINE_EXCEEDED", before), "the count")
        counted.set()
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert _requests(server, method).get("INTERNAL", 0) == before.get("INTERNAL", 0)
    _assert_quiet(caplog, "DEADLINE_EXCEEDED")


def test_a_cancel_between_two_uploads(
    server: RunningServer, stub: pb_grpc.InspectorStub, caplog: pytest.LogCaptureFixture
) -> None:
    method = "TopActivatingImages"
    before = _requests(server, method)
    cancelled = threading.Event()
    first_sent = threading.Event()

    def uploads() -> Iterator[apb.TopActivatingImagesRequest]:
        yield _first_upload()
        first_sent.set()
        cancelled.wait(60)

    in_flight = server.metrics.in_flight.labels(method)
    # Calls of the method still finishing from earlier tests must not pass for this one.
    already = in_flight._value.get()
    with caplog.at_level(logging.INFO):
        call = stub.TopActivatingImages.future(uploads())
        assert first_sent.wait(60)
        wait_until(lambda: in_flight._value.get() > already, "arrival")
        call.cancel()
        cancelled.set()
        wait_until(lambda: _counted(server, method, "CANCELLED", before), "the count")
    assert _requests(server, method).get("INTERNAL", 0) == before.get("INTERNAL", 0)
    _assert_quiet(caplog, "CANCELLED")


def _long_optimization() -> fpb.OptimizeFeaturesRequest:
    return fpb.OptimizeFeaturesRequest(
        model=MODEL,
        features=[fpb.Feature(site="blocks.0.out", channel=0)],
        parameters=fpb.OptimizationParameters(steps=100_000, copies=1),
        progress_every=1,
    )


def test_a_cancel_in_the_middle_of_a_response_stream(
    server: RunningServer, stub: pb_grpc.InspectorStub
) -> None:
    method = "OptimizeFeatures"
    before = _requests(server, method)
    responses = stub.OptimizeFeatures(_long_optimization(), timeout=120)
    next(responses)  # the first progress message: the stream is under way
    responses.cancel()
    wait_until(lambda: _counted(server, method, "CANCELLED", before), "the count")
    assert _requests(server, method).get("INTERNAL", 0) == before.get("INTERNAL", 0)


def test_a_deadline_in_the_middle_of_a_response_stream(
    server: RunningServer, stub: pb_grpc.InspectorStub
) -> None:
    method = "OptimizeFeatures"
    before = _requests(server, method)
    responses = stub.OptimizeFeatures(_long_optimization(), timeout=1.0)
    with pytest.raises(grpc.RpcError) as caught:
        for _ in responses:
            pass
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: _counted(server, method, "DEADLINE_EXCEEDED", before), "the count")
    assert _requests(server, method).get("INTERNAL", 0) == before.get("INTERNAL", 0)
