"""Streaming responses leave the computing thread through a small buffer, so that compute never
waits on the network.

A server-streaming RPC runs its body in a producer thread; the RPC thread only sends what
the buffer holds. Progress messages (wrapped in `Progress`) coalesce when the reader is slow:
the latest progress wins. Other messages are never dropped; a producer that holds a compute
slot never waits for room, one that does not waits while the buffer is full. A reader that has
taken nothing for `slow_reader_seconds` while messages wait is cut off with
RESOURCE_EXHAUSTED. Only a reader that falls more than `buffer_bytes` of results behind makes a
producer holding compute wait: memory stays bounded, at the price of the slot.

A stream marked `sends_after_compute` holds no compute slot while it sends, so it needs no
producer: it runs on the RPC thread, one thread hand-off less per call, and a shared watchdog
cuts off its reader under the same rule.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from vitscope_server.core.runtime.errors import Cancelled, Reason, ResourceExhausted
from vitscope_server.core.runtime.intra_op import host_thread

log = logging.getLogger(__name__)

_WAKE_SECONDS = 0.1
# Producers run on reused threads, each running torch on one thread (core/runtime/intra_op.py): the
# torch work of a slot's holder runs on the slot's own thread. Streams in flight are bounded
# by the server's own thread pool, far below this.
_PRODUCERS = ThreadPoolExecutor(
    max_workers=1024, thread_name_prefix="stream-producer", initializer=host_thread
)
_holding = threading.local()

Method = TypeVar("Method", bound=Callable[..., Any])


@dataclass(frozen=True)
class Progress:
    """A response that a later one supersedes; dropped when the reader is behind."""

    message: Any


@dataclass(frozen=True)
class StreamPolicy:
    """How much a stream may buffer and how long its reader may stall."""

    buffer_messages: int = 8
    slow_reader_seconds: float = 30.0
    # Result bytes held for a reader that is behind while the request still computes.
    buffer_bytes: int = 256 << 20


class SlowReader(ResourceExhausted):
    """The reader took nothing for longer than the policy allows."""

    default_reason = Reason.SLOW_READER

    @classmethod
    def after(cls, limit: float) -> SlowReader:
        return cls(
            f"the reader took no response for over {limit:g} s "
            "(slow_reader_seconds); read the stream as it arrives"
        )


def _size(message: Any) -> int:
    """Serialized bytes of a response (pre-serialized chunks are bytes already)."""
    if isinstance(message, (bytes, bytearray, memoryview)):
        return len(message)
    byte_size = getattr(message, "ByteSize", None)
    return int(byte_size()) if byte_size is not None else 0


@contextmanager
def holding_compute() -> Iterator[None]:
    """Marks this thread as holding a compute slot: its messages never wait for the reader."""
    _holding.active = True
    try:
        yield
    finally:
        _holding.active = False


def _may_wait() -> bool:
    return not getattr(_holding, "active", False)


class ResponseBuffer:
    """Messages between one producer and one reader; bounded except for what is never dropped."""

    def __init__(self, policy: StreamPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self._policy = policy
        self._clock = clock
        self._cond = threading.Condition()
        # (message, droppable, serialized bytes counted against buffer_bytes)
        self._items: deque[tuple[Any, bool, int]] = deque()
        self._held_bytes = 0
        # Whether a producer holding compute waits for its reader (buffer_bytes reached).
        self.waiting_for_room = False
        self._finished = False
        self._error: BaseException | None = None
        self._closed = False
        self._waiting_since: float | None = None
        self.dropped = 0

    def _check_reader(self) -> None:
        if self._closed:
            raise Cancelled("the call ended before its responses were sent")
        since = self._waiting_since
        limit = self._policy.slow_reader_seconds
        if since is not None and self._clock() - since > limit:
            raise SlowReader.after(limit)

    def put(self, message: Any) -> None:
        """Adds a response; progress coalesces, others wait for room unless compute is held.
        A producer holding compute waits only once the results its reader is behind on pass
        buffer_bytes; they are measured (a serialization) only once the reader is behind."""
        droppable = isinstance(message, Progress)
        holding = not _may_wait()
        behind = len(self._items) >= self._policy.buffer_messages
        nbytes = _size(message) if holding and behind and not droppable else 0
        with self._cond:
            self._check_reader()
            if droppable:
                message = message.message
                progress = [i for i, (_, drop, _) in enumerate(self._items) if drop]
                if len(progress) >= self._policy.buffer_messages:
                    del self._items[progress[0]]
                    self.dropped += 1
            elif not holding:
                while len(self._items) >= self._policy.buffer_messages:
                    self._cond.wait(_WAKE_SECONDS)
                    self._check_reader()
            else:
                while self._held_bytes and self._held_bytes + nbytes > self._policy.buffer_bytes:
                    self.waiting_for_room = True
                    self._cond.wait(_WAKE_SECONDS)
                    self._check_reader()
                self.waiting_for_room = False
            if not self._items:
                self._waiting_since = self._clock()
            self._held_bytes += nbytes
            self._items.append((message, droppable, nbytes))
            self._cond.notify_all()

    def finish(self, error: BaseException | None = None) -> None:
        with self._cond:
            self._finished, self._error = True, error
            self._cond.notify_all()

    def wait_drained(self) -> None:
        """Returns once the reader has taken everything; raises SlowReader if it stalls."""
        with self._cond:
            while self._items and not self._closed:
                self._cond.wait(_WAKE_SECONDS)
                self._check_reader()

    def close(self) -> None:
        """The reader is gone: the producer's next put raises Cancelled."""
        with self._cond:
            self._closed = True
            self._items.clear()
            self._held_bytes = 0
            self._cond.notify_all()

    def take(self) -> Iterator[Any]:
        """The reader's side: every response in order, then the producer's error if any."""
        while True:
            with self._cond:
                while not self._items and not self._finished:
                    self._cond.wait()
                if not self._items:
                    if self._error is not None:
                        raise self._error
                    return
                message, _, nbytes = self._items.popleft()
                self._held_bytes -= nbytes
                self._waiting_since = self._clock() if self._items else None
                self._cond.notify_all()
            yield message


