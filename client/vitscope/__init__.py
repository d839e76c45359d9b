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
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    VitscopeError,
)

__all__ = [
    "Activations",
    "CancelledError",
    "Client",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "ModelDescription",
    "ModelInfo",
    "NotFoundError",
    "Prediction",
    "ResourceExhaustedError",
    "SiteActivations",
    "UnauthenticatedError",
    "UnavailableError",
    "VitscopeError",
]
