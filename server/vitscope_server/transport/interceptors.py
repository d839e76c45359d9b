"""Cross-cutting RPC behavior: bearer-token auth, request parsing, error mapping, metrics.

Core errors are plain exceptions; this is the one place that turns them into
statuses with error details (transport/status.py). Allocation failures become
RESOURCE_EXHAUSTED; any other unexpected exception is a bug and becomes
INTERNAL with an id that is logged.
"""

from __future__ import annotations

import hmac
import itertools
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import torch

from vitscope_server.core.runtime import errors
from vitscope_server.core.runtime.errors import Reason
from vitscope_server.transport import fields
from vitscope_server.transport.metrics import Metrics, labelled
from vitscope_server.transport.parsing import Unparseable, parsed, tolerant
from vitscope_server.transport.progress import StreamPolicy, buffered, sent_directly
from vitscope_server.transport.status import rich_status

log = logging.getLogger(__name__)

# The services whose calls are authenticated, counted and mapped here.
SERVICE_PREFIXES = ("/vitscope.v1.Inspector/", "/inference.GRPCInferenceService/")
# Where a request names its model: the Inspector's model, the inference protocol's
# model_name (ModelInfer) or name (ModelReady, ModelMetadata).
_MODEL_FIELDS = ("model", "model_name", "name")

_CODES: list[tuple[type[errors.VitscopeError], grpc.StatusCode]] = [
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.Cancelled, grpc.StatusCode.CANCELLED),
]


_CALLER_ENDS = (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)


class _Unauthenticated(errors.VitscopeError):
    default_reason = Reason.TOKEN_INVALID


class _Internal(errors.VitscopeError):
    default_reason = Reason.INTERNAL_ERROR


def caller_end(context: grpc.ServicerContext) -> grpc.StatusCode | None:
    """DEADLINE_EXCEEDED when the caller's deadline has passed, CANCELLED when the caller went
    away; None while the call is live."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if not context.is_active():
        return grpc.StatusCode.CANCELLED
    return None


def _ended_by_caller(
    exc: BaseException, context: grpc.ServicerContext
) -> tuple[grpc.StatusCode, errors.VitscopeError] | None:
    """A call the caller ended (its deadline, its cancellation): work stopped on purpose, or a
    client stream's next message could not be read (grpcio raises a bare RpcError)."""
    ended = caller_end(context)
    if not isinstance(exc, errors.Cancelled) and not (
        ended is not None and isinstance(exc, grpc.RpcError)
    ):
        return None
    if ended is grpc.StatusCode.DEADLINE_EXCEEDED:
        error = errors.Cancelled("deadline exceeded; work stopped", reason=Reason.DEADLINE_EXCEEDED)
    else:
        ended = grpc.StatusCode.CANCELLED
        error = exc if isinstance(exc, errors.Cancelled) else errors.Cancelled("call cancelled")
    return ended, error


def classify(
    exc: BaseException, context: grpc.ServicerContext
) -> tuple[grpc.StatusCode, errors.VitscopeError]:
    """The status code and the domain error to report for an exception a method raised."""
    ended = _ended_by_caller(exc, context)
    if ended is not None:
        return ended
    for error_type, code in _CODES:
        if isinstance(exc, error_type):
            return code, exc
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        log.warning("out of memory: %s", str(exc)[:200])
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # give back what the failed call's tensors held
        oom = errors.out_of_memory("out of memory for this request; send a smaller one")
        return grpc.StatusCode.RESOURCE_EXHAUSTED, oom
    error_id = uuid.uuid4().hex[:12]
    log.error("internal error %s", error_id, exc_info=exc)
    message = f"internal error (id {error_id}); the server log has the details"
    return grpc.StatusCode.INTERNAL, _Internal(message, metadata={"error_id": error_id})


def _abort(
    context: grpc.ServicerContext, code: grpc.StatusCode, error: errors.VitscopeError
) -> None:
    context.abort_with_status(rich_status(code, error))


