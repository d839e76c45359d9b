"""Compute slots: each runs its holder's torch work on its own thread, with the configured
intra-op threads, and leaves no thread-local torch mode behind."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import torch

from vitscope_server.core.runtime.cancel import NEVER_CANCELLED
from vitscope_server.core.runtime.intra_op import DEFAULT_THREADS, host_thread
from vitscope_server.core.runtime.slots import ComputeSlots


@pytest.fixture(autouse=True)
def torch_default_restored() -> Iterator[None]:
    """Setting a thread's count also sets torch's default for threads that start later."""
    yield
    torch.set_num_threads(DEFAULT_THREADS)


def _thread_and_torch_threads() -> tuple[str, int]:
    return threading.current_thread().name, torch.get_num_threads()


def test_work_runs_on_the_slots_thread_with_its_intra_op_threads() -> None:
    slots = ComputeSlots(max_running=2, max_waiting=1, torch_threads=1)
    with slots.acquire(NEVER_CANCELLED) as first, slots.acquire(NEVER_CANCELLED) as second:
        names = {first.run(_thread_and_torch_threads), second.run(_thread_and_torch_threads)}
        assert slots.free == 0
    assert {threads for _, threads in names} == {1}
    assert len({name for name, _ in names}) == 2
    assert all(name.startswith("compute-") for name, _ in names)
    # The warmest thread serves the next holder.
    with slots.acquire(NEVER_CANCELLED) as again:
        assert again.run(_thread_and_torch_threads) in names
    with ComputeSlots(1, 1).acquire(NEVER_CANCELLED) as default:
        assert default.run(torch.get_num_threads) == DEFAULT_THREADS


def test_host_threads_run_torch_on_one_thread() -> None:
    seen: list[int] = []

    def host() -> None:
        host_thread()
        seen.append(torch.get_num_threads())

    thread = threading.Thread(target=host)
    thread.start()
    thread.join()
    assert seen == [1]


def test_a_stepped_generator_runs_and_closes_on_the_slots_thread() -> None:
    """Its grad mode is entered and left on the slot's thread, even when the caller stops
    reading half-way."""
    where: list[str] = []

    def events() -> Iterator[bool]:
        with torch.no_grad():
            where.append(threading.current_thread().name)
            yield torch.is_grad_enabled()
            yield torch.is_grad_enabled()
        where.append(threading.current_thread().name)

    slots = ComputeSlots(max_running=1, max_waiting=1)
    with slots.acquire(NEVER_CANCELLED) as slot:
        assert next(slot.steps(events())) is False
    assert len(where) == 1 and where[0].startswith("compute-")
    with slots.acquire(NEVER_CANCELLED) as slot:
        assert slot.run(torch.is_grad_enabled) is True
        assert list(slot.steps(events())) == [False, False]
    assert len(set(where)) == 1 and len(where) == 3


def test_closing_ends_the_threads_idle_now_and_held_ones_on_release() -> None:
    slots = ComputeSlots(max_running=2, max_waiting=1)
    with slots.acquire(NEVER_CANCELLED) as held, slots.acquire(NEVER_CANCELLED) as idle_later:
        threads = [held.run(threading.current_thread), idle_later.run(threading.current_thread)]
    with slots.acquire(NEVER_CANCELLED) as held:
        slots.close()
        assert held.run(torch.is_grad_enabled) is True  # a holder finishes its work
    for thread in threads:
        thread.join(timeout=60)
        assert not thread.is_alive()
