"""Dynamic batching: concurrent requests that can share a forward run as one batch.

There is no batching thread. The first request of a queue leads: it waits up to
`max_delay` while more requests for the same model are still being decoded, takes
a compute slot, then takes every compatible request that has queued meanwhile (up
to `max_images`) and runs them as one job on the slot's thread. The others
sleep until their result is set. A lone request therefore runs at once, and under
load the queue fills while the previous batch computes (continuous batching).

A cancelled request leaves the queue, or leaves its running batch without waiting
for it; the batch itself stops only when every one of its requests is cancelled.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from vitscope_server.core.runtime.cancel import CancelToken
from vitscope_server.core.runtime.errors import Cancelled
from vitscope_server.core.runtime.slots import ComputeSlots, HeldSlot

Item = TypeVar("Item")
Result = TypeVar("Result")

# One batch: the items in arrival order and a token set once all their callers left;
# returns one result or exception per item, in order.
RunBatch = Callable[[Sequence[Item], CancelToken], Sequence["Result | BaseException"]]
# Told once per batch: its group (model), images, and the seconds its leader waited for arrivals.
OnBatch = Callable[[str, int, float], None]


def item_rows(sizes: Iterable[int]) -> Iterator[slice]:
    """Each item's rows of a batch made by concatenating the items in order."""
    start = 0
    for size in sizes:
        yield slice(start, start + size)
        start += size


def per_item(
    items: Sequence[Item], sizes: Iterable[int], work: Callable[[Item, slice], Result]
) -> list[Result | BaseException]:
    """work(item, its rows) for every item of a shared batch, in order. An item's own error
    becomes its outcome, and the others go on."""
    return [outcome(work, item, rows) for item, rows in zip(items, item_rows(sizes), strict=True)]


def outcome(work: Callable[..., Result], *args: object) -> Result | BaseException:
    """work(*args), or the exception it raised. The exception's traceback holds this frame
    only, not the caller's, so no reference cycle keeps the batch's tensors alive."""
    try:
        return work(*args)
    except Exception as exc:  # one request's own error
        return exc


@dataclass(frozen=True)
class BatchInfo:
    """What a request's batch looked like, for its metrics."""

    images: int
    requests: int
    # Seconds from this request's arrival in the queue to the start of its batch.
    waited: float
    # Seconds the batch computed (the slot was held).
    computed: float


@dataclass(eq=False)
class Arrival:
    """A request on its way to a group's queue (see Batcher.arriving)."""

    group: str
    landed: bool = False


@dataclass(eq=False)
class _Member(Generic[Item, Result]):
    # Several items of one caller run in the same batch (one forward for all of them).
    items: list[Item]
    images: int
    cancel: CancelToken
    arrived: float = field(default_factory=time.perf_counter)
    wake: threading.Event = field(default_factory=threading.Event)
    promoted: bool = False
    leading: bool = False
    done: bool = False
    results: list[Result] | None = None
    error: BaseException | None = None
    info: BatchInfo | None = None


@dataclass(eq=False)
class _Queue(Generic[Item, Result]):
    group: str
    key: Hashable
    pending: deque[_Member[Item, Result]] = field(default_factory=deque)
    leader: _Member[Item, Result] | None = None
    # Set while a leader waits for a compute slot; cancelled once no caller is left to serve.
    forming: CancelToken | None = None


def _all_cancelled(
    members: Sequence[_Member[Item, Result]],
) -> tuple[CancelToken, Callable[[], None]]:
    """A token that is cancelled once every member's own token is, and a function that
    unsubscribes it from theirs."""
    token = CancelToken()
    remaining = [len(members)]
    lock = threading.Lock()

    def one_left() -> None:
        with lock:
            remaining[0] -= 1
            last = remaining[0] == 0
        if last:
            token.cancel()

    unsubscribers = [member.cancel.on_cancel(one_left) for member in members]

    def unsubscribe() -> None:
        for forget in unsubscribers:
            forget()

    return token, unsubscribe


