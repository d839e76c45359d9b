"""A client that stops reading a stream holds neither compute nor memory: progress coalesces,
results are never dropped, and a reader stalled too long is cut off."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from support.waiting import HANG_SECONDS, sample, wait_until

from vitscope import Client
from vitscope.client import image_message
from vitscope.v1 import activations_pb2 as apb
from vitscope.v1 import features_pb2 as fpb
from vitscope.v1 import inspector_pb2_grpc as pb_grpc
from vitscope.v1 import inversion_pb2 as ipb
from vitscope_server.core.runtime.errors import Cancelled
from vitscope_server.settings import ServerSettings
from vitscope_server.transport.app import RunningServer, create_server
from vitscope_server.transport.progress import (
    Progress,
    ResponseBuffer,
    SlowReader,
    StreamPolicy,
    holding_compute,
)

MODEL = "tiny"
STEPS_METRIC = "vitscope_optimization_steps_total"
IN_FLIGHT = "vitscope_requests_in_flight"


def _server(slow_reader_seconds: float) -> RunningServer:
    settings = ServerSettings(
        host="127.0.0.1",
        port=0,
        metrics_port=-1,
        builtin_models=False,
        models=[f"{MODEL}=timm:test_vit@random"],
        max_running=1,
        max_queue=8,
        stream_buffer_messages=2,
        slow_reader_seconds=slow_reader_seconds,
    )
    running = create_server(settings)
    assert running.registry.wait_until_settled(120)
    return running


@pytest.fixture(scope="module")
def patient() -> Iterator[RunningServer]:
    """Readers may stall for a minute: long enough to see coalescing, not a cut-off."""
    running = _server(60.0)
    yield running
    running.stop(0)


@pytest.fixture(scope="module")
def strict() -> Iterator[RunningServer]:
    running = _server(2.0)
    yield running
    running.stop(0)


def _optimize(steps: int = 200) -> fpb.OptimizeFeaturesRequest:
    """Noise-like previews at 320 x 320 do not compress: every progress message is large,
    so an unread stream fills the transport's window within a few steps."""
    return fpb.OptimizeFeaturesRequest(
        model=MODEL,
        features=[fpb.Feature(site="blocks.1.mlp.hidden", channel=3)],
        parameters=fpb.OptimizationParameters(steps=steps, image_size=320),
        progress_every=1,
        preview=True,
    )


