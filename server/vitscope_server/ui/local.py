"""The Inspector called in process: the explorer's endpoints run the very servicer methods the
RPCs run, so every request goes through the same admission, budgets, batching, compute slots
and cancel tokens; only the wire is skipped.

`local_client` gives the typed `vitscope.Client` over that servicer, so a page gets the same
parsed results a remote caller gets.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any

from vitscope import Client
from vitscope.client import Stubs
from vitscope_server.core.runtime import errors
from vitscope_server.core.runtime.cancel import CancelToken
from vitscope_server.transport.interceptors import classify
from vitscope_server.transport.progress import Progress, StreamPolicy, buffered, sent_directly


class LocalContext:
    """What the servicer methods and the stream senders read of a gRPC context."""

    def __init__(self, cancel: CancelToken) -> None:
        self._cancel = cancel

    def add_callback(self, callback: Callable[[], None]) -> bool:
        """Runs callback when the caller cancels (at once if it already has)."""
        self._cancel.on_cancel(callback)
        return True

    def cancel(self) -> None:
        self._cancel.cancel()

    def is_active(self) -> bool:
        return not self._cancel.cancelled

    def time_remaining(self) -> float | None:
        return None


def _reported(exc: Exception, context: LocalContext) -> errors.VitscopeError:
    """The domain error the RPC would report (unexpected ones are logged with an id)."""
    return classify(exc, context)[1]


class _LocalMethod:
    """One servicer method with the signature of a stub's multicallable."""

    def __init__(
        self, behavior: Callable[..., Any], cancel: CancelToken, policy: StreamPolicy, raw: bool
    ) -> None:
        self._behavior, self._cancel, self._policy, self._raw = behavior, cancel, policy, raw

    def __call__(self, request: Any, timeout: float | None = None, metadata: Any = ()) -> Any:
        context = LocalContext(self._cancel)
        if not inspect.isgeneratorfunction(self._behavior):
            try:
                return self._behavior(request, context)
            except Exception as exc:
                raise _reported(exc, context) from None
        return self._stream(request, context)

    def _stream(self, request: Any, context: LocalContext) -> Iterator[Any]:
        """The stream through the sender the interceptor would use (producer thread or not)."""
        direct = getattr(self._behavior, "sends_after_compute", False)
        sender = sent_directly if direct else buffered
        try:
            for message in sender(self._behavior(request, context), context, self._policy):
                if isinstance(message, Progress):
                    message = message.message
                if self._raw and not isinstance(message, bytes):
                    message = message.SerializeToString()
                yield message
        except Exception as exc:
            raise _reported(exc, context) from None


class LocalStub:
    """Stands for a generated stub: `stub.Method(request, timeout=..., metadata=...)`."""

    def __init__(self, servicer: Any, cancel: CancelToken, policy: StreamPolicy) -> None:
        self._servicer, self._cancel, self._policy = servicer, cancel, policy

    def __getattr__(self, name: str) -> _LocalMethod:
        behavior = getattr(self._servicer, name)
        return _LocalMethod(behavior, self._cancel, self._policy, raw=False)

    def raw(self, name: str) -> _LocalMethod:
        """The method with its responses serialized, as the client's raw GetActivations reads."""
        return _LocalMethod(getattr(self._servicer, name), self._cancel, self._policy, raw=True)


def local_client(inspector: Any, health: Any, cancel: CancelToken, policy: StreamPolicy) -> Client:
    """vitscope.Client over the in-process servicer; `cancel` ends every call it makes, and
    no deadline applies beyond it."""
    stub = LocalStub(inspector, cancel, policy)
    stubs = Stubs(stub, stub.raw("GetActivations"), LocalStub(health, cancel, policy))
    return Client.over(stubs, timeout=0.0)
