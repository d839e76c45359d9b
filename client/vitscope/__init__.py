"""vitscope: a client for the vitscope gRPC service (imports without torch)."""

from vitscope.client import (
    Activations,
    Client,
    ModelDescription,
    ModelInfo,
    Prediction,
    SiteActivations,
)
from vitscope.errors import (
    CancelledError,
    DeadlineExceededError,
    FailedPreconditionError,
    FieldViolation,
    IncompatibleServerError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    VitscopeError,
)
from vitscope.handshake import ServerInfo, ServerLimits

__all__ = [
    "Activations",
    "CancelledError",
    "Client",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "FieldViolation",
    "IncompatibleServerError",
    "InternalError",
    "InvalidArgumentError",
    "ModelDescription",
    "ModelInfo",
    "NotFoundError",
    "Prediction",
    "ResourceExhaustedError",
    "ServerInfo",
    "ServerLimits",
    "SiteActivations",
    "UnauthenticatedError",
    "UnavailableError",
    "VitscopeError",
]
