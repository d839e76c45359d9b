"""Every compute RPC holds a slot the same way, and the metrics see the wait and the work."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from vitscope_server.core.batching import BatchInfo
from vitscope_server.core.cancel import CancelToken
from vitscope_server.core.slots import ComputeSlots
from vitscope_server.transport.metrics import Metrics


@contextmanager
def computing(
    slots: ComputeSlots, metrics: Metrics, cancel: CancelToken, method: str, model: str
) -> Iterator[None]:
    """Waits for a compute slot (or the cancel token), then holds it for the block."""
    with slots.acquire(cancel) as waited:
        metrics.queue_wait.labels(method, model).observe(waited)
        with metrics.compute.labels(method, model).time():
            yield


def record_batched(metrics: Metrics, method: str, model: str, info: BatchInfo) -> None:
    """A batched request's wait (arrival to its batch's start) and its batch's compute time."""
    metrics.queue_wait.labels(method, model).observe(info.waited)
    metrics.compute.labels(method, model).observe(info.computed)
