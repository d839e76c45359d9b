"""EvaluateSae: convert, call the core, convert back."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from vitscope.v1 import sae_pb2 as pb
from vitscope_server.core.sae.estimate import evaluation_bytes
from vitscope_server.core.sae.evaluate import check_query, evaluate_sae, served
from vitscope_server.transport import convert, convert_sae
from vitscope_server.transport.cancellation import cancel_token
from vitscope_server.transport.compute import computing
from vitscope_server.transport.progress import Progress
from vitscope_server.transport.state import ServicerState


class SaeRpcs(ServicerState):
    """Mixed into the Inspector servicer."""

    def EvaluateSae(
        self, request: pb.EvaluateSaeRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.EvaluateSaeResponse | Progress]:
        loaded = self._registry.get(request.model)
        images = convert.image_inputs(list(request.images))
        query = convert_sae.evaluation_query(request)
        check_query(loaded, query, len(images))
        cancel = cancel_token(context)
        info = served(loaded, query.sae).info
        need = evaluation_bytes(loaded.adapter, images, query.batch, info, self._limits.max_pixels)
        with (
            self._budget.reserve(need, cancel),
            computing(self._slots, self._metrics, cancel, "EvaluateSae", loaded.spec.name) as slot,
        ):
            events = evaluate_sae(loaded, images, query, self._limits.max_pixels, cancel)
            for event in slot.steps(events):
                response = convert_sae.evaluation_response(event)
                yield Progress(response) if response.HasField("progress") else response