def _cut_off(context: grpc.ServicerContext, reason: SlowReader) -> None:
    """Ends the call with a status even while its thread is blocked sending."""
    log.warning("cutting off a slow reader: %s", reason)
    call = getattr(getattr(context, "_rpc_event", None), "call", None)
    try:
        call.cancel(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], str(reason))  # type: ignore[union-attr]
    except (AttributeError, TypeError):
        context.cancel()


def _produce(
    responses: Iterator[Any], buffer: ResponseBuffer, context: grpc.ServicerContext
) -> None:
    try:
        for message in responses:
            buffer.put(message)
        buffer.finish()
        buffer.wait_drained()
    except SlowReader as slow:
        buffer.finish(slow)
        _cut_off(context, slow)
    except BaseException as exc:
        buffer.finish(exc)
    finally:
        _close(responses)


def _close(responses: Iterator[Any]) -> None:
    """Closes a servicer's stream now, so that its context managers (a budget reservation,
    a batcher's arrival) exit at once rather than whenever it is collected."""
    close = getattr(responses, "close", None)
    if close is not None:
        close()


def buffered(
    responses: Iterator[Any], context: grpc.ServicerContext, policy: StreamPolicy
) -> Iterator[Any]:
    """Runs `responses` (a servicer's stream) in a producer thread; yields what it sends."""
    buffer = ResponseBuffer(policy)
    _PRODUCERS.submit(_produce, responses, buffer, context)
    try:
        yield from buffer.take()
    finally:
        buffer.close()


def sends_after_compute(method: Method) -> Method:
    """Marks a servicer stream that computes everything before its first message and holds
    no compute slot while sending: it is sent from the RPC thread (see `sent_directly`)."""
    method.sends_after_compute = True  # type: ignore[attr-defined]
    return method


class _SendWatchdog:
    """One thread per process that cuts off directly sent streams whose reader stalls."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._sending: dict[int, tuple[grpc.ServicerContext, float, float]] = {}
        self._keys = itertools.count()
        self._thread: threading.Thread | None = None

    @contextmanager
    def sending(self, context: grpc.ServicerContext, limit: float) -> Iterator[None]:
        """Watches the block (one message handed to gRPC until it asks for the next)."""
        key = next(self._keys)
        with self._lock:
            self._sending[key] = (context, self._clock(), limit)
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="send-watchdog")
                self._thread.daemon = True
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                self._sending.pop(key, None)

    def _stalled(self) -> tuple[list[tuple[grpc.ServicerContext, float]], float]:
        """Pops the stalled sends; returns them and how long to wait before the next look."""
        now = self._clock()
        stalled, interval = [], 1.0
        with self._lock:
            for key, (context, since, limit) in list(self._sending.items()):
                interval = min(interval, limit / 4)
                if now - since > limit:
                    del self._sending[key]
                    stalled.append((context, limit))
        return stalled, interval

    def _watch(self) -> None:
        idle = threading.Event()
        while True:
            stalled, interval = self._stalled()
            for context, limit in stalled:
                try:
                    _cut_off(context, SlowReader.after(limit))
                except Exception:  # one call's failure must not end the watch for all
                    log.exception("could not cut off a stalled reader")
            idle.wait(interval)


_WATCHDOG = _SendWatchdog()


def sent_directly(
    responses: Iterator[Any], context: grpc.ServicerContext, policy: StreamPolicy
) -> Iterator[Any]:
    """Yields `responses` as they come, on the calling (RPC) thread; a reader that takes none
    of them for `slow_reader_seconds` is cut off."""
    try:
        for message in responses:
            with _WATCHDOG.sending(context, policy.slow_reader_seconds):
                yield message
    finally:
        _close(responses)
