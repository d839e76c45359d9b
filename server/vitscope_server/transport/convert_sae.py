"""protobuf <-> core types for EvaluateSae."""

from __future__ import annotations

from vitscope.v1 import sae_pb2 as pb
from vitscope_server.core.sae.evaluate import (
    EvaluationProgress,
    EvaluationQuery,
    SaeEvaluation,
)
from vitscope_server.transport import convert

DEFAULT_BATCH = 32


def evaluation_query(request: pb.EvaluateSaeRequest) -> EvaluationQuery:
    return EvaluationQuery(
        sae=request.sae,
        labels=tuple(request.labels),
        batch=request.batch if request.HasField("batch") else DEFAULT_BATCH,
        quality_only=request.quality_only,
    )


def evaluation_response(event: EvaluationProgress | SaeEvaluation) -> pb.EvaluateSaeResponse:
    if isinstance(event, EvaluationProgress):
        return pb.EvaluateSaeResponse(
            progress=pb.EvaluateSaeProgress(
                images_done=event.images_done, images_total=event.images_total
            )
        )
    quality = event.quality
    evaluation = pb.SaeEvaluation(
        provenance=convert.provenance(event.provenance),
        sae=convert.sae_info(event.sae),
        images=event.images,
        tokens=quality.tokens,
        fvu=quality.fvu,
        explained_variance=quality.explained_variance,
        l0=quality.l0,
        dead_fraction=quality.dead_fraction,
        dense_fraction=quality.dense_fraction,
        histogram_edges=list(quality.histogram_edges),
        histogram_counts=list(quality.histogram_counts),
    )
    splice = event.splice
    if splice is not None:
        evaluation.splice.CopyFrom(
            pb.SpliceMetrics(
                top1_agreement=splice.top1_agreement,
                kl_clean_spliced=splice.kl_clean_spliced,
                loss_clean=splice.loss_clean,
                loss_spliced=splice.loss_spliced,
                loss_zero_ablated=splice.loss_zero,
                loss_recovered=splice.loss_recovered,
                labels=splice.labels,
            )
        )
    return pb.EvaluateSaeResponse(evaluation=evaluation)
