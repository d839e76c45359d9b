"""One exception class per gRPC status code the service returns."""

from __future__ import annotations

import grpc


class VitscopeError(Exception):
    """Base class; `code` is the gRPC status code name, `details` the server's message."""

    code = "UNKNOWN"

    def __init__(self, details: str) -> None:
        super().__init__(f"{self.code}: {details}")
        self.details = details


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


def from_rpc_error(error: grpc.RpcError) -> VitscopeError:
    code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = error.details() if isinstance(error, grpc.Call) else str(error)
    error_type = _BY_CODE.get(code, VitscopeError)
    exc = error_type(details or "")
    if error_type is VitscopeError:
        exc.code = code.name
    return exc
