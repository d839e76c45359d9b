"""Cross-cutting RPC behaviour: bearer-token auth, error mapping, metrics.

Core errors are plain exceptions; this is the one place that turns them into
status codes. Unexpected exceptions become INTERNAL with an id that is logged.
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

from vitscope_server.core import errors
from vitscope_server.transport.metrics import Metrics

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


def status_for(exc: BaseException, context: grpc.ServicerContext) -> tuple[grpc.StatusCode, str]:
    if (
        isinstance(exc, errors.Cancelled)
        and context.time_remaining() is not None
        and context.time_remaining() <= 0
    ):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded; work stopped"
    for error_type, code in _CODES:
        if isinstance(exc, error_type):
            return code, str(exc)
    if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "out of memory; send a smaller request"
    error_id = uuid.uuid4().hex[:12]
    log.error("internal error %s", error_id, exc_info=exc)
    return (
        grpc.StatusCode.INTERNAL,
        f"internal error (id {error_id}); the server log has the details",
    )


def _passing_bytes_through(serializer: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
    """Streams may yield responses already serialized (large tensor chunks)."""

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
        metrics.in_flight.labels(method).inc()

    def finish(self, code: grpc.StatusCode) -> None:
        name = code.name
        self.metrics.in_flight.labels(self.method).dec()
        self.metrics.requests.labels(self.method, self.model, name).inc()
        self.metrics.latency.labels(self.method, self.model, name).observe(
            time.perf_counter() - self.started
        )
        self.metrics.sent_bytes.labels(self.method, self.model).inc(self.sent)


class ServiceInterceptor(grpc.ServerInterceptor):
    """Wraps every Inspector method; health and reflection pass untouched."""

    def __init__(
        self, metrics: Metrics, model_label: Callable[[str], str], token: str | None
    ) -> None:
        """model_label maps a requested model name to a bounded label (unknown names share one)."""
        self._metrics = metrics
        self._model_label_of = model_label
        self._token = token

    def _authorized(self, details: grpc.HandlerCallDetails) -> bool:
        if self._token is None:
            return True
        metadata = dict(details.invocation_metadata or ())
        value = metadata.get("authorization", "")
        scheme, _, presented = str(value).partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            presented.encode(), self._token.encode()
        )

    def intercept_service(
        self, continuation: Callable[..., Any], details: grpc.HandlerCallDetails
    ) -> Any:
        handler = continuation(details)
        if handler is None or not details.method.startswith(SERVICE_PREFIXES):
            return handler
        method = details.method.rpartition("/")[2]
        authorized = self._authorized(details)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, method, authorized),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(handler.unary_stream, method, authorized),
                request_deserializer=handler.request_deserializer,
                response_serializer=_passing_bytes_through(handler.response_serializer),
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._client_stream(handler.stream_unary, method, authorized),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _model_label(self, request: Any) -> str:
        name = next((getattr(request, f) for f in _MODEL_FIELDS if hasattr(request, f)), "")
        return self._model_label_of(str(name))

    def _unary(
        self, behaviour: Callable[..., Any], method: str, authorized: bool
    ) -> Callable[..., Any]:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            call = _Call(self._metrics, method, self._model_label(request))
            code = grpc.StatusCode.OK
            try:
                if not authorized:
                    code = grpc.StatusCode.UNAUTHENTICATED
                    context.abort(
                        code, "missing or invalid bearer token in 'authorization' metadata"
                    )
                try:
                    response = behaviour(request, context)
                except Exception as exc:
                    code, message = status_for(exc, context)
                    context.abort(code, message)
                call.sent = response.ByteSize()
                return response
            finally:
                call.finish(code)

        return wrapped

    def _client_stream(
        self, behaviour: Callable[..., Any], method: str, authorized: bool
    ) -> Callable[..., Any]:
        """Client-streaming calls are handled as unary ones labelled by their first request."""

        def wrapped(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            first = next(requests, None)
            everything = itertools.chain([] if first is None else [first], requests)
            unary = self._unary(lambda _first, ctx: behaviour(everything, ctx), method, authorized)
            return unary(first, context)

        return wrapped

    def _stream(
        self, behaviour: Callable[..., Any], method: str, authorized: bool
    ) -> Callable[..., Any]:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            call = _Call(self._metrics, method, self._model_label(request))
            code = grpc.StatusCode.OK
            try:
                if not authorized:
                    code = grpc.StatusCode.UNAUTHENTICATED
                    context.abort(
                        code, "missing or invalid bearer token in 'authorization' metadata"
                    )
                try:
                    for response in behaviour(request, context):
                        call.sent += _message_size(response)
                        yield response
                except Exception as exc:
                    code, message = status_for(exc, context)
                    context.abort(code, message)
                if not context.is_active():
                    code = grpc.StatusCode.CANCELLED
            except GeneratorExit:
                remaining = context.time_remaining()
                expired = remaining is not None and remaining <= 0
                code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
                raise
            finally:
                call.finish(code)

        return wrapped