class Batcher(Generic[Item, Result]):
    """One per kind of job (e.g. GetActivations); queues are keyed by what may share a run."""

    def __init__(
        self,
        run: RunBatch[Item, Result],
        slots: ComputeSlots,
        *,
        max_images: int,
        max_delay: float,
        on_batch: OnBatch | None = None,
    ) -> None:
        self._run = run
        self._on_batch = on_batch
        self._slots = slots
        self.max_images = max_images
        self.max_delay = max_delay
        self._changed = threading.Condition()
        self._queues: dict[Hashable, _Queue[Item, Result]] = {}
        self._arriving: dict[str, int] = {}
        self._waiting = 0

    @property
    def waiting(self) -> int:
        """Requests queued for a batch that has not started."""
        return self._waiting

    def arrivals(self, group: str) -> int:
        """Requests of `group` on their way (decoding) and not yet queued."""
        return self._arriving.get(group, 0)

    @contextmanager
    def arriving(self, group: str) -> Iterator[Arrival]:
        """Marks a request of `group` (a model) as on its way, e.g. while its images decode,
        so that a leader of that group waits for it (up to the delay) rather than leave.
        Pass the arrival to submit: it lands in the queue in the same step."""
        arrival = Arrival(group)
        with self._changed:
            self._arriving[group] = self._arriving.get(group, 0) + 1
        try:
            yield arrival
        finally:
            with self._changed:
                self._land(arrival)

    def _land(self, arrival: Arrival) -> None:
        """Called with the lock held."""
        if not arrival.landed:
            arrival.landed = True
            self._arriving[arrival.group] -= 1
            self._changed.notify_all()

    def submit(
        self,
        arrival: Arrival,
        key: Hashable,
        item: Item,
        images: int,
        cancel: CancelToken,
    ) -> tuple[Result, BatchInfo]:
        """Runs item in a batch with other items of the same group and key; blocks until its
        result."""
        (result,), info = self.submit_all(arrival, key, [item], images, cancel)
        return result, info

    def submit_all(
        self,
        arrival: Arrival,
        key: Hashable,
        items: list[Item],
        images: int,
        cancel: CancelToken,
    ) -> tuple[list[Result], BatchInfo]:
        """Runs one caller's items in the same batch (`images` distinct images in all); the
        first item's error, in order, is raised."""
        member: _Member[Item, Result] = _Member(items, images, cancel)
        queue = self._enqueue(arrival, key, member)
        unsubscribe = cancel.on_cancel(lambda: self._leave(queue, member))
        try:
            while True:
                with self._changed:
                    if member.done:
                        break
                    lead = member.promoted and not member.leading
                    member.leading = member.leading or lead
                    if not lead:
                        member.wake.clear()
                if lead:
                    self._lead(queue)
                else:
                    member.wake.wait()
        finally:
            unsubscribe()
        if member.error is not None:
            raise member.error
        assert member.info is not None and member.results is not None
        return member.results, member.info

    def _enqueue(
        self, arrival: Arrival, key: Hashable, member: _Member[Item, Result]
    ) -> _Queue[Item, Result]:
        group = arrival.group
        with self._changed:
            self._land(arrival)
            queue = self._queues.get((group, key))
            runs_now = (queue is None or queue.leader is None) and self._slots.free > 0
            self._slots.join_batch_queue(admit_only_below_limit=not runs_now)
            queue = self._queues.setdefault((group, key), _Queue(group, (group, key)))
            queue.pending.append(member)
            self._waiting += 1
            if queue.leader is None:
                queue.leader = member
                member.promoted = True
            self._changed.notify_all()
        return queue

    def _leave(self, queue: _Queue[Item, Result], member: _Member[Item, Result]) -> None:
        """The caller is gone: out of the queue (handing on leadership), or out of its batch."""
        with self._changed:
            if member.done:
                return
            if member in queue.pending:
                queue.pending.remove(member)
                self._waiting -= 1
                self._slots.leave_batch_queue(1)
                if not queue.pending and queue.forming is not None:
                    queue.forming.cancel()
            if queue.leader is member and not member.leading:
                self._promote_next(queue)
            # A leader keeps forming its batch for the others; it raises once that is done.
            self._finish(member, None, Cancelled("the call was cancelled or its deadline passed"))
            self._changed.notify_all()

    def _finish(
        self,
        member: _Member[Item, Result],
        results: list[Result] | None,
        error: BaseException | None,
        info: BatchInfo | None = None,
    ) -> None:
        member.results, member.error, member.info = results, error, info
        member.done = True
        member.wake.set()

    def _promote_next(self, queue: _Queue[Item, Result]) -> None:
        """Called with the lock held; an idle queue is dropped (keys may be many)."""
        queue.leader = queue.pending[0] if queue.pending else None
        if queue.leader is not None:
            queue.leader.promoted = True
            queue.leader.wake.set()
        elif self._queues.get(queue.key) is queue:
            del self._queues[queue.key]

    def _wait_for_arrivals(self, queue: _Queue[Item, Result]) -> float:
        """Waits while requests of the group are still arriving; returns the seconds waited."""
        started = time.perf_counter()
        deadline = started + self.max_delay
        with self._changed:
            while (
                self._arriving.get(queue.group, 0) > 0
                and sum(m.images for m in queue.pending) < self.max_images
            ):
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._changed.wait(remaining)
        return time.perf_counter() - started

    def _take(self, queue: _Queue[Item, Result]) -> list[_Member[Item, Result]]:
        """The oldest pending requests up to max_images (always at least one); the next
        pending request becomes leader of the following batch."""
        with self._changed:
            batch: list[_Member[Item, Result]] = []
            images = 0
            while queue.pending and (
                not batch or images + queue.pending[0].images <= self.max_images
            ):
                member = queue.pending.popleft()
                images += member.images
                batch.append(member)
            self._waiting -= len(batch)
            self._slots.leave_batch_queue(len(batch))
            queue.forming = None
            self._promote_next(queue)
            return batch

    def _lead(self, queue: _Queue[Item, Result]) -> None:
        """Forms and runs one batch on the calling thread. The leader's own caller may leave
        while it waits for a slot: it then waits on for the others, and gives up once none is
        left (its thread is free at once, not when a slot frees)."""
        delay = self._wait_for_arrivals(queue)
        abandoned = CancelToken()
        with self._changed:
            queue.forming = abandoned
            if not queue.pending:
                abandoned.cancel()
        try:
            # Admitted by this queue already.
            with self._slots.acquire(abandoned, queued=False) as slot:
                batch = self._take(queue)
                if batch:
                    self._run_batch(slot, queue.group, batch, delay)
        except Cancelled:
            with self._changed:
                queue.forming = None
                self._promote_next(queue)  # whoever queued since leads the next batch

    def _run_batch(
        self, slot: HeldSlot, group: str, batch: list[_Member[Item, Result]], delay: float
    ) -> None:
        started = time.perf_counter()
        cancel, unsubscribe = _all_cancelled(batch)
        items = [item for m in batch for item in m.items]
        try:
            outcomes: Sequence[Result | BaseException] = slot.run(lambda: self._run(items, cancel))
        except Exception as exc:  # one failure (e.g. out of memory) reaches every caller
            outcomes = [exc] * len(items)
        finally:
            unsubscribe()
        computed = time.perf_counter() - started
        images = sum(m.images for m in batch)
        if self._on_batch is not None:
            self._on_batch(group, images, delay)
        with self._changed:
            rows = item_rows(len(m.items) for m in batch)
            for member, own in zip(batch, rows, strict=True):
                if member.done:
                    continue
                info = BatchInfo(images, len(batch), started - member.arrived, computed)
                mine = list(outcomes[own])
                error = next((o for o in mine if isinstance(o, BaseException)), None)
                if error is not None:
                    self._finish(member, None, error, info)
                else:
                    self._finish(member, mine, None, info)  # type: ignore[arg-type]
