"""Torch's intra-op threads belong to the compute threads alone.

On CPU, every thread that runs a parallel torch op gets its own OpenMP team. Once the
process holds more OpenMP threads than cores, libgomp's workers stop spinning between
parallel regions and every region pays a wake-up: on two cores a ViT-Ti forward took
29 ms instead of 20 ms while another thread's team existed. So the compute threads run
with the configured count, and every other thread of the server (RPC handlers, stream
producers, model loading) runs torch with one thread and never starts a team.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Torch's own default, read before any thread of the server changed it.
DEFAULT_THREADS = torch.get_num_threads()


def host_thread() -> None:
    """Initializer of threads that decode, convert and send: one intra-op thread."""
    torch.set_num_threads(1)


def compute_thread(threads: int | None) -> Callable[[], None]:
    """Initializer of a compute thread: `threads` intra-op threads (None: torch's default)."""
    count = threads or DEFAULT_THREADS

    def initialize() -> None:
        torch.set_num_threads(count)

    return initialize
