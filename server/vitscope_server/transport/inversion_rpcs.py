"""Invert and ListInverters: convert, call the core, convert back."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import grpc

from vitscope.v1 import inversion_pb2 as pb
from vitscope_server.core.inversion.estimate import inversion_bytes
from vitscope_server.core.inversion.invert import (
    Event,
    Method,
    PreparedInversion,
    check_inversion,
    invert_by_optimization,
    prepare_inversion,
)
from vitscope_server.core.inversion.learned import learned_batch_key
from vitscope_server.core.model.registry import ModelState
from vitscope_server.core.runtime.cancel import CancelToken
from vitscope_server.transport import convert, convert_inversion
from vitscope_server.transport.cancellation import cancel_token
from vitscope_server.transport.compute import computing, record_batched
from vitscope_server.transport.metrics import labelled
from vitscope_server.transport.progress import Progress
from vitscope_server.transport.state import ServicerState


class InversionRpcs(ServicerState):
    """Mixed into the Inspector servicer."""

    def Invert(
        self, request: pb.InvertRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.InvertResponse | Progress]:
        loaded = self._registry.get(request.model)
        images = convert.image_inputs(list(request.images))
        query = convert_inversion.invert_query(request)
        representation = convert_inversion.representation(request)
        cancel = cancel_token(context)
        labels = ("Invert", loaded.spec.name)
        steps = labelled(self._metrics.optimization_steps, *labels)
        checked = check_inversion(
            loaded, self._inverters, query, representation, len(images), self._limits.max_batch
        )
        need = inversion_bytes(
            loaded.adapter, images, query, representation, self._limits.max_pixels
        )
        prepare = functools.partial(
            prepare_inversion,
            loaded,
            self._inverters,
            images,
            checked,
            representation,
            self._limits.max_batch,
            self._limits.max_pixels,
        )
        with self._budget.reserve(need, cancel):
            if query.method is Method.LEARNED:
                for event in self._learned(loaded.spec.name, prepare, cancel):
                    yield from convert_inversion.invert_responses(event)
                return
            prepared = prepare()
            with computing(self._slots, self._metrics, cancel, *labels) as slot:
                events = invert_by_optimization(prepared, cancel, steps.inc)
                for event in slot.steps(events):
                    for response in convert_inversion.invert_responses(event):
                        yield Progress(response) if response.HasField("progress") else response

    def _learned(
        self, model: str, prepare: Callable[[], PreparedInversion], cancel: CancelToken
    ) -> list[Event]:
        """Learned inversions of one model share their forwards (the learned_inversions
        batcher); they send nothing until their batch is done."""
        batcher = self._batchers.learned_inversions
        with batcher.arriving(model) as arrival:
            prepared = prepare()
            events, info = batcher.submit(
                arrival, learned_batch_key(prepared), prepared, prepared.batch_size, cancel
            )
        record_batched(self._metrics, "Invert", model, info)
        return events

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
