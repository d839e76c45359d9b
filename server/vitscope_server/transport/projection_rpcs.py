"""ProjectToClassSpace and ProjectMemories: convert, call the core in a compute slot, convert back."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from vitscope.v1 import projection_pb2 as pb
from vitscope_server.core.projection.estimate import memories_bytes, projection_bytes
from vitscope_server.core.projection.memories import prepare_memories, project_memories
from vitscope_server.core.projection.project import (
    ProjectionLimits,
    check_projection,
    prepare_projection,
    projection_batch_key,
)
from vitscope_server.transport import convert, convert_projection
from vitscope_server.transport.cancellation import cancel_token
from vitscope_server.transport.compute import computing, record_batched
from vitscope_server.transport.progress import sends_after_compute
from vitscope_server.transport.state import ServicerState


class ProjectionRpcs(ServicerState):
    """Mixed into the Inspector servicer."""

    def _projection_limits(self) -> ProjectionLimits:
        return ProjectionLimits(
            self._limits.max_batch,
            self._limits.max_pixels,
            self._limits.max_result_bytes,
            self._chunk_bytes,
        )

    @sends_after_compute
    def ProjectToClassSpace(
        self, request: pb.ProjectToClassSpaceRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ProjectToClassSpaceResponse]:
        loaded = self._registry.get(request.model)
        inputs = convert.image_inputs(list(request.images))
        query = convert_projection.projection_query(request)
        model = loaded.spec.name
        check_projection(loaded, query, len(inputs), self._projection_limits())
        need = projection_bytes(loaded.adapter, inputs, query, self._limits.max_pixels)
        cancel = cancel_token(context)
        batcher = self._batchers.projections
        with self._budget.reserve(need, cancel):
            with batcher.arriving(model) as arrival:
                prepared = prepare_projection(loaded, inputs, query, self._projection_limits())
                (header, images, dataset), info = batcher.submit(
                    arrival, projection_batch_key(prepared), prepared, len(prepared.pixels), cancel
                )
            record_batched(self._metrics, "ProjectToClassSpace", model, info)
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
                loaded, images, convert_projection.memory_query(request), self._projection_limits()
            )
            with computing(self._slots, self._metrics, cancel, *labels) as slot:
                result = slot.run(lambda: project_memories(prepared, cancel))
            return convert_projection.memories_response(result, self._chunk_bytes)
