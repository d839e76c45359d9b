"""Cooperative cancellation: long work polls a token between steps."""

from __future__ import annotations

import threading

from vitscope_server.core.errors import Cancelled


class CancelToken:
    """Set once when the caller cancels or its deadline expires."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise Cancelled("the call was cancelled or its deadline passed")


NEVER_CANCELLED = CancelToken()
