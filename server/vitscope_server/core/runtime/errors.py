"""Domain errors of the core. They know nothing of the transport; the gRPC layer
maps each class to a status code, and each error's reason, field and metadata to
the richer error model, in one place.

Every error carries a stable machine-readable `reason` (see docs/errors.md);
callers branch on it, never on the English message. Messages quote at most a
short prefix of anything the caller sent (`quote`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from enum import Enum

QUOTE_LIMIT = 48
"""Characters of a caller's string an error message or metadata value may repeat."""


class Reason(str, Enum):
    """Stable reasons, unique within the service's error domain."""

    # INVALID_ARGUMENT: every one names the offending field.
    INVALID_FIELD = "INVALID_FIELD"
    FIELD_REQUIRED = "FIELD_REQUIRED"
    IMAGE_UNDECODABLE = "IMAGE_UNDECODABLE"
    REQUEST_UNPARSEABLE = "REQUEST_UNPARSEABLE"
    OPTIMIZATION_DIVERGED = "OPTIMIZATION_DIVERGED"
    # NOT_FOUND
    MODEL_NOT_FOUND = "MODEL_NOT_FOUND"
    SITE_NOT_FOUND = "SITE_NOT_FOUND"
    INVERTER_NOT_FOUND = "INVERTER_NOT_FOUND"
    FOLDER_NOT_FOUND = "FOLDER_NOT_FOUND"
    DATA_NOT_FOUND = "DATA_NOT_FOUND"
    # PERMISSION_DENIED
    FOLDER_NOT_ALLOWED = "FOLDER_NOT_ALLOWED"
    # FAILED_PRECONDITION
    MODEL_LOAD_FAILED = "MODEL_LOAD_FAILED"
    WEIGHTS_UNUSABLE = "WEIGHTS_UNUSABLE"
    MODEL_UNSUPPORTED = "MODEL_UNSUPPORTED"
    NO_CLASSIFIER = "NO_CLASSIFIER"
    # RESOURCE_EXHAUSTED
    IMAGE_TOO_LARGE = "IMAGE_TOO_LARGE"
    BATCH_TOO_LARGE = "BATCH_TOO_LARGE"
    RESULT_TOO_LARGE = "RESULT_TOO_LARGE"
    LIMIT_EXCEEDED = "LIMIT_EXCEEDED"
    QUEUE_FULL = "QUEUE_FULL"
    OUT_OF_MEMORY = "OUT_OF_MEMORY"
    REQUEST_BUDGET_EXCEEDED = "REQUEST_BUDGET_EXCEEDED"
    SERVER_BUDGET_EXCEEDED = "SERVER_BUDGET_EXCEEDED"
    SLOW_READER = "SLOW_READER"
    # UNAVAILABLE
    MODEL_LOADING = "MODEL_LOADING"
    # CANCELLED and DEADLINE_EXCEEDED
    CANCELLED = "CANCELLED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    # UNAUTHENTICATED
    TOKEN_INVALID = "TOKEN_INVALID"
    CREDENTIALS_DUPLICATED = "CREDENTIALS_DUPLICATED"
    # INTERNAL: a bug; the message carries an id that the server log repeats.
    INTERNAL_ERROR = "INTERNAL_ERROR"


RETRY_AFTER_SECONDS: dict[Reason, float] = {
    Reason.QUEUE_FULL: 1.0,
    Reason.SERVER_BUDGET_EXCEEDED: 1.0,
    Reason.MODEL_LOADING: 5.0,
}
"""Reasons worth retrying unchanged, with the delay the server suggests."""


def quote(value: object) -> str:
    """repr of a caller's string cut to a short prefix, so errors never echo unbounded input."""
    text = str(value)
    if len(text) <= QUOTE_LIMIT:
        return repr(text)
    return f"{text[:QUOTE_LIMIT]!r}... ({len(text)} characters)"


def quote_all(values: Iterable[object], count: int = 5) -> str:
    """The first `count` of a caller's strings, each quoted."""
    items = list(values)
    shown = ", ".join(quote(v) for v in items[:count])
    more = f", ... ({len(items)} in all)" if len(items) > count else ""
    return f"[{shown}{more}]"


def short(value: object) -> str:
    """A caller's string cut to a short prefix, unquoted (for metadata values)."""
    text = str(value)
    return text if len(text) <= QUOTE_LIMIT else text[:QUOTE_LIMIT] + "..."


