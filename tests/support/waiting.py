"""Waiting in tests on what the server reports, never on a fixed sleep.

A condition is polled until it holds; the deadline only turns a hang into a failure, it is
never what the test measures.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from vitscope_server.transport.app import RunningServer

T = TypeVar("T")

POLL_SECONDS = 0.05
HANG_SECONDS = 120.0


def wait_until(condition: Callable[[], T], what: str, timeout: float = HANG_SECONDS) -> T:
    """The first truthy value of condition(), polled until `timeout` has passed."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"still waiting after {timeout} s for {what}"
        time.sleep(POLL_SECONDS)


def sample(server: RunningServer, name: str, **labels: str) -> float:
    """The current value of one of the server's own metrics (0 when not yet recorded)."""
    value = server.metrics.registry.get_sample_value(name, labels)
    return value or 0.0