def _passing_bytes_through(serializer: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
    """Responses may come already serialized (large tensor chunks, ModelInfer's outputs)."""

    def serialize(response: Any) -> bytes:
        return response if isinstance(response, bytes) else serializer(response)

    return serialize


def _message_size(response: Any) -> int:
    return len(response) if isinstance(response, bytes) else int(response.ByteSize())


class _Call:
    """Bookkeeping of one RPC for metrics."""

    def __init__(self, metrics: Metrics, method: str, model: str) -> None:
        self.metrics, self.method, self.model = metrics, method, model
        self.started = time.perf_counter()
        self.sent = 0
        labelled(metrics.in_flight, method).inc()

    def finish(self, code: grpc.StatusCode) -> None:
        name = code.name
        if code in _CALLER_ENDS:
            # The caller's deadline or cancellation: nothing went wrong on the server.
            log.info("%s call ended by its caller: %s", self.method, name)
        labelled(self.metrics.in_flight, self.method).dec()
        labelled(self.metrics.requests, self.method, self.model, name).inc()
        labelled(self.metrics.latency, self.method, self.model, name).observe(
            time.perf_counter() - self.started
        )
        labelled(self.metrics.sent_bytes, self.method, self.model).inc(self.sent)


class ServiceInterceptor(grpc.ServerInterceptor):
    """Wraps every Inspector method; health and reflection pass untouched."""

    def __init__(
        self,
        metrics: Metrics,
        model_label: Callable[[str], str],
        token: str | None,
        streams: StreamPolicy | None = None,
    ) -> None:
        """model_label maps a requested model name to a bounded label (unknown names share one);
        streams bounds every server stream's buffer and how long its reader may stall."""
        self._metrics = metrics
        self._streams = streams or StreamPolicy()
        self._model_label_of = model_label
        self._token = token

    def _refusal(self, details: grpc.HandlerCallDetails) -> _Unauthenticated | None:
        """Why the call's credentials are refused; None when they are accepted."""
        if self._token is None:
            return None
        values = [v for k, v in details.invocation_metadata or () if k == "authorization"]
        if len(values) > 1:
            return _Unauthenticated(
                f"{len(values)} 'authorization' entries; send exactly one bearer token",
                reason=Reason.CREDENTIALS_DUPLICATED,
            )
        scheme, _, presented = str(values[0] if values else "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
            presented.encode(), self._token.encode()
        ):
            return None
        return _Unauthenticated("missing or invalid bearer token in 'authorization' metadata")

    def intercept_service(
        self, continuation: Callable[..., Any], details: grpc.HandlerCallDetails
    ) -> Any:
        handler = continuation(details)
        if handler is None or not details.method.startswith(SERVICE_PREFIXES):
            return handler
        method = details.method.rpartition("/")[2]
        refusal = self._refusal(details)
        deserializer = tolerant(handler.request_deserializer)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, method, refusal),
                request_deserializer=deserializer,
                response_serializer=_passing_bytes_through(handler.response_serializer),
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(handler.unary_stream, method, refusal),
                request_deserializer=deserializer,
                response_serializer=_passing_bytes_through(handler.response_serializer),
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._client_stream(handler.stream_unary, method, refusal),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _model_label(self, request: Any) -> str:
        name = next((getattr(request, f) for f in _MODEL_FIELDS if hasattr(request, f)), "")
        return self._model_label_of(str(name))

    @staticmethod
    def _admit(request: Any, refusal: _Unauthenticated | None) -> None:
        """Credentials first, then whether the request parsed, then every field it sets
        against its declaration (before any conversion, decode or forward)."""
        if refusal is not None:
            raise refusal
        if isinstance(request, Unparseable):
            raise request.error("")
        if request is not None:
            fields.check(request)

    @staticmethod
    def _status(
        exc: Exception, request: Any, context: grpc.ServicerContext
    ) -> tuple[grpc.StatusCode, errors.VitscopeError]:
        """The code and error to report; the error's metadata names the requested model."""
        if isinstance(exc, _Unauthenticated):
            return grpc.StatusCode.UNAUTHENTICATED, exc
        code, error = classify(exc, context)
        model = next((getattr(request, f) for f in _MODEL_FIELDS if hasattr(request, f)), "")
        if model and isinstance(model, str):
            error.metadata.setdefault("model", errors.short(model))
        return code, error

    def _unary(
        self, behavior: Callable[..., Any], method: str, refusal: _Unauthenticated | None
    ) -> Callable[..., Any]:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            call = _Call(self._metrics, method, self._model_label(request))
            code = grpc.StatusCode.OK
            try:
                try:
                    self._admit(request, refusal)
                    response = behavior(request, context)
                except Exception as exc:
                    code, error = self._status(exc, request, context)
                    _abort(context, code, error)
                call.sent = _message_size(response)
                # Answered after the caller left: the caller sees its own end, and so do the metrics.
                code = caller_end(context) or code
                return response
            finally:
                call.finish(code)

        return wrapped

    def _client_stream(
        self, behavior: Callable[..., Any], method: str, refusal: _Unauthenticated | None
    ) -> Callable[..., Any]:
        """Client-streaming calls are handled as unary ones labelled by their first request."""

        def wrapped(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            first = next(requests, None)
            everything = itertools.chain([] if first is None else [first], parsed(requests))
            unary = self._unary(lambda _first, ctx: behavior(everything, ctx), method, refusal)
            return unary(first, context)

        return wrapped

    def _stream(
        self, behavior: Callable[..., Any], method: str, refusal: _Unauthenticated | None
    ) -> Callable[..., Any]:
        sender = sent_directly if getattr(behavior, "sends_after_compute", False) else buffered

        def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            call = _Call(self._metrics, method, self._model_label(request))
            code = grpc.StatusCode.OK
            try:
                try:
                    self._admit(request, refusal)
                    for response in sender(behavior(request, context), context, self._streams):
                        call.sent += _message_size(response)
                        yield response
                except Exception as exc:
                    code, error = self._status(exc, request, context)
                    _abort(context, code, error)
                code = caller_end(context) or code
            except GeneratorExit:
                code = caller_end(context) or grpc.StatusCode.CANCELLED
                raise
            finally:
                call.finish(code)

        return wrapped
