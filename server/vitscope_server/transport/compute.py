"""Every compute RPC holds a slot the same way, and the metrics see the wait and the work."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from vitscope_server.core.batching import BatchInfo
from vitscope_server.core.cancel import CancelToken
from vitscope_server.core.slots import ComputeSlots, HeldSlot
from vitscope_server.transport.metrics import Metrics
from vitscope_server.transport.progress import holding_compute


@contextmanager
def computing(
    slots: ComputeSlots, metrics: Metrics, cancel: CancelToken, method: str, model: str
) -> Iterator[HeldSlot]:
    """Waits for a compute slot (or the cancel token), then holds it for the block; run the
    torch work through the slot. Streamed responses sent meanwhile never wait for the reader."""
    with slots.acquire(cancel) as slot, holding_compute():
        metrics.queue_wait.labels(method, model).observe(slot.waited)
        with metrics.compute.labels(method, model).time():
            yield slot


def record_batched(metrics: Metrics, method: str, model: str, info: BatchInfo) -> None:
    """A batched request's wait (arrival to its batch's start) and its batch's compute time."""
    metrics.queue_wait.labels(method, model).observe(info.waited)
    metrics.compute.labels(method, model).observe(info.computed)
