"""EvaluateSae results as plain Python values."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from vitscope.v1 import sae_pb2


@dataclass(frozen=True)
class SaeEvaluationProgress:
    images_done: int
    images_total: int


@dataclass(frozen=True)
class SaeEvaluation:
    """An SAE's quality on the request's images (docs/sae.md)."""

    sae: dict[str, Any]
    images: int
    tokens: int
    fvu: float
    explained_variance: float
    l0: float
    dead_fraction: float
    dense_fraction: float
    histogram_edges: list[float]
    histogram_counts: list[int]
    # top1_agreement, kl_clean_spliced, loss_clean, loss_spliced, loss_zero_ablated,
    # loss_recovered, labels; None with quality_only.
    splice: dict[str, Any] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)


def _as_dict(message: Any) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def evaluation(message: sae_pb2.SaeEvaluation) -> SaeEvaluation:
    return SaeEvaluation(
        sae=_as_dict(message.sae),
        images=message.images,
        tokens=message.tokens,
        fvu=message.fvu,
        explained_variance=message.explained_variance,
        l0=message.l0,
        dead_fraction=message.dead_fraction,
        dense_fraction=message.dense_fraction,
        histogram_edges=list(message.histogram_edges),
        histogram_counts=list(message.histogram_counts),
        splice=_as_dict(message.splice) if message.HasField("splice") else None,
        provenance=_as_dict(message.provenance),
    )


def collect(
    responses: Iterator[sae_pb2.EvaluateSaeResponse],
    on_progress: Callable[[SaeEvaluationProgress], object] | None,
) -> SaeEvaluation:
    for response in responses:
        if response.HasField("evaluation"):
            return evaluation(response.evaluation)
        if on_progress is not None:
            on_progress(
                SaeEvaluationProgress(response.progress.images_done, response.progress.images_total)
            )
    raise RuntimeError("EvaluateSae ended without an evaluation")
