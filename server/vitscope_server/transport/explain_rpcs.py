"""Explain: convert, validate before compute, run the core in a compute slot, stream back."""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator

import grpc

from vitscope.v1 import explain_pb2 as pb
from vitscope_server.core.explain.batching import explain_batch_key
from vitscope_server.core.explain.compute import Event, ExplanationHeader, explain
from vitscope_server.core.explain.estimate import explanation_bytes
from vitscope_server.core.explain.query import (
    ExplainLimits,
    PreparedExplanation,
    check_explanation,
    prepare_explanation,
)
from vitscope_server.core.runtime.batching import Arrival
from vitscope_server.core.runtime.cancel import CancelToken
from vitscope_server.transport import convert, convert_explain
from vitscope_server.transport.cancellation import cancel_token
from vitscope_server.transport.compute import computing, record_batched
from vitscope_server.transport.state import ServicerState


class ExplainRpcs(ServicerState):
    """Mixed into the Inspector servicer."""

    def Explain(
        self, request: pb.ExplainRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ExplainResponse]:
        loaded = self._registry.get(request.model)
        limits = ExplainLimits(
            self._limits.max_batch,
            self._limits.max_pixels,
            self._limits.max_result_bytes,
            self._chunk_bytes,
        )
        images = convert.image_inputs(list(request.images))
        query = convert_explain.explain_query(request)
        effective = check_explanation(loaded, query, len(images), limits)
        need = explanation_bytes(loaded.adapter, images, self._limits.max_pixels)
        cancel = cancel_token(context)
        model = loaded.spec.name
        with self._budget.reserve(need, cancel):
            with self._batchers.explanations.arriving(model) as arrival:
                prepared = prepare_explanation(loaded, images, effective, limits)
                key = explain_batch_key(prepared)
                shared = None if key is None else self._shared(arrival, key, prepared, cancel)
            if shared is not None:
                yield from self._responses(shared)
                return
            with computing(self._slots, self._metrics, cancel, "Explain", model) as slot:
                yield from self._responses(slot.steps(explain(prepared, cancel)))

    def _responses(self, events: Iterable[Event]) -> Iterator[pb.ExplainResponse]:
        names: list[str] = []
        for event in events:
            if isinstance(event, ExplanationHeader):
                names = event.class_names
            yield convert_explain.explain_response(event, names, self._chunk_bytes)

    def _shared(
        self, arrival: Arrival, key: Hashable, prepared: PreparedExplanation, cancel: CancelToken
    ) -> list[Event]:
        """A request whose methods share a forward runs in the explanations batcher; it sends
        nothing until its batch is done."""
        events, info = self._batchers.explanations.submit(
            arrival, key, prepared, int(prepared.pixels.shape[0]), cancel
        )
        record_batched(self._metrics, "Explain", prepared.loaded.spec.name, info)
        return events