class VitscopeError(Exception):
    """Base of every error the core raises on purpose.

    reason: stable identifier (the class's default when not given).
    field: the request field at fault, as a proto path (`tokens.indices[3]`), or "".
    metadata: small key-value context such as the model name; values are cut short.
    """

    default_reason = Reason.INVALID_FIELD

    def __init__(
        self,
        message: str,
        *,
        reason: Reason | None = None,
        field: str = "",
        metadata: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.field = field
        self.metadata = {key: short(value) for key, value in (metadata or {}).items()}

    @property
    def retry_after(self) -> float | None:
        """Seconds after which the same request may succeed; None when retrying cannot help."""
        return RETRY_AFTER_SECONDS.get(self.reason)


class InvalidArgument(VitscopeError):
    """A request field is malformed or out of range. The field is mandatory: "" means
    the request as a whole (bytes that do not parse)."""

    def __init__(
        self,
        field: str,
        description: str,
        *,
        reason: Reason = Reason.INVALID_FIELD,
        metadata: Mapping[str, object] | None = None,
    ) -> None:
        message = f"{field}: {description}" if field else description
        super().__init__(message, reason=reason, field=field, metadata=metadata)
        self.description = description


_RESOURCE_TYPES = {
    Reason.MODEL_NOT_FOUND: "model",
    Reason.SITE_NOT_FOUND: "site",
    Reason.INVERTER_NOT_FOUND: "inverter",
    Reason.FOLDER_NOT_FOUND: "folder",
    Reason.DATA_NOT_FOUND: "data",
}


class NotFound(VitscopeError):
    """A named model, site, inverter or folder does not exist."""

    default_reason = Reason.MODEL_NOT_FOUND

    def __init__(
        self,
        reason: Reason,
        name: str,
        message: str,
        *,
        field: str = "",
        metadata: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(message, reason=reason, field=field, metadata=metadata)
        self.resource_type = _RESOURCE_TYPES[reason]
        self.resource_name = short(name)


class PermissionDenied(VitscopeError):
    """The request names something the operator does not allow, e.g. a folder outside the image roots."""

    default_reason = Reason.FOLDER_NOT_ALLOWED


class FailedPrecondition(VitscopeError):
    """The request is fine but the server cannot act on it now, e.g. weights missing offline.

    subject: what the precondition is about (a model name, a weights file)."""

    default_reason = Reason.MODEL_UNSUPPORTED

    def __init__(
        self,
        message: str,
        *,
        reason: Reason | None = None,
        subject: str = "",
        field: str = "",
        metadata: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(message, reason=reason, field=field, metadata=metadata)
        self.subject = short(subject)


class ResourceExhausted(VitscopeError):
    """Too large, queue full, over a budget, or out of memory."""

    default_reason = Reason.LIMIT_EXCEEDED


class Unavailable(VitscopeError):
    """Try again later: a model is still loading, or the server is shutting down."""

    default_reason = Reason.MODEL_LOADING


class Cancelled(VitscopeError):
    """The caller went away or its deadline passed; work stopped."""

    default_reason = Reason.CANCELLED


def refiled(error: VitscopeError, field: str, detail: str = "") -> VitscopeError:
    """The same error about another request field: a core check run for a request that
    spells its fields differently (ModelInfer's outputs and inputs). `detail` goes before the
    error's own words, e.g. which item of the field."""
    own = error.message.removeprefix(f"{error.field}: ") if error.field else error.message
    message = f"{field}: {detail}{own}"
    moved = type(error).__new__(type(error))
    moved.__dict__.update(error.__dict__)
    Exception.__init__(moved, message)
    moved.message, moved.field = message, field
    if isinstance(moved, InvalidArgument):
        moved.description = f"{detail}{own}"
    return moved


def require_in_range(
    field: str, values: Sequence[int], low: int, high: int, context: str = ""
) -> None:
    """Refuses the first value outside low..high, naming it by its index (`channels[3]`)."""
    for index, value in enumerate(values):
        if not low <= value <= high:
            raise InvalidArgument(
                f"{field}[{index}]", f"{value} out of range{context}; allowed {low}..{high}"
            )


def require_unique(field: str, values: Sequence[object]) -> None:
    """Refuses the first value that repeats an earlier one, naming it by its index."""
    seen: dict[object, int] = {}
    for index, value in enumerate(values):
        if value in seen:
            raise InvalidArgument(
                f"{field}[{index}]", f"repeats {field}[{seen[value]}]; each may appear once"
            )
        seen[value] = index


def out_of_memory(message: str) -> ResourceExhausted:
    """The error for an allocation that failed (torch.OutOfMemoryError or MemoryError)."""
    return ResourceExhausted(message, reason=Reason.OUT_OF_MEMORY)
