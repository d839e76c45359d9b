"""Explain: convert, validate before compute, run the core in a compute slot, stream back."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from vitscope.v1 import explain_pb2 as pb
from vitscope_server.core.activations import ActivationLimits
from vitscope_server.core.budget import MemoryBudget, backward_bytes, images_bytes
from vitscope_server.core.explain import ExplanationHeader, explain
from vitscope_server.core.explain_query import ExplainLimits, prepare_explanation
from vitscope_server.core.registry import ModelRegistry
from vitscope_server.core.slots import ComputeSlots
from vitscope_server.transport import convert, convert_explain
from vitscope_server.transport.cancellation import cancel_token
from vitscope_server.transport.compute import computing
from vitscope_server.transport.metrics import Metrics


class ExplainRpcs:
    """Mixed into InspectorServicer, which provides the registry, slots, metrics and limits."""

    _registry: ModelRegistry
    _slots: ComputeSlots
    _metrics: Metrics
    _limits: ActivationLimits
    _chunk_bytes: int
    _budget: MemoryBudget

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
        adapter = loaded.adapter
        _, height, width = adapter.data_config.input_size
        need = images_bytes(adapter, images, self._limits.max_pixels)
        need += backward_bytes(adapter, len(images), height * width)
        cancel = cancel_token(context)
        names: list[str] = []
        with self._budget.reserve(need, cancel):
            query = convert_explain.explain_query(request)
            prepared = prepare_explanation(loaded, images, query, limits)
            with computing(self._slots, self._metrics, cancel, "Explain", loaded.spec.name) as slot:
                for event in slot.steps(explain(prepared, cancel)):
                    if isinstance(event, ExplanationHeader):
                        names = event.class_names
                    yield convert_explain.explain_response(event, names, self._chunk_bytes)
