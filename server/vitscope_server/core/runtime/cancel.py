"""Cooperative cancellation: long work polls a token between steps; waiters subscribe."""

from __future__ import annotations

import threading
from collections.abc import Callable

from vitscope_server.core.runtime.errors import Cancelled


class CancelToken:
    """Set once when the caller cancels or its deadline expires.

    Waiters register a callback instead of polling, so a cancelled caller leaves a
    queue at once and a running one is not slowed by timed waits."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: dict[int, Callable[[], None]] = {}
        self._next_id = 0

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def cancel(self) -> None:
        with self._lock:
            if self._event.is_set():
                return
            self._event.set()
            callbacks = list(self._callbacks.values())
            self._callbacks.clear()
        for callback in callbacks:
            callback()

    def on_cancel(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Runs callback when the token is cancelled (now, if it already is); returns a
        function that unsubscribes it."""
        with self._lock:
            if not self._event.is_set():
                key = self._next_id
                self._next_id += 1
                self._callbacks[key] = callback
                return lambda: self._forget(key)
        callback()
        return lambda: None

    def _forget(self, key: int) -> None:
        with self._lock:
            self._callbacks.pop(key, None)

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise Cancelled("the call was cancelled or its deadline passed")


NEVER_CANCELLED = CancelToken()
