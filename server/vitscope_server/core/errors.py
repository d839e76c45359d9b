"""Domain errors of the core. They know nothing of the transport; the gRPC layer
maps each class to a status code in one place."""

from __future__ import annotations


class VitscopeError(Exception):
    """Base of every error the core raises on purpose."""


class InvalidArgument(VitscopeError):
    """A request field is malformed or out of range; the message names it."""


class NotFound(VitscopeError):
    """A named model, site or inverter does not exist."""


class PermissionDenied(VitscopeError):
    """The request names something the operator does not allow, e.g. a folder outside the image roots."""


class FailedPrecondition(VitscopeError):
    """The request is fine but the server cannot act on it now, e.g. weights missing offline."""


class ResourceExhausted(VitscopeError):
    """Too large, queue full, or out of accelerator memory."""


class Unavailable(VitscopeError):
    """Try again later: a model is still loading, or the server is shutting down."""


class Cancelled(VitscopeError):
    """The caller went away or its deadline passed; work stopped."""
