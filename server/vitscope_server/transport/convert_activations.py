"""protobuf <-> core types for GetActivations and TopActivatingImages."""

from __future__ import annotations

from collections.abc import Iterator

from vitscope import tensors as wire
from vitscope.v1 import activations_pb2, tensor_pb2
from vitscope.v1 import activations_pb2 as apb
from vitscope_server.core.activations.compute import ActivationQuery, ActivationResult
from vitscope_server.core.activations.top_images import ScanQuery, ScanResult
from vitscope_server.core.runtime.errors import Reason, ResourceExhausted
from vitscope_server.transport.convert import (
    LAYOUTS,
    OUTPUT_DTYPES,
    REDUCTIONS,
    REDUCTIONS_BACK,
    TOKEN_MODES_BACK,
    WIRE_DTYPES,
    image_predictions,
    provenance,
    token_mode,
)
from vitscope_server.transport.enums import enum_value

_RESPONSE_CHUNK_FIELD = activations_pb2.GetActivationsResponse.DESCRIPTOR.fields_by_name[
    "chunk"
].number


def activation_query(request: activations_pb2.GetActivationsRequest) -> ActivationQuery:
    return ActivationQuery(
        sites=tuple(request.sites),
        token_mode=token_mode(request.tokens),
        token_indices=tuple(request.tokens.indices),
        positions=tuple((p.row, p.col) for p in request.tokens.positions),
        reduction=enum_value(REDUCTIONS, request.reduction, "reduction", activations_pb2.Reduction),
        channels=tuple(request.channels),
        top_k=request.top_k,
        output_dtype=enum_value(
            OUTPUT_DTYPES, request.output_dtype, "output_dtype", tensor_pb2.Dtype
        ),
        top_predictions=request.top_predictions,
        compute_dtype=enum_value(
            OUTPUT_DTYPES, request.compute_dtype, "compute_dtype", tensor_pb2.Dtype
        ),
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
                WIRE_DTYPES[tensor.dtype],
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
            reduction=REDUCTIONS_BACK[q.reduction],
            channels=list(q.channels),
            top_k=q.top_k,
            output_dtype=WIRE_DTYPES[q.output_dtype],
            top_predictions=q.top_predictions,
            batch_size=result.batch_size,
            compute_dtype=WIRE_DTYPES[q.compute_dtype],
        ),
        sites=[
            activations_pb2.SiteResult(
                site=s.site.name,
                module_path=s.site.module_path,
                layout=LAYOUTS[s.site.layout],
                token_indices=s.token_indices,
                grid_height=s.site.grid[0],
                grid_width=s.site.grid[1],
                channels=s.channels,
                roles=[t.role for t in s.tensors],
            )
            for s in result.sites
        ],
        predictions=image_predictions(result.predictions),
        chunk_count=num_chunks,
    )


def scan_query(request: apb.TopActivatingImagesRequest) -> ScanQuery:
    return ScanQuery(request.site, tuple(request.channels), request.top_k)


def top_images_response(result: ScanResult) -> apb.TopActivatingImagesResponse:
    return apb.TopActivatingImagesResponse(
        provenance=provenance(result.provenance),
        site=result.query.site,
        top_k=result.query.top_k,
        scanned_image_count=result.scanned,
        channels=[
            apb.ChannelTopImages(
                channel=channel,
                images=[
                    apb.TopImage(
                        index=hit.index,
                        path=hit.path,
                        score=hit.score,
                        patch_map=wire.to_proto(hit.patch_map),
                    )
                    for hit in hits
                ],
            )
            for channel, hits in result.tops.items()
        ],
    )
