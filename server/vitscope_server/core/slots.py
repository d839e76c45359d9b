"""Bounded concurrency for compute: a few run, a few wait, the rest are refused."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from vitscope_server.core.cancel import CancelToken
from vitscope_server.core.errors import Reason, ResourceExhausted

_POLL_SECONDS = 0.05


class ComputeSlots:
    """At most `max_running` jobs compute at once and `max_waiting` queue behind them."""

    def __init__(self, max_running: int, max_waiting: int) -> None:
        self.max_running = max_running
        self.max_waiting = max_waiting
        self._running = threading.BoundedSemaphore(max_running)
        self._lock = threading.Lock()
        self._waiting = 0

    @property
    def waiting(self) -> int:
        return self._waiting

    @contextmanager
    def acquire(self, cancel: CancelToken) -> Iterator[float]:
        """Holds a slot for the body; yields the seconds spent waiting for it."""
        started = time.perf_counter()
        if not self._running.acquire(blocking=False):
            with self._lock:
                if self._waiting >= self.max_waiting:
                    raise ResourceExhausted(
                        f"server busy: {self.max_running} jobs running and {self._waiting} waiting "
                        f"(max_queue={self.max_waiting}); retry later",
                        reason=Reason.QUEUE_FULL,
                    )
                self._waiting += 1
            try:
                while not self._running.acquire(timeout=_POLL_SECONDS):
                    cancel.raise_if_cancelled()
            finally:
                with self._lock:
                    self._waiting -= 1
        try:
            cancel.raise_if_cancelled()
            yield time.perf_counter() - started
        finally:
            self._running.release()
