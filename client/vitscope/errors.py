"""One exception class per gRPC status code the service returns, carrying the
server's error details (google.rpc richer error model): branch on `.reason`,
not on the message."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "vitscope.v1"


@dataclass(frozen=True)
class FieldViolation:
    """A request field at fault, as a proto path (`tokens.indices[3]`; "" is the whole request)."""

    field: str
    description: str


class VitscopeError(Exception):
    """Base class.

    code: the gRPC status code name. details: the server's message.
    reason: the stable reason (see docs/errors.md), "" when the status carried none.
    field_violations: the fields at fault (INVALID_ARGUMENT).
    retry_after: seconds after which the same call may succeed, None when a retry cannot help.
    metadata: small context such as the model name and the field.
    resource: (type, name) of what was not found, or None.
    """

    code = "UNKNOWN"

    def __init__(
        self,
        details: str,
        *,
        reason: str = "",
        field_violations: tuple[FieldViolation, ...] = (),
        retry_after: float | None = None,
        metadata: dict[str, str] | None = None,
        resource: tuple[str, str] | None = None,
    ) -> None:
        super().__init__(f"{self.code}: {details}")
        self.details = details
        self.reason = reason
        self.field_violations = field_violations
        self.retry_after = retry_after
        self.metadata = dict(metadata or {})
        self.resource = resource

    def describe(self) -> str:
        """Several lines for a person: code and reason, message, fields, retry advice."""
        lines = [f"error: {self.code}" + (f" ({self.reason})" if self.reason else "")]
        lines.append(f"  {self.details}")
        lines += [
            f"  field {v.field or '(request)'}: {v.description}" for v in self.field_violations
        ]
        if self.resource is not None:
            lines.append(f"  {self.resource[0]}: {self.resource[1]}")
        shown = {k: v for k, v in self.metadata.items() if k != "field"}
        if shown:
            lines.append("  " + ", ".join(f"{k}={v}" for k, v in sorted(shown.items())))
        if self.retry_after is not None:
            lines.append(f"  retry after {self.retry_after:g} s")
        return "\n".join(lines)


class InvalidArgumentError(VitscopeError):
    code = "INVALID_ARGUMENT"


class NotFoundError(VitscopeError):
    code = "NOT_FOUND"


class FailedPreconditionError(VitscopeError):
    code = "FAILED_PRECONDITION"


class ResourceExhaustedError(VitscopeError):
    code = "RESOURCE_EXHAUSTED"


class UnavailableError(VitscopeError):
    code = "UNAVAILABLE"


class DeadlineExceededError(VitscopeError):
    code = "DEADLINE_EXCEEDED"


class CancelledError(VitscopeError):
    code = "CANCELLED"


class UnauthenticatedError(VitscopeError):
    code = "UNAUTHENTICATED"


class PermissionDeniedError(VitscopeError):
    code = "PERMISSION_DENIED"


class InternalError(VitscopeError):
    code = "INTERNAL"


class IncompatibleServerError(VitscopeError):
    """The server speaks a protocol this client cannot use; the message names both versions."""

    code = "INCOMPATIBLE_SERVER"


_BY_CODE: dict[grpc.StatusCode, type[VitscopeError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.CANCELLED: CancelledError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.INTERNAL: InternalError,
}


def _rich_status(error: grpc.RpcError) -> status_pb2.Status | None:
    try:
        return rpc_status.from_call(error)
    except ValueError:  # details that contradict the status: ignore them
        return None


def _unpacked(status: status_pb2.Status | None) -> dict[str, object]:
    """Keyword arguments for VitscopeError from the status details."""
    found: dict[str, object] = {}
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            found["reason"], found["metadata"] = info.reason, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            found["field_violations"] = tuple(
                FieldViolation(v.field, v.description) for v in bad.field_violations
            )
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            found["retry_after"] = retry.retry_delay.ToMilliseconds() / 1000
        elif detail.Is(error_details_pb2.ResourceInfo.DESCRIPTOR):
            resource = error_details_pb2.ResourceInfo()
            detail.Unpack(resource)
            found["resource"] = (resource.resource_type, resource.resource_name)
    return found


def from_rpc_error(error: grpc.RpcError) -> VitscopeError:
    """The typed error for a failed call, with the details the server attached."""
    code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = error.details() if isinstance(error, grpc.Call) else str(error)
    error_type = _BY_CODE.get(code, VitscopeError)
    rich = _rich_status(error) if isinstance(error, grpc.Call) else None
    exc = error_type(details or "", **_unpacked(rich))  # type: ignore[arg-type]
    if error_type is VitscopeError:
        exc.code = code.name
    return exc
