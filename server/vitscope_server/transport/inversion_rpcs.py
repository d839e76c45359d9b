"""Invert and ListInverters: convert, call the core, convert back."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from vitscope.v1 import inversion_pb2 as pb
from vitscope_server.core.activations import ActivationLimits
from vitscope_server.core.inversion import invert, prepare_inversion
from vitscope_server.core.inversion_catalog import InverterCatalog
from vitscope_server.core.registry import ModelRegistry, ModelState
from vitscope_server.core.slots import ComputeSlots
from vitscope_server.transport import convert, convert_inversion
from vitscope_server.transport.cancellation import cancel_token
from vitscope_server.transport.compute import computing
from vitscope_server.transport.metrics import Metrics


class InversionRpcs:
    """Mixed into the Inspector servicer, whose constructor sets these attributes."""

    _registry: ModelRegistry
    _slots: ComputeSlots
    _metrics: Metrics
    _limits: ActivationLimits
    _inverters: InverterCatalog

    def Invert(
        self, request: pb.InvertRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.InvertResponse]:
        loaded = self._registry.get(request.model)
        prepared = prepare_inversion(
            loaded,
            self._inverters,
            convert.image_inputs(list(request.images)),
            convert_inversion.invert_query(request),
            convert_inversion.representation(request),
            self._limits.max_batch,
            self._limits.max_pixels,
        )
        cancel = cancel_token(context)
        labels = ("Invert", loaded.spec.name)
        steps = self._metrics.optimization_steps.labels(*labels)
        with computing(self._slots, self._metrics, cancel, *labels):
            for event in invert(prepared, cancel, steps.inc):
                yield from convert_inversion.invert_responses(event)

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
