"""glibc keeps freed memory in its arenas; the server's trim gives it back, and a trimmer
runs once the memory budget empties after a large request."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from support.waiting import wait_until

from vitscope_server.core.runtime import allocator
from vitscope_server.core.runtime.budget import MemoryBudget
from vitscope_server.core.runtime.cancel import NEVER_CANCELLED

# Freed blocks that glibc keeps: after one large block is freed its mmap threshold rises, so
# the next ones come from the heap; one in ten stays allocated, so nothing is trimmed from
# the heap's top on its own. Prints resident MiB before and after allocator.trim().
_FRAGMENTED_HEAP = textwrap.dedent(
    """
    import ctypes
    from vitscope_server.core.runtime import allocator

    def rss():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size = 1 << 20
    libc.free(libc.malloc(size))
    blocks = [libc.malloc(size) for _ in range(300)]
    for block in blocks:
        ctypes.memset(block, 1, size)
    for index, block in enumerate(blocks):
        if index % 10:
            libc.free(block)
    kept = rss()
    allocator.trim()
    print(kept, rss())
    """
)


@pytest.mark.skipif(not allocator.GLIBC, reason="glibc's allocator only")
def test_a_trim_returns_freed_heap_memory() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _FRAGMENTED_HEAP], capture_output=True, text=True, check=True
    )
    kept, trimmed = map(int, done.stdout.split())
    # 270 MiB were freed inside the heap: glibc kept them, the trim gave most of them back.
    assert kept - trimmed > 200, (kept, trimmed)


def test_the_budget_trims_once_idle_after_a_large_request() -> None:
    trimmer = allocator.Trimmer(threshold_bytes=64 << 20)
    budget = MemoryBudget(1 << 30, 1 << 30, max_waiting=4, trimmer=trimmer)
    with budget.reserve(1 << 20, NEVER_CANCELLED):
        pass
    assert trimmer.trims == 0  # small requests leave the allocator alone
    with budget.reserve(100 << 20, NEVER_CANCELLED):
        with budget.reserve(1 << 20, NEVER_CANCELLED):
            pass
        assert trimmer.trims == 0  # not while a request still holds memory
    wait_until(lambda: trimmer.trims == 1, "the trim after the large request")
