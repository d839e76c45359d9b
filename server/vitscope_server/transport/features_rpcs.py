"""OptimizeFeatures: convert, call the core, convert back."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from vitscope.v1 import features_pb2 as fpb
from vitscope_server.core.features.estimate import optimization_bytes
from vitscope_server.core.features.optimize import optimize_features, prepare_optimization
from vitscope_server.transport import convert_features
from vitscope_server.transport.cancellation import cancel_token
from vitscope_server.transport.compute import computing, unary_response_budget
from vitscope_server.transport.metrics import labelled
from vitscope_server.transport.progress import Progress
from vitscope_server.transport.state import ServicerState


class FeatureRpcs(ServicerState):
    """Mixed into the Inspector servicer."""

    def OptimizeFeatures(
        self, request: fpb.OptimizeFeaturesRequest, context: grpc.ServicerContext
    ) -> Iterator[fpb.OptimizeFeaturesResponse | Progress]:
        loaded = self._registry.get(request.model)
        prepared = prepare_optimization(
            loaded,
            convert_features.feature_specs(request),
            convert_features.optimization_params(request),
            self._limits.max_batch,
            self._limits.max_pixels,
            unary_response_budget(self._max_message_bytes, self._limits),
        )
        cancel = cancel_token(context)
        labels = ("OptimizeFeatures", loaded.spec.name)
        steps = labelled(self._metrics.optimization_steps, *labels)
        need = optimization_bytes(prepared)
        with (
            self._budget.reserve(need, cancel),
            computing(self._slots, self._metrics, cancel, *labels) as slot,
        ):
            events = optimize_features(prepared, cancel, steps.inc)
            for event in slot.steps(events):
                response = convert_features.optimization_response(event)
                yield Progress(response) if response.HasField("progress") else response
