"""vitscope.v1.Inspector: each method converts, calls the core, converts back."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import grpc

from vitscope.v1 import inspector_pb2_grpc as pb_grpc
from vitscope.v1 import models_pb2, server_info_pb2
from vitscope_server.core.activations.service import ActivationService
from vitscope_server.core.inversion.catalog import InverterCatalog
from vitscope_server.core.model.provenance import provenance_of
from vitscope_server.core.model.registry import ModelRegistry
from vitscope_server.core.projection.project import ProjectionLimits
from vitscope_server.core.projection.service import ProjectionService
from vitscope_server.core.runtime.budget import MemoryBudget
from vitscope_server.core.runtime.limits import RequestLimits
from vitscope_server.core.runtime.slots import ComputeSlots
from vitscope_server.transport import convert
from vitscope_server.transport.activations_rpcs import ActivationRpcs
from vitscope_server.transport.batchers import Batchers
from vitscope_server.transport.explain_rpcs import ExplainRpcs
from vitscope_server.transport.features_rpcs import FeatureRpcs
from vitscope_server.transport.interventions_rpcs import InterventionRpcs
from vitscope_server.transport.inversion_rpcs import InversionRpcs
from vitscope_server.transport.metrics import Metrics
from vitscope_server.transport.projection_rpcs import ProjectionRpcs
from vitscope_server.transport.sae_rpcs import SaeRpcs
from vitscope_server.transport.server_info import ServerInfo


# Streams may yield Progress-wrapped messages, which the interceptor unwraps.
class InspectorServicer(  # type: ignore[misc]
    ActivationRpcs,
    FeatureRpcs,
    ProjectionRpcs,
    InversionRpcs,
    ExplainRpcs,
    InterventionRpcs,
    SaeRpcs,
    pb_grpc.InspectorServicer,
):
    def __init__(
        self,
        registry: ModelRegistry,
        slots: ComputeSlots,
        metrics: Metrics,
        limits: RequestLimits,
        chunk_bytes: int,
        inverters: InverterCatalog,
        image_roots: Sequence[Path] = (),
        *,
        max_message_bytes: int,
        batchers: Batchers,
        budget: MemoryBudget,
        activation_service: ActivationService,
    ) -> None:
        self._info = ServerInfo(
            server_info_pb2.ServerLimits(
                max_message_bytes=max_message_bytes,
                max_batch=limits.max_batch,
                max_image_pixels=limits.max_pixels,
                max_result_bytes=limits.max_result_bytes,
                chunk_bytes=chunk_bytes,
                max_running=slots.max_running,
                max_queue=slots.max_waiting,
            )
        )
        self._registry = registry
        self._batchers = batchers
        self._activation_service = activation_service
        self._projection_service = ProjectionService(
            budget,
            batchers.projections,
            ProjectionLimits(
                limits.max_batch, limits.max_pixels, limits.max_result_bytes, chunk_bytes
            ),
        )
        self._budget = budget
        self._slots = slots
        self._metrics = metrics
        self._limits = limits
        self._chunk_bytes = chunk_bytes
        self._image_roots = tuple(image_roots)
        self._inverters = inverters
        self._max_message_bytes = max_message_bytes

    def ListModels(
        self, request: models_pb2.ListModelsRequest, context: grpc.ServicerContext
    ) -> models_pb2.ListModelsResponse:
        default = self._registry.default
        return models_pb2.ListModelsResponse(
            models=[convert.model_summary(e, default) for e in self._registry.entries()]
        )

    def GetServerInfo(
        self, request: server_info_pb2.GetServerInfoRequest, context: grpc.ServicerContext
    ) -> server_info_pb2.GetServerInfoResponse:
        return self._info.response(self._registry)

    def DescribeModel(
        self, request: models_pb2.DescribeModelRequest, context: grpc.ServicerContext
    ) -> models_pb2.DescribeModelResponse:
        loaded = self._registry.get(request.model)
        entry = self._registry.entry(request.model)
        return convert.describe(entry, loaded, self._registry.default, provenance_of(loaded))
