"""vitscope.v1.Inspector: each method converts, calls the core, converts back."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc

from vitscope.v1 import activations_pb2, models_pb2, server_info_pb2
from vitscope.v1 import inspector_pb2_grpc as pb_grpc
from vitscope_server.core.activations import ActivationLimits, batch_key, prepare_activations
from vitscope_server.core.budget import MemoryBudget, images_bytes, named_forward_bytes
from vitscope_server.core.inversion_catalog import InverterCatalog
from vitscope_server.core.provenance import provenance_of
from vitscope_server.core.registry import ModelRegistry
from vitscope_server.core.slots import ComputeSlots
from vitscope_server.transport import convert
from vitscope_server.transport.batchers import Batchers
from vitscope_server.transport.cancellation import cancel_token
from vitscope_server.transport.compute import record_batched
from vitscope_server.transport.explain_rpcs import ExplainRpcs
from vitscope_server.transport.features_rpcs import FeatureRpcs
from vitscope_server.transport.inversion_rpcs import InversionRpcs
from vitscope_server.transport.metrics import Metrics
from vitscope_server.transport.progress import sends_after_compute
from vitscope_server.transport.projection_rpcs import ProjectionRpcs
from vitscope_server.transport.server_info import ServerInfo


# Streams may yield Progress-wrapped messages, which the interceptor unwraps.
class InspectorServicer(  # type: ignore[misc]
    FeatureRpcs, ProjectionRpcs, InversionRpcs, ExplainRpcs, pb_grpc.InspectorServicer
):
    def __init__(
        self,
        registry: ModelRegistry,
        slots: ComputeSlots,
        metrics: Metrics,
        limits: ActivationLimits,
        chunk_bytes: int,
        inverters: InverterCatalog,
        image_roots: Sequence[Path] = (),
        *,
        max_message_bytes: int,
        batchers: Batchers,
        budget: MemoryBudget,
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

    @sends_after_compute
    def GetActivations(  # type: ignore[override]  # chunks are yielded pre-serialized
        self, request: activations_pb2.GetActivationsRequest, context: grpc.ServicerContext
    ) -> Iterator[activations_pb2.GetActivationsResponse | bytes]:
        loaded = self._registry.get(request.model)
        model, adapter = loaded.spec.name, loaded.adapter
        images = convert.image_inputs(list(request.images))
        query = convert.activation_query(request)
        need = images_bytes(adapter, images, self._limits.max_pixels)
        need += named_forward_bytes(adapter, loaded.site_shapes, len(images), query.sites)
        cancel = cancel_token(context)
        with self._budget.reserve(need, cancel):
            with self._batchers.activations.arriving(model) as arrival:
                prepared = prepare_activations(loaded, images, query, self._limits)
                result, info = self._batchers.activations.submit(
                    arrival, batch_key(prepared), prepared, len(prepared.pixels), cancel
                )
            record_batched(self._metrics, "GetActivations", model, info)
            yield from convert.activation_responses(result, self._chunk_bytes)
