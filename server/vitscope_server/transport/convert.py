"""protobuf <-> core types. No logic beyond the mapping."""

from __future__ import annotations

from collections.abc import Iterator

from vitscope import tensors as wire
from vitscope.v1 import activations_pb2, common_pb2, models_pb2, tensor_pb2
from vitscope_server.core.activations import (
    ActivationQuery,
    ActivationResult,
    Reduction,
    TensorDType,
    TokenMode,
    as_site_layout,
)
from vitscope_server.core.adapters import Layout
from vitscope_server.core.errors import InvalidArgument, Reason, ResourceExhausted
from vitscope_server.core.images import ImageInput
from vitscope_server.core.loading import LoadedModel
from vitscope_server.core.provenance import Provenance
from vitscope_server.core.registry import ModelEntry, ModelState
from vitscope_server.transport.enums import enum_value

_RESPONSE_CHUNK_FIELD = activations_pb2.GetActivationsResponse.DESCRIPTOR.fields_by_name[
    "chunk"
].number

# One token selection for every RPC that selects tokens.
TOKEN_MODES = {
    common_pb2.TOKEN_SELECTION_MODE_UNSPECIFIED: TokenMode.UNSPECIFIED,
    common_pb2.TOKEN_SELECTION_MODE_ALL: TokenMode.ALL,
    common_pb2.TOKEN_SELECTION_MODE_PREFIX: TokenMode.PREFIX,
    common_pb2.TOKEN_SELECTION_MODE_PATCHES: TokenMode.PATCHES,
    common_pb2.TOKEN_SELECTION_MODE_INDICES: TokenMode.INDICES,
    common_pb2.TOKEN_SELECTION_MODE_POSITIONS: TokenMode.POSITIONS,
}
TOKEN_MODES_BACK = {v: k for k, v in TOKEN_MODES.items()}
_REDUCTIONS = {
    activations_pb2.REDUCTION_UNSPECIFIED: Reduction.NONE,
    activations_pb2.REDUCTION_NONE: Reduction.NONE,
    activations_pb2.REDUCTION_MEAN: Reduction.MEAN,
    activations_pb2.REDUCTION_PATCH_MAP: Reduction.PATCH_MAP,
    activations_pb2.REDUCTION_TOP_CHANNELS: Reduction.TOP_CHANNELS,
}
_REDUCTIONS_BACK = {v: k for k, v in _REDUCTIONS.items() if k}
_OUTPUT_DTYPES = {
    tensor_pb2.DTYPE_UNSPECIFIED: TensorDType.FLOAT32,
    tensor_pb2.DTYPE_FLOAT32: TensorDType.FLOAT32,
    tensor_pb2.DTYPE_FLOAT16: TensorDType.FLOAT16,
    tensor_pb2.DTYPE_BFLOAT16: TensorDType.BFLOAT16,
}
_WIRE_DTYPES = {
    TensorDType.FLOAT32: tensor_pb2.DTYPE_FLOAT32,
    TensorDType.FLOAT16: tensor_pb2.DTYPE_FLOAT16,
    TensorDType.BFLOAT16: tensor_pb2.DTYPE_BFLOAT16,
    TensorDType.INT64: tensor_pb2.DTYPE_INT64,
}
_LAYOUTS = {
    Layout.TOKENS: models_pb2.SITE_LAYOUT_TOKENS,
    Layout.ATTENTION: models_pb2.SITE_LAYOUT_ATTENTION,
    Layout.WINDOW_ATTENTION: models_pb2.SITE_LAYOUT_WINDOW_ATTENTION,
    Layout.RAW: models_pb2.SITE_LAYOUT_RAW,
}
_STATES = {
    ModelState.LOADING: models_pb2.MODEL_STATE_LOADING,
    ModelState.READY: models_pb2.MODEL_STATE_READY,
    ModelState.FAILED: models_pb2.MODEL_STATE_FAILED,
}


def tensor_array(proto: tensor_pb2.Tensor, field: str) -> wire.np.ndarray:
    try:
        return wire.from_proto(proto)
    except wire.TensorDecodeError as exc:
        raise InvalidArgument(field, str(exc)) from None


def image_inputs(images: list[common_pb2.Image]) -> list[ImageInput]:
    inputs = []
    for index, image in enumerate(images):
        source = image.WhichOneof("source")
        field = f"images[{index}].{source}"
        if source == "encoded":
            inputs.append(ImageInput(encoded=image.encoded))
        elif source == "pixels":
            inputs.append(ImageInput(pixels=tensor_array(image.pixels, field)))
        elif source == "preprocessed":
            inputs.append(ImageInput(preprocessed=tensor_array(image.preprocessed, field)))
        else:
            inputs.append(ImageInput())
    return inputs


def token_mode(tokens: common_pb2.TokenSelection) -> TokenMode:
    return enum_value(TOKEN_MODES, tokens.mode, "tokens.mode", common_pb2.TokenSelectionMode)


