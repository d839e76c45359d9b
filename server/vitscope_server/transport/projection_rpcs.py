"""ProjectToClassSpace and ProjectMemories: convert, call the core in a compute slot, convert back."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from vitscope.v1 import projection_pb2 as pb
from vitscope_server.core.activations import ActivationLimits
from vitscope_server.core.budget import MemoryBudget, forward_bytes, images_bytes
from vitscope_server.core.class_projection import (
    ProjectionLimits,
    prepare_projection,
    project_to_class_space,
)
from vitscope_server.core.memories import prepare_memories, project_memories
from vitscope_server.core.registry import ModelRegistry
from vitscope_server.core.slots import ComputeSlots
from vitscope_server.transport import convert, convert_projection
from vitscope_server.transport.cancellation import cancel_token
from vitscope_server.transport.compute import computing
from vitscope_server.transport.metrics import Metrics


class ProjectionRpcs:
    """Mixed into InspectorServicer, which provides the registry, slots, metrics and limits."""

    _registry: ModelRegistry
    _slots: ComputeSlots
    _metrics: Metrics
    _limits: ActivationLimits
    _chunk_bytes: int
    _budget: MemoryBudget

    def _projection_limits(self) -> ProjectionLimits:
        return ProjectionLimits(
            self._limits.max_batch,
            self._limits.max_pixels,
            self._limits.max_result_bytes,
            self._chunk_bytes,
        )

    def ProjectToClassSpace(
        self, request: pb.ProjectToClassSpaceRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ProjectToClassSpaceResponse]:
        loaded = self._registry.get(request.model)
        inputs = convert.image_inputs(list(request.images))
        query = convert_projection.projection_query(request)
        adapter = loaded.adapter
        blocks = len(query.blocks) or len(adapter.blocks)
        need = images_bytes(adapter, inputs, self._limits.max_pixels) + forward_bytes(
            adapter, len(inputs), blocks
        )
        cancel = cancel_token(context)
        labels = ("ProjectToClassSpace", loaded.spec.name)
        with self._budget.reserve(need, cancel):
            prepared = prepare_projection(loaded, inputs, query, self._projection_limits())
            with computing(self._slots, self._metrics, cancel, *labels):
                header, images, dataset = project_to_class_space(prepared, cancel)
            yield from convert_projection.projection_responses(
                header, images, dataset, self._chunk_bytes
            )

    def ProjectMemories(
        self, request: pb.ProjectMemoriesRequest, context: grpc.ServicerContext
    ) -> pb.ProjectMemoriesResponse:
        loaded = self._registry.get(request.model)
        images = convert.image_inputs(list(request.images))
        need = images_bytes(loaded.adapter, images, self._limits.max_pixels) + forward_bytes(
            loaded.adapter, len(images), 1
        )
        cancel = cancel_token(context)
        labels = ("ProjectMemories", loaded.spec.name)
        with self._budget.reserve(need, cancel):
            prepared = prepare_memories(
                loaded, images, convert_projection.memory_query(request), self._projection_limits()
            )
            with computing(self._slots, self._metrics, cancel, *labels):
                result = project_memories(prepared, cancel)
            return convert_projection.memories_response(result, self._chunk_bytes)
