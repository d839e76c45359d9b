"""ProjectToClassSpace (conversion and one call of its service) and ProjectMemories (convert,
call the core in a compute slot, convert back)."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from vitscope.v1 import projection_pb2 as pb
from vitscope_server.core.projection.estimate import memories_bytes
from vitscope_server.core.projection.memories import prepare_memories, project_memories
from vitscope_server.transport import convert, convert_projection
from vitscope_server.transport.cancellation import cancel_token
from vitscope_server.transport.compute import computing, record_batched
from vitscope_server.transport.progress import sends_after_compute
from vitscope_server.transport.state import ServicerState


class ProjectionRpcs(ServicerState):
    """Mixed into the Inspector servicer."""

    @sends_after_compute
    def ProjectToClassSpace(
        self, request: pb.ProjectToClassSpaceRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ProjectToClassSpaceResponse]:
        loaded = self._registry.get(request.model)
        inputs = convert.image_inputs(list(request.images))
        query = convert_projection.projection_query(request)
        with self._projection_service.serve(loaded, inputs, query, cancel_token(context)) as (
            (header, images, dataset),
            info,
        ):
            record_batched(self._metrics, "ProjectToClassSpace", loaded.spec.name, info)
            yield from convert_projection.projection_responses(
                header, images, dataset, self._chunk_bytes
            )

    def ProjectMemories(
        self, request: pb.ProjectMemoriesRequest, context: grpc.ServicerContext
    ) -> pb.ProjectMemoriesResponse:
        loaded = self._registry.get(request.model)
        images = convert.image_inputs(list(request.images))
        need = memories_bytes(loaded.adapter, images, self._limits.max_pixels)
        cancel = cancel_token(context)
        labels = ("ProjectMemories", loaded.spec.name)
        with self._budget.reserve(need, cancel):
            prepared = prepare_memories(
                loaded,
                images,
                convert_projection.memory_query(request),
                self._projection_service.limits,
            )
            with computing(self._slots, self._metrics, cancel, *labels) as slot:
                result = slot.run(lambda: project_memories(prepared, cancel))
            return convert_projection.memories_response(result, self._chunk_bytes)
