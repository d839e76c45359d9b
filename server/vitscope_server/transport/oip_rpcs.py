"""inference.GRPCInferenceService: the Open Inference Protocol beside vitscope.v1.Inspector.

Each served model is a protocol model; ModelInfer runs the same core path as
GetActivations (core/activations/service.py), all its outputs in one forward.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import numpy as np

from vitscope.oip import grpc_predict_v2_pb2 as oip
from vitscope.oip import grpc_predict_v2_pb2_grpc as oip_grpc
from vitscope_server.core.activations.compute import (
    ActivationResult,
    TensorDType,
)
from vitscope_server.core.activations.service import ActivationService
from vitscope_server.core.model.loading import LoadedModel
from vitscope_server.core.model.provenance import library_versions
from vitscope_server.core.model.registry import ModelRegistry, ModelState
from vitscope_server.core.runtime.errors import (
    NotFound,
    Reason,
    VitscopeError,
    quote,
    refiled,
)
from vitscope_server.core.runtime.stages import Stage
from vitscope_server.transport.cancellation import cancel_token
from vitscope_server.transport.compute import record_batched
from vitscope_server.transport.convert_oip import (
    LOGITS,
    OutputGroup,
    check_outputs,
    framed_infer_response,
    image_inputs,
    input_field,
    model_metadata,
    output_groups,
    output_tensor,
)
from vitscope_server.transport.metrics import Metrics

SERVER_NAME = "vitscope"
SERVICE_NAME = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


class InferenceServicer(oip_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        registry: ModelRegistry,
        activations: ActivationService,
        metrics: Metrics,
        max_message_bytes: int,
    ) -> None:
        self._registry = registry
        self._activations = activations
        self._metrics = metrics
        self._max_message_bytes = max_message_bytes

    def _model(self, name: str, version: str) -> LoadedModel:
        """The ready model; a version, when given, must be its weights identity."""
        loaded = self._registry.get(name)
        if version and version != loaded.weights_identity:
            raise NotFound(
                Reason.MODEL_NOT_FOUND,
                f"{loaded.spec.name} version {version}",
                f"model {loaded.spec.name!r} has no version {quote(version)}; "
                f"its version is {loaded.weights_identity!r} (or leave version empty)",
                field="model_version",
                metadata={"model": loaded.spec.name},
            )
        return loaded

    def ServerLive(
        self, request: oip.ServerLiveRequest, context: grpc.ServicerContext
    ) -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=True)

    def ServerReady(
        self, request: oip.ServerReadyRequest, context: grpc.ServicerContext
    ) -> oip.ServerReadyResponse:
        default = self._registry.entry("")
        return oip.ServerReadyResponse(ready=default.state is ModelState.READY)

    def ModelReady(
        self, request: oip.ModelReadyRequest, context: grpc.ServicerContext
    ) -> oip.ModelReadyResponse:
        entry = self._registry.entry(request.name)
        ready = entry.state is ModelState.READY and entry.loaded is not None
        if ready and request.version and entry.loaded is not None:
            ready = request.version == entry.loaded.weights_identity
        return oip.ModelReadyResponse(ready=ready)

    def ServerMetadata(
        self, request: oip.ServerMetadataRequest, context: grpc.ServicerContext
    ) -> oip.ServerMetadataResponse:
        version = library_versions().get("vitscope", "")
        return oip.ServerMetadataResponse(name=SERVER_NAME, version=version, extensions=[])

    def ModelMetadata(
        self, request: oip.ModelMetadataRequest, context: grpc.ServicerContext
    ) -> oip.ModelMetadataResponse:
        return model_metadata(self._model(request.name, request.version))

    # The response comes serialized (framed_infer_response); the interceptor passes it on.
    def ModelInfer(  # type: ignore[override]
        self, request: oip.ModelInferRequest, context: grpc.ServicerContext
    ) -> bytes:
        loaded = self._model(request.model_name, request.model_version)
        images = image_inputs(request, self._max_message_bytes)
        groups = output_groups(request, loaded.adapter.has_classifier)
        check_outputs(loaded, request, groups)
        queries = [group.query for group in groups]
        # One forward for every output, shared with concurrent GetActivations and ModelInfer.
        with (
            _input_errors_refiled(request),
            self._activations.serve(loaded, images, queries, cancel_token(context)) as served,
        ):
            model = loaded.spec.name
            record_batched(self._metrics, "ModelInfer", model, served.info)
            with served.stages.timing(Stage.ENCODE):
                response = _infer_response(
                    request,
                    loaded,
                    groups,
                    served.results,
                    self._max_message_bytes,
                )
            self._metrics.record_stages("ModelInfer", model, served.stages)
            return response


@contextmanager
def _input_errors_refiled(request: oip.ModelInferRequest) -> Iterator[None]:
    """An image's error (decode, size, values) as the request's input that holds it."""
    try:
        yield
    except VitscopeError as exc:
        match = _IMAGE_FIELD.match(exc.field)
        if match is None:
            raise
        field, detail = input_field(request, int(match.group(1)))
        raise refiled(exc, field, detail) from None


_IMAGE_FIELD = re.compile(r"images\[(\d+)\]")


def _infer_response(
    request: oip.ModelInferRequest,
    loaded: LoadedModel,
    groups: list[OutputGroup],
    results: list[ActivationResult],
    max_bytes: int,
) -> bytes:
    """The serialized response, outputs in the order they were requested (logits alone when
    none was)."""
    arrays: dict[str, tuple[np.ndarray, TensorDType]] = {}
    for group, result in zip(groups, results, strict=True):
        sites = [name for name in group.names if name != LOGITS]
        for name, site in zip(sites, result.sites, strict=True):
            values = site.tensors[0]
            arrays[name] = (values.array, values.dtype)
        if result.logits is not None:
            arrays[LOGITS] = (result.logits, TensorDType.FLOAT32)
    head = oip.ModelInferResponse(
        model_name=loaded.spec.name, model_version=loaded.weights_identity, id=request.id
    )
    contents = []
    for name in [o.name for o in request.outputs] or [LOGITS]:
        array, dtype = arrays[name]
        tensor, raw = output_tensor(name, array, dtype)
        head.outputs.append(tensor)
        contents.append(raw)
    return framed_infer_response(head, contents, max_bytes)
