"""Bounded concurrency for compute: a few run, a few wait, the rest are refused.

Each slot owns one thread, and every torch op of its holder runs there (see
core/runtime/intra_op.py): one warm OpenMP team per slot and no other team competing. A core
generator stepped on the slot's thread is also closed there, so that the thread-local
modes it entered (grad mode, autocast) are left on the thread that entered them.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

from vitscope_server.core.runtime.cancel import CancelToken
from vitscope_server.core.runtime.errors import Reason, ResourceExhausted
from vitscope_server.core.runtime.intra_op import compute_thread

Value = TypeVar("Value")


class HeldSlot:
    """A compute slot while its holder has it: the seconds waited for it, and its thread."""

    def __init__(self, waited: float, thread: ThreadPoolExecutor) -> None:
        self.waited = waited
        self._thread = thread
        self._stepped: list[Iterator[Any]] = []

    def run(self, work: Callable[[], Value]) -> Value:
        """`work()` on the slot's thread."""
        return self._thread.submit(work).result()

    def steps(self, events: Iterator[Value]) -> Iterator[Value]:
        """Advances a core generator on the slot's thread, one event per step; between
        steps the caller converts and sends each event on its own thread."""
        self._stepped.append(events)
        while True:
            step = self.run(lambda: list(itertools.islice(events, 1)))
            if not step:
                return
            yield step[0]

    def release(self) -> None:
        """Closes every stepped generator on the slot's thread."""
        for events in self._stepped:
            close = getattr(events, "close", None)
            if close is not None:
                self.run(close)


class ComputeSlots:
    """At most `max_running` jobs compute at once and `max_waiting` queue behind them,
    counting the requests in every batcher's queues with those waiting for a slot.

    Waiters sleep on a condition that a released slot or their cancel token wakes:
    no polling interval delays either."""

    def __init__(
        self, max_running: int, max_waiting: int, torch_threads: int | None = None
    ) -> None:
        """torch_threads: intra-op threads of each slot's thread (None: torch's default)."""
        self.max_running = max_running
        self.max_waiting = max_waiting
        # Last in, first out: under light load the warmest thread does the work.
        self._idle = [
            ThreadPoolExecutor(
                1, thread_name_prefix=f"compute-{i}", initializer=compute_thread(torch_threads)
            )
            for i in range(max_running)
        ]
        self._changed = threading.Condition()
        self._waiting = 0
        self._batch_queued = 0
        self._closed = False

    def close(self) -> None:
        """Ends the slots' threads: the idle ones now, the held ones when released (the
        server has stopped taking calls)."""
        with self._changed:
            self._closed = True
            for thread in self._idle:
                thread.shutdown(wait=False)

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot or queued for a batch."""
        return self._waiting + self._batch_queued

    def join_batch_queue(self, *, admit_only_below_limit: bool) -> None:
        """Counts one request into a batcher's queue; with admit_only_below_limit, refuses it
        with QUEUE_FULL when max_waiting requests already wait (a leader that will run at
        once is admitted regardless)."""
        with self._changed:
            if admit_only_below_limit and self.waiting >= self.max_waiting:
                raise self._queue_full()
            self._batch_queued += 1

    def leave_batch_queue(self, count: int) -> None:
        with self._changed:
            self._batch_queued -= count

    def _queue_full(self) -> ResourceExhausted:
        return ResourceExhausted(
            f"server busy: {self.max_running - len(self._idle)} jobs running and "
            f"{self.waiting} waiting (max_queue={self.max_waiting}); retry later",
            reason=Reason.QUEUE_FULL,
        )

    @property
    def free(self) -> int:
        """Slots free now (a hint: another thread may take one next)."""
        return len(self._idle)

    def _wake(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def _take(self, cancel: CancelToken, queued: bool) -> ThreadPoolExecutor:
        with self._changed:
            if self._idle:
                return self._idle.pop()
            if queued and self.waiting >= self.max_waiting:
                raise self._queue_full()
            self._waiting += queued
        unsubscribe = cancel.on_cancel(self._wake)
        try:
            with self._changed:
                while not self._idle and not cancel.cancelled:
                    self._changed.wait()
                cancel.raise_if_cancelled()
                return self._idle.pop()
        finally:
            unsubscribe()
            with self._changed:
                self._waiting -= queued

    @contextmanager
    def acquire(self, cancel: CancelToken, *, queued: bool = True) -> Iterator[HeldSlot]:
        """Holds a slot for the body; run its torch work through the yielded HeldSlot.

        queued=False: the caller is already counted (and admitted) by its own queue,
        as a batch's leader is."""
        started = time.perf_counter()
        thread = self._take(cancel, queued)
        held = HeldSlot(time.perf_counter() - started, thread)
        try:
            cancel.raise_if_cancelled()
            yield held
        finally:
            try:
                held.release()
            finally:
                with self._changed:
                    self._idle.append(thread)
                    if self._closed:
                        thread.shutdown(wait=False)
                    self._changed.notify_all()
