"""A core error as a gRPC status with google.rpc error details (the richer error model).

Every status carries ErrorInfo (reason, domain, metadata); INVALID_ARGUMENT adds a
BadRequest field violation, NOT_FOUND a ResourceInfo, FAILED_PRECONDITION a
PreconditionFailure, and retryable reasons a RetryInfo plus the retry pushback
that gRPC clients with a retry policy honour.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from vitscope_server.core.runtime import errors

DOMAIN = "vitscope.v1"
MAX_MESSAGE_CHARS = 1000
"""Status messages are cut here, so the trailers stay far below gRPC's metadata limit."""

PUSHBACK_KEY = "grpc-retry-pushback-ms"
_RETRYABLE_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


@dataclass(frozen=True)
class _Status(grpc.Status):
    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


def _packed(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _details(error: errors.VitscopeError, code: grpc.StatusCode) -> list[Message]:
    metadata = dict(error.metadata)
    if error.field:
        metadata["field"] = error.field
    found: list[Message] = [
        error_details_pb2.ErrorInfo(reason=error.reason.value, domain=DOMAIN, metadata=metadata)
    ]
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        description = cut(getattr(error, "description", error.message))
        field = error_details_pb2.BadRequest.FieldViolation(
            field=error.field, description=description, reason=error.reason.value
        )
        found.append(error_details_pb2.BadRequest(field_violations=[field]))
    if isinstance(error, errors.NotFound):
        found.append(
            error_details_pb2.ResourceInfo(
                resource_type=error.resource_type,
                resource_name=error.resource_name,
                description=cut(error.message),
            )
        )
    if isinstance(error, errors.FailedPrecondition):
        unmet = error_details_pb2.PreconditionFailure.Violation(
            type=error.reason.value, subject=error.subject, description=cut(error.message)
        )
        found.append(error_details_pb2.PreconditionFailure(violations=[unmet]))
    if error.retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(int(error.retry_after * 1000))
        found.append(error_details_pb2.RetryInfo(retry_delay=delay))
    return found


def cut(message: str) -> str:
    """At most MAX_MESSAGE_CHARS of a message, for the status and every detail."""
    return message if len(message) <= MAX_MESSAGE_CHARS else message[:MAX_MESSAGE_CHARS] + "..."


def rich_status(code: grpc.StatusCode, error: errors.VitscopeError) -> grpc.Status:
    """The status to abort with: message, google.rpc.Status details, retry pushback."""
    message = cut(error.message)
    status = status_pb2.Status(
        code=code.value[0],
        message=message,
        details=[_packed(d) for d in _details(error, code)],
    )
    trailers = list(rpc_status.to_status(status).trailing_metadata)
    if error.retry_after is not None:
        trailers.append((PUSHBACK_KEY, str(int(error.retry_after * 1000))))
    elif code in _RETRYABLE_CODES:
        # A negative pushback tells a client's retry policy not to retry this one.
        trailers.append((PUSHBACK_KEY, "-1"))
    return _Status(code, message, tuple(trailers))