def activation_query(request: activations_pb2.GetActivationsRequest) -> ActivationQuery:
    return ActivationQuery(
        sites=tuple(request.sites),
        token_mode=token_mode(request.tokens),
        token_indices=tuple(request.tokens.indices),
        positions=tuple((p.row, p.col) for p in request.tokens.positions),
        reduction=enum_value(
            _REDUCTIONS, request.reduction, "reduction", activations_pb2.Reduction
        ),
        channels=tuple(request.channels),
        top_k=request.top_k,
        output_dtype=enum_value(
            _OUTPUT_DTYPES, request.output_dtype, "output_dtype", tensor_pb2.Dtype
        ),
        top_predictions=request.top_predictions,
        compute_dtype=enum_value(
            _OUTPUT_DTYPES, request.compute_dtype, "compute_dtype", tensor_pb2.Dtype
        ),
    )


def provenance(p: Provenance) -> common_pb2.Provenance:
    return common_pb2.Provenance(
        model=p.model,
        weights_identity=p.weights_identity,
        library_versions=p.libraries,
        device=p.device,
        seed=p.seed,
    )


def model_summary(entry: ModelEntry, default: str) -> models_pb2.ModelSummary:
    return models_pb2.ModelSummary(
        name=entry.spec.name,
        family=entry.spec.family,
        architecture=entry.spec.architecture,
        state=_STATES[entry.state],
        error=entry.error,
        weights_identity=entry.loaded.weights_identity if entry.loaded else "",
        is_default=entry.spec.name == default,
        load_seconds=entry.load_seconds,
    )


def describe(
    entry: ModelEntry, loaded: LoadedModel, default: str, p: Provenance
) -> models_pb2.DescribeModelResponse:
    adapter = loaded.adapter
    config = adapter.data_config
    sites = []
    for site in adapter.canonical_sites():
        shape = loaded.site_shapes.get(site.name, ())
        sites.append(
            models_pb2.SiteInfo(
                name=site.name,
                module_path=site.module_path,
                layout=_LAYOUTS[as_site_layout(site, shape).layout],
                shape=list(shape),
                prefix_token_count=site.num_prefix_tokens,
                grid_height=site.grid[0],
                grid_width=site.grid[1],
            )
        )
    return models_pb2.DescribeModelResponse(
        summary=model_summary(entry, default),
        block_count=len(adapter.blocks),
        embed_dim=adapter.embed_dim,
        prefix_token_count=adapter.num_prefix_tokens,
        grid_height=adapter.grid[0],
        grid_width=adapter.grid[1],
        preprocessing=models_pb2.Preprocessing(
            input_size=list(config.input_size),
            mean=list(config.mean),
            std=list(config.std),
            interpolation=config.interpolation,
            crop_pct=config.crop_pct,
        ),
        sites=sites,
        class_names=adapter.class_names,
        class_count=len(adapter.class_names),
        provenance=provenance(p),
        unavailable_sites=[
            models_pb2.UnavailableSite(site=u.site, reason=u.reason)
            for u in adapter.unavailable_sites
        ],
    )


def activation_responses(
    result: ActivationResult, chunk_bytes: int
) -> Iterator[activations_pb2.GetActivationsResponse | bytes]:
    """The header, then every tensor in chunks of at most chunk_bytes.

    Chunks come already serialized (GetActivationsResponse wire bytes), which the
    server's serializer passes through untouched.
    """
    num_chunks = sum(
        wire.chunk_count(t.array.nbytes, chunk_bytes) for s in result.sites for t in s.tensors
    )
    response = activations_pb2.GetActivationsResponse(
        header=_activations_header(result, num_chunks)
    )
    if response.ByteSize() > chunk_bytes:
        raise ResourceExhausted(
            f"the response header ({response.ByteSize()} bytes: token indices, predictions) exceeds "
            "the message limit; ask for fewer tokens, predictions or images",
            reason=Reason.RESULT_TOO_LARGE,
        )
    yield response
    for site in result.sites:
        for tensor in site.tensors:
            yield from wire.encode_tensor_messages(
                _RESPONSE_CHUNK_FIELD,
                site.site.name,
                tensor.role,
                _WIRE_DTYPES[tensor.dtype],
                tensor.array,
                chunk_bytes,
            )


def _activations_header(
    result: ActivationResult, num_chunks: int
) -> activations_pb2.ActivationHeader:
    q = result.query
    return activations_pb2.ActivationHeader(
        provenance=provenance(result.provenance),
        parameters=activations_pb2.EffectiveActivationParameters(
            sites=list(q.sites),
            token_mode=TOKEN_MODES_BACK[q.token_mode],
            reduction=_REDUCTIONS_BACK[q.reduction],
            channels=list(q.channels),
            top_k=q.top_k,
            output_dtype=_WIRE_DTYPES[q.output_dtype],
            top_predictions=q.top_predictions,
            batch_size=result.batch_size,
            compute_dtype=_WIRE_DTYPES[q.compute_dtype],
        ),
        sites=[
            activations_pb2.SiteResult(
                site=s.site.name,
                module_path=s.site.module_path,
                layout=_LAYOUTS[s.site.layout],
                token_indices=s.token_indices,
                grid_height=s.site.grid[0],
                grid_width=s.site.grid[1],
                channels=s.channels,
                roles=[t.role for t in s.tensors],
            )
            for s in result.sites
        ],
        predictions=[
            activations_pb2.ImagePredictions(
                predictions=[
                    common_pb2.Prediction(
                        class_index=p.class_index,
                        class_name=p.class_name,
                        probability=p.probability,
                        logit=p.logit,
                    )
                    for p in image
                ]
            )
            for image in result.predictions
        ],
        chunk_count=num_chunks,
    )