def _invert() -> ipb.InvertRequest:
    """32 originals x 4 depths of reconstructions: megabytes of PNGs nobody reads."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (160, 160, 3), dtype=np.uint8) for _ in range(32)]
    return ipb.InvertRequest(
        model=MODEL,
        images=[image_message(i) for i in images],
        depths=[1, 2, 3, 4],
        method=ipb.INVERSION_METHOD_OPTIMIZATION,
        optimization=ipb.InversionOptimization(steps=2, progress_every=1),
    )


def _activations() -> Any:
    """64 images x 3 sites of 101 tokens x 256 channels: about 20 MB nobody reads."""
    return apb.GetActivationsRequest(
        model=MODEL,
        images=[image_message(np.zeros((160, 160, 3), np.uint8))] * 64,
        sites=[f"blocks.{block}.mlp.hidden" for block in range(3)],
    )


def test_buffer_keeps_the_latest_progress_and_every_result() -> None:
    """Inside a compute slot nothing waits for room: progress coalesces, results pile up."""
    buffer = ResponseBuffer(StreamPolicy(buffer_messages=2, slow_reader_seconds=60))
    with holding_compute():
        for step in range(10):
            buffer.put(Progress(("progress", step)))
        buffer.put(("result", 0))
        buffer.put(Progress(("progress", 10)))
    buffer.finish()
    assert list(buffer.take()) == [("progress", 9), ("result", 0), ("progress", 10)]
    assert buffer.dropped == 9


def test_a_computing_producer_waits_once_its_reader_is_buffer_bytes_behind() -> None:
    """Inside a compute slot results pile up without waiting, until the ones the reader is
    behind on pass buffer_bytes: then the producer waits for the reader to take one."""
    buffer = ResponseBuffer(StreamPolicy(buffer_messages=1, buffer_bytes=100))
    taken = buffer.take()
    produced = threading.Event()

    def produce() -> None:
        with holding_compute():
            buffer.put(b"a" * 150)  # the reader is not behind yet: not even measured
            buffer.put(Progress(b"p" * 500))  # progress never counts
            buffer.put(b"b" * 60)
            buffer.put(b"c" * 60)  # 120 bytes behind: waits for the reader
            produced.set()

    producer = threading.Thread(target=produce)
    producer.start()
    wait_until(lambda: buffer.waiting_for_room, "the producer to wait for room")
    assert not produced.is_set()
    assert next(taken) == b"a" * 150
    assert next(taken) == b"p" * 500
    assert next(taken) == b"b" * 60
    producer.join(HANG_SECONDS)
    assert produced.is_set() and not buffer.waiting_for_room
    buffer.finish()
    assert list(taken) == [b"c" * 60]


def test_buffer_raises_for_a_stalled_reader_and_after_close() -> None:
    now = [0.0]
    buffer = ResponseBuffer(StreamPolicy(buffer_messages=4, slow_reader_seconds=5), lambda: now[0])
    buffer.put(Progress("first"))
    now[0] = 6.0
    with pytest.raises(SlowReader, match="slow_reader_seconds"):
        buffer.put(Progress("second"))
    buffer.close()
    with pytest.raises(Cancelled):
        buffer.put("result")


def test_unread_progress_coalesces_and_the_result_arrives(patient: RunningServer) -> None:
    steps = 30
    labels = {"method": "OptimizeFeatures", "model": MODEL}
    before = sample(patient, STEPS_METRIC, **labels)
    with grpc.insecure_channel(f"127.0.0.1:{patient.port}") as channel:
        call = pb_grpc.InspectorStub(channel).OptimizeFeatures(_optimize(steps), timeout=300)
        # Nothing is read until every step has run: compute never waited for this reader.
        wait_until(lambda: sample(patient, STEPS_METRIC, **labels) >= before + steps, "all steps")
        responses = list(call)
    progress = [r.progress.step for r in responses if r.HasField("progress")]
    assert responses[-1].HasField("result")
    assert len(responses[-1].result.features[0].png) > 0
    assert progress == sorted(progress) and progress[-1] == steps
    assert len(progress) < steps


_STALLED_REQUESTS = {
    "OptimizeFeatures": _optimize,
    "Invert": _invert,
    "GetActivations": _activations,
}


@pytest.mark.parametrize("method", sorted(_STALLED_REQUESTS))
def test_a_stalled_reader_blocks_nobody_and_is_cut_off(strict: RunningServer, method: str) -> None:
    """One compute slot: while a stalled stream sits unread, other callers are served.
    GetActivations is sent from the RPC thread (no producer), under the same rule."""
    request = _STALLED_REQUESTS[method]()
    options = [("grpc.max_receive_message_length", 64 << 20)]
    with grpc.insecure_channel(f"127.0.0.1:{strict.port}", options) as channel:
        stub = pb_grpc.InspectorStub(channel)
        call = getattr(stub, method)(request)  # no deadline: only the server can end it
        next(call)
        with Client(f"127.0.0.1:{strict.port}", timeout=120) as other:
            for _ in range(3):
                served = other.activations(
                    [np.zeros((160, 160, 3), np.uint8)], ["blocks.0.out"], model=MODEL
                )
                assert served.sites["blocks.0.out"].values.shape[0] == 1
        wait_until(lambda: sample(strict, IN_FLIGHT, method=method) == 0, f"{method} cut off")
        with pytest.raises(grpc.RpcError) as caught:
            for _ in call:
                pass
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "slow_reader_seconds" in str(caught.value.details())
