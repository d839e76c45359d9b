"""The batcher itself, with a plain function as the batch's work: who waits for whom, and
what a failed batch does. (tests/integration/test_batching.py runs it with real models on a server.)"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from support.waiting import HANG_SECONDS, wait_until

from vitscope_server.core.runtime.batching import Batcher, BatchInfo
from vitscope_server.core.runtime.cancel import NEVER_CANCELLED, CancelToken
from vitscope_server.core.runtime.errors import Cancelled, Reason, ResourceExhausted
from vitscope_server.core.runtime.slots import ComputeSlots

Run = Callable[[Sequence[int], CancelToken], list[int | BaseException]]


def _doubling(sizes: list[int], failures: list[BaseException]) -> Run:
    """Doubles every item; raises the next of `failures` instead while there is one."""

    def run(items: Sequence[int], cancel: CancelToken) -> list[int | BaseException]:
        sizes.append(len(items))
        if failures:
            raise failures.pop()
        return [2 * item for item in items]

    return run


def _submit(
    batcher: Batcher[int, int], item: int, cancel: CancelToken | None = None
) -> tuple[int, BatchInfo]:
    with batcher.arriving("m") as arrival:
        return batcher.submit(arrival, "k", item, 1, cancel or CancelToken())


def _one_slot() -> tuple[ComputeSlots, list[int], Batcher[int, int]]:
    """One compute slot, a doubling batcher on it, and the sizes of the batches it ran."""
    slots = ComputeSlots(max_running=1, max_waiting=8)
    sizes: list[int] = []
    return slots, sizes, Batcher(_doubling(sizes, []), slots, max_images=8, max_delay=0.0)


def test_a_failed_forward_reaches_each_of_its_requests_and_the_next_batch_runs() -> None:
    """An error of the shared forward (CUDA out of memory here) is every member's error;
    the batcher then serves the next batch as before."""
    slots = ComputeSlots(max_running=1, max_waiting=8)
    sizes: list[int] = []
    failures: list[BaseException] = [torch.OutOfMemoryError("CUDA out of memory")]
    batcher: Batcher[int, int] = Batcher(
        _doubling(sizes, failures), slots, max_images=8, max_delay=0.0
    )
    with ThreadPoolExecutor(2) as pool:
        with slots.acquire(NEVER_CANCELLED):
            futures = [pool.submit(_submit, batcher, i) for i in (1, 2)]
            wait_until(lambda: batcher.waiting == 2, "two queued requests")
        for future in futures:
            with pytest.raises(torch.OutOfMemoryError):
                future.result()
    result, info = _submit(batcher, 3)
    assert (result, info.images, info.requests) == (6, 1, 1)
    assert sizes == [2, 1]


def test_a_leader_waits_for_a_request_still_arriving_but_not_for_nothing() -> None:
    seen: list[tuple[str, int, float]] = []
    sizes: list[int] = []
    batcher: Batcher[int, int] = Batcher(
        _doubling(sizes, []),
        ComputeSlots(max_running=1, max_waiting=8),
        max_images=8,
        max_delay=60.0,
        on_batch=lambda group, images, delay: seen.append((group, images, delay)),
    )
    alone, info = _submit(batcher, 5)  # nothing else arriving: no wait, despite the delay
    assert (alone, info.requests) == (10, 1) and seen[-1][2] < 30
    decoded = threading.Event()

    def late() -> tuple[int, BatchInfo]:
        with batcher.arriving("m") as arrival:
            decoded.wait()  # still decoding its images
            return batcher.submit(arrival, "k", 7, 1, CancelToken())

    with ThreadPoolExecutor(2) as pool:
        arriving = pool.submit(late)
        wait_until(lambda: batcher.arrivals("m") == 1, "an arriving request")
        first = pool.submit(_submit, batcher, 1)
        wait_until(
            lambda: batcher.waiting == 1, "the leader queued"
        )  # the leader waits for the late one
        decoded.set()
        (one, one_info), (seven, seven_info) = first.result(), arriving.result()
    assert (one, seven) == (2, 14)
    assert one_info.requests == seven_info.requests == 2
    assert sizes == [1, 2] and seen[-1][1] == 2


def test_every_batcher_and_the_slots_share_one_max_queue() -> None:
    """Two batchers and a plain slot waiter, max_waiting 2: the third waiter is refused."""
    slots = ComputeSlots(max_running=1, max_waiting=2)
    first: Batcher[int, int] = Batcher(_doubling([], []), slots, max_images=8, max_delay=0.0)
    second: Batcher[int, int] = Batcher(_doubling([], []), slots, max_images=8, max_delay=0.0)
    with ThreadPoolExecutor(2) as pool:
        with slots.acquire(NEVER_CANCELLED):
            queued = [pool.submit(_submit, first, 1), pool.submit(_submit, second, 2)]
            wait_until(lambda: slots.waiting == 2, "one request in each batcher's queue")
            with (
                pytest.raises(ResourceExhausted, match="max_queue=2") as refused,
                slots.acquire(NEVER_CANCELLED),
            ):
                pass
            assert refused.value.reason is Reason.QUEUE_FULL
            with pytest.raises(ResourceExhausted, match="max_queue=2"):
                _submit(first, 3)
        assert [future.result()[0] for future in queued] == [2, 4]
    assert slots.waiting == 0


def test_a_leader_whose_caller_left_frees_its_thread_before_a_slot_frees() -> None:
    """With the only slot held elsewhere, a lone request's caller leaves: its thread returns
    Cancelled at once rather than waiting for the slot; a later request still runs."""
    slots, sizes, batcher = _one_slot()
    cancel = CancelToken()
    with ThreadPoolExecutor(2) as pool, slots.acquire(NEVER_CANCELLED):
        leader = pool.submit(_submit, batcher, 5, cancel)
        wait_until(lambda: batcher.waiting == 1, "the request to queue")
        cancel.cancel()
        with pytest.raises(Cancelled):
            leader.result(timeout=HANG_SECONDS)
        assert batcher.waiting == 0 and slots.waiting == 0
        follower = pool.submit(_submit, batcher, 4)
        wait_until(lambda: batcher.waiting == 1, "the next request to queue")
    result, info = follower.result(timeout=HANG_SECONDS)
    assert (result, info.requests) == (8, 1)
    assert sizes == [1]


def test_a_leader_whose_caller_left_still_serves_the_others() -> None:
    """The leader's caller leaves while another request waits in its batch: once the slot
    frees, the batch runs for the other, and the leaver gets Cancelled."""
    slots, sizes, batcher = _one_slot()
    cancel = CancelToken()
    with ThreadPoolExecutor(2) as pool:
        with slots.acquire(NEVER_CANCELLED):
            leader = pool.submit(_submit, batcher, 5, cancel)
            wait_until(lambda: batcher.waiting == 1, "the first request to queue")
            other = pool.submit(_submit, batcher, 7)
            wait_until(lambda: batcher.waiting == 2, "the second request to queue")
            cancel.cancel()
        with pytest.raises(Cancelled):
            leader.result(timeout=HANG_SECONDS)
        result, _ = other.result(timeout=HANG_SECONDS)
    assert result == 14
    assert sizes == [1]
