"""Holding the only compute slot of a server so that requests queue behind it, to see what
the batchers make of them."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from support.waiting import sample, wait_until
from vitscope import Client
from vitscope.v1 import features_pb2, inspector_pb2_grpc
from vitscope_server.transport.app import RunningServer


def wait_for_queued(server: RunningServer, count: int) -> None:
    """Waits on the server's own queue gauge."""
    wait_until(
        lambda: sample(server, "vitscope_queued_requests") == count, f"{count} queued requests"
    )


class SlotHolder:
    """Holds the only compute slot with a long feature optimization of `model` until released."""

    def __init__(self, server: RunningServer, model: str = "vit") -> None:
        self._client = Client(f"127.0.0.1:{server.port}")
        self._stub = inspector_pb2_grpc.InspectorStub(self._client._channel)
        request = features_pb2.OptimizeFeaturesRequest(
            model=model,
            features=[features_pb2.Feature(site="blocks.1.mlp.hidden", channel=0)],
            parameters=features_pb2.OptimizationParameters(steps=100_000),
            progress_every=1,
        )
        self._call = self._stub.OptimizeFeatures(request, timeout=120)
        next(self._call)  # a progress message: the optimization holds the slot

    def release(self) -> None:
        self._call.cancel()
        self._client.close()


def batches(server: RunningServer, method: str, model: str) -> tuple[float, float]:
    """(forwards, images) the server's batcher of `method` has run for `model`."""
    labels = {"method": method, "model": model}
    return (
        sample(server, "vitscope_batch_images_count", **labels),
        sample(server, "vitscope_batch_images_sum", **labels),
    )


def run_queued(
    server: RunningServer, calls: list[Callable[[], Any]], while_queued: Callable[[], None]
) -> list[Any]:
    """Starts every call behind a held slot, runs while_queued once all wait, then releases."""
    holder = SlotHolder(server)
    with ThreadPoolExecutor(len(calls)) as pool:
        try:
            futures = [pool.submit(call) for call in calls]
            wait_for_queued(server, len(calls))
            while_queued()
        finally:
            holder.release()
        return [f.result() for f in futures]


def run_queued_cancelling_one(
    server: RunningServer, calls: list[Callable[[], Any]], start: Callable[[], Any]
) -> tuple[list[Any], grpc.StatusCode]:
    """run_queued with one more call, made by `start` behind the held slot (a call starts
    when it is made) and cancelled once all queue; waits until it has left the queue, then
    returns the other calls' results and its status code."""
    doomed: list[Any] = []

    def consume() -> grpc.StatusCode:
        doomed.append(start())
        try:
            list(doomed[0])
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[no-any-return]
        return grpc.StatusCode.OK

    def cancel_one() -> None:
        doomed[0].cancel()
        wait_for_queued(server, len(calls))  # it left at once, not when the batch ran

    *results, code = run_queued(server, [*calls, consume], cancel_one)
    return results, code
