"""Invert and ListInverters: convert, call the core, convert back."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from vitscope.v1 import inversion_pb2 as pb
from vitscope_server.core.activations import ActivationLimits
from vitscope_server.core.budget import MemoryBudget
from vitscope_server.core.estimates import inversion_bytes
from vitscope_server.core.inversion import invert, prepare_inversion
from vitscope_server.core.inversion_catalog import InverterCatalog
from vitscope_server.core.registry import ModelRegistry, ModelState
from vitscope_server.core.slots import ComputeSlots
from vitscope_server.transport import convert, convert_inversion
from vitscope_server.transport.cancellation import cancel_token
from vitscope_server.transport.compute import computing
from vitscope_server.transport.metrics import Metrics
from vitscope_server.transport.progress import Progress


class InversionRpcs:
    """Mixed into the Inspector servicer, whose constructor sets these attributes."""

    _registry: ModelRegistry
    _slots: ComputeSlots
    _metrics: Metrics
    _limits: ActivationLimits
    _inverters: InverterCatalog
    _budget: MemoryBudget

    def Invert(
        self, request: pb.InvertRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.InvertResponse | Progress]:
        loaded = self._registry.get(request.model)
        images = convert.image_inputs(list(request.images))
        query = convert_inversion.invert_query(request)
        representation = convert_inversion.representation(request)
        cancel = cancel_token(context)
        labels = ("Invert", loaded.spec.name)
        steps = self._metrics.optimization_steps.labels(*labels)
        need = inversion_bytes(
            loaded.adapter, images, query, representation, self._limits.max_pixels
        )
        with self._budget.reserve(need, cancel):
            prepared = prepare_inversion(
                loaded,
                self._inverters,
                images,
                query,
                representation,
                self._limits.max_batch,
                self._limits.max_pixels,
            )
            with computing(self._slots, self._metrics, cancel, *labels):
                for event in invert(prepared, cancel, steps.inc):
                    for response in convert_inversion.invert_responses(event):
                        yield Progress(response) if response.HasField("progress") else response

    def ListInverters(
        self, request: pb.ListInvertersRequest, context: grpc.ServicerContext
    ) -> pb.ListInvertersResponse:
        """The stores read at start-up that fit each ready model; the folder is not re-read."""
        entries = (
            [self._registry.entry(request.model)] if request.model else self._registry.entries()
        )
        found = []
        for entry in entries:
            if entry.state is ModelState.READY and entry.loaded is not None:
                found.extend(self._inverters.stores_for(entry.loaded))
        return pb.ListInvertersResponse(
            inverters=[convert_inversion.inverter_info(m) for m in found]
        )
