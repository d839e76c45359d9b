"""glibc malloc, told to give memory back: fewer arenas, and a trim once the server is idle
after a large request.

Freed memory stays with glibc's allocator rather than the system: each thread that
allocates may get an arena of its own (up to eight per core, and the server runs dozens of
threads), every arena keeps its free blocks, and after a large block is freed glibc raises
its mmap threshold, so later large blocks come from the arenas too. Resident memory then
stays near its peak long after the large requests are gone. Fewer arenas bound how much is
kept; malloc_trim(0) returns the free pages of every arena. Elsewhere than glibc (musl,
macOS) both are no-ops.
"""

from __future__ import annotations

import ctypes
import logging
import threading

log = logging.getLogger(__name__)

_M_ARENA_MAX = -8


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _glibc()
GLIBC = _LIBC is not None
"""Whether the process allocates with glibc (elsewhere both calls below do nothing)."""


def limit_arenas(count: int) -> bool:
    """At most `count` malloc arenas for threads created from now on (0: glibc's default).
    Whether glibc took it."""
    if _LIBC is None or count <= 0:
        return False
    return bool(_LIBC.mallopt(_M_ARENA_MAX, count))


def trim() -> bool:
    """Returns every arena's free pages to the system; whether any were."""
    return bool(_LIBC.malloc_trim(0)) if _LIBC is not None else False


class Trimmer:
    """Trims in a thread of its own once the server is idle after a request that held at
    least `threshold_bytes` (0: never), so no caller waits for it."""

    def __init__(self, threshold_bytes: int) -> None:
        self.threshold_bytes = threshold_bytes
        self.trims = 0
        self._wanted = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def released(self, largest_bytes: int) -> None:
        """The server holds no request's memory now; the largest since the last trim held
        largest_bytes."""
        if not self.threshold_bytes or largest_bytes < self.threshold_bytes:
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="malloc-trim", daemon=True)
                self._thread.start()
        self._wanted.set()

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            trim()
            self.trims += 1
