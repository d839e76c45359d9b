"""Intervene: convert, plan the forwards within the memory budget, validate before any
forward, run the core in a compute slot, stream back."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from vitscope.v1 import interventions_pb2 as pb
from vitscope_server.core.interventions.compute import intervene
from vitscope_server.core.interventions.query import (
    InterventionLimits,
    plan_forwards,
    prepare_intervention,
)
from vitscope_server.transport import convert_interventions
from vitscope_server.transport.cancellation import cancel_token
from vitscope_server.transport.compute import computing
from vitscope_server.transport.state import ServicerState


class InterventionRpcs(ServicerState):
    """Mixed into InspectorServicer, which provides the registry, slots, metrics and limits."""

    def Intervene(
        self, request: pb.InterveneRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.InterveneResponse]:
        loaded = self._registry.get(request.model)
        limits = InterventionLimits(
            self._limits.max_batch,
            self._limits.max_pixels,
            self._limits.max_result_bytes,
            self._chunk_bytes,
            min(self._budget.request_bytes, self._budget.server_bytes),
        )
        query = convert_interventions.intervention_query(request)
        images = convert_interventions.image_sets(request)
        plan = plan_forwards(loaded, images, query, limits)
        cancel = cancel_token(context)
        with self._budget.reserve(plan.bytes, cancel):
            prepared = prepare_intervention(loaded, images, query, limits)
            model = loaded.spec.name
            with computing(self._slots, self._metrics, cancel, "Intervene", model) as slot:
                for event in slot.steps(intervene(prepared, cancel)):
                    yield convert_interventions.intervene_response(event)
