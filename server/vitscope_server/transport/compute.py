"""Every compute RPC holds a slot the same way, the metrics see the wait and the work, and
unary responses share one size budget."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

from vitscope_server.core.runtime.batching import BatchInfo
from vitscope_server.core.runtime.cancel import CancelToken
from vitscope_server.core.runtime.limits import RequestLimits
from vitscope_server.core.runtime.slots import ComputeSlots, HeldSlot
from vitscope_server.core.runtime.stages import Stage, StageTimes
from vitscope_server.transport.metrics import Metrics, labelled
from vitscope_server.transport.progress import holding_compute

Message = TypeVar("Message")


@contextmanager
def computing(
    slots: ComputeSlots, metrics: Metrics, cancel: CancelToken, method: str, model: str
) -> Iterator[HeldSlot]:
    """Waits for a compute slot (or the cancel token), then holds it for the block; run the
    torch work through the slot. Streamed responses sent meanwhile never wait for the reader."""
    with slots.acquire(cancel) as slot, holding_compute():
        labelled(metrics.queue_wait, method, model).observe(slot.waited)
        with labelled(metrics.compute, method, model).time():
            yield slot


def timed_messages(messages: Iterator[Message], stages: StageTimes) -> Iterator[Message]:
    """The messages as they are built (encode) and taken by gRPC (send), each timed; the
    send of a message ends when gRPC asks for the next."""
    while True:
        with stages.timing(Stage.ENCODE):
            message = next(messages, None)
        if message is None:
            return
        started = time.perf_counter()
        yield message
        stages.add(Stage.SEND, time.perf_counter() - started)


def record_batched(metrics: Metrics, method: str, model: str, info: BatchInfo) -> None:
    """A batched request's wait (arrival to its batch's start) and its batch's compute time."""
    labelled(metrics.queue_wait, method, model).observe(info.waited)
    labelled(metrics.compute, method, model).observe(info.computed)


# Room in a response for what is not counted up front: provenance, names, framing.
RESPONSE_HEADROOM_BYTES = 16 << 10


def unary_response_budget(max_message_bytes: int, limits: RequestLimits) -> int:
    """The bytes one unary response may carry: under the max message size and the server's
    result limit."""
    return min(max_message_bytes - RESPONSE_HEADROOM_BYTES, limits.max_result_bytes)
