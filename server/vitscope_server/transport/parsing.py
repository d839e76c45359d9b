"""Request bytes that do not parse become INVALID_ARGUMENT (REQUEST_UNPARSEABLE) instead of
grpcio's INTERNAL with a logged traceback, and only after the caller's token was checked:
the deserializer hands the handler a stand-in that the interceptor refuses in turn."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from vitscope_server.core.runtime import errors
from vitscope_server.core.runtime.errors import Reason
from vitscope_server.transport import fields


class Unparseable:
    """Stands in for request bytes that did not parse, so that the token is checked
    before the call is refused (grpcio would answer INTERNAL and log a traceback)."""

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name

    def error(self, field: str) -> errors.InvalidArgument:
        return errors.InvalidArgument(
            field,
            f"the request bytes do not parse as {self.type_name}",
            reason=Reason.REQUEST_UNPARSEABLE,
        )


def tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """The method's deserializer, answering Unparseable instead of raising."""
    if deserializer is None:
        return None
    type_name = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    name = type_name.full_name if type_name is not None else "the request message"

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # any parse failure: DecodeError, recursion limits, bad UTF-8
            return Unparseable(name)

    return deserialize


def parsed(requests: Iterator[Any]) -> Iterator[Any]:
    """The second and later messages of a client stream, refusing one that did not parse
    or whose fields their declarations do not allow."""
    for number, request in enumerate(requests, start=1):
        if isinstance(request, Unparseable):
            raise request.error(f"requests[{number}]")
        fields.check(request, f"requests[{number}]")
        yield request
