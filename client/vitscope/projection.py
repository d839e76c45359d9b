"""Class-embedding projection results: requests built from plain values, responses as numpy."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from google.protobuf.json_format import MessageToDict

from vitscope import tensors as wire
from vitscope.enums import short_names
from vitscope.v1 import projection_pb2 as pb

REPRESENTATIONS = short_names(pb.Representation)
_REPRESENTATION_NAMES = {v: k for k, v in REPRESENTATIONS.items()}
MEMORY_KINDS = short_names(pb.MemoryKind)
_MEMORY_KIND_NAMES = {v: k for k, v in MEMORY_KINDS.items()}


def label_set(
    class_names: Sequence[str] | None, templates: Sequence[str] | None
) -> pb.LabelSet | None:
    """None (the server's default labels) unless class names or templates are given."""
    if class_names is None and templates is None:
        return None
    return pb.LabelSet(class_names=list(class_names or ()), templates=list(templates or ()))


@dataclass(frozen=True)
class TokenProjection:
    """Arrays over [blocks, tokens] (and top_k): the requested blocks and tokens, in order."""

    top_classes: np.ndarray
    top_scores: np.ndarray
    target_ranks: np.ndarray
    identifiability: np.ndarray


@dataclass(frozen=True)
class ImportanceMaps:
    per_head: np.ndarray  # [blocks, heads, grid_h, grid_w]
    summed: np.ndarray  # [grid_h, grid_w], min-max normalized
    upsampled: np.ndarray  # [height, width]
    overlay_png: bytes


@dataclass(frozen=True)
class ImageProjection:
    image_index: int
    target_index: int
    target_name: str
    target_is_prediction: bool
    prediction: dict[str, Any]
    representations: dict[str, TokenProjection]
    # One dict per block (BlockSummary's fields), in block order.
    blocks: list[dict[str, float]]
    importance: ImportanceMaps | None


@dataclass(frozen=True)
class KeepCurve:
    """Accuracy (share of images predicting their target) per keep count, and its AUC."""

    accuracy: list[float]
    normalized_auc: float


@dataclass(frozen=True)
class ImportanceEvaluation:
    """The model run on its prefix tokens plus the top-n patch tokens (n = keep_counts) by
    importance, and in a seeded random order for comparison."""

    keep_counts: list[int]
    importance_order: KeepCurve
    random_order: KeepCurve


@dataclass(frozen=True)
class ClassProjection:
    images: list[ImageProjection]
    # One dict per block: mean_identifiable_patch_percent, mean_identifiability,
    # images_with_identifiable_percent.
    dataset: list[dict[str, float]]
    class_names: list[str]
    prefix_token_count: int
    grid: tuple[int, int]
    provenance: dict[str, Any]
    parameters: dict[str, Any]
    # Set when the request asked for evaluate_importance.
    importance_evaluation: ImportanceEvaluation | None = None


def _dict(message: Any) -> dict[str, Any]:
    return MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _image(message: pb.ImageProjection) -> ImageProjection:
    importance = None
    if message.HasField("importance"):
        maps = message.importance
        importance = ImportanceMaps(
            wire.from_proto(maps.per_head),
            wire.from_proto(maps.summed),
            wire.from_proto(maps.upsampled),
            maps.overlay_png,
        )
    return ImageProjection(
        image_index=message.image_index,
        target_index=message.target_index,
        target_name=message.target_name,
        target_is_prediction=message.target_is_prediction,
        prediction=_dict(message.prediction),
        representations={
            _REPRESENTATION_NAMES[r.representation]: TokenProjection(
                wire.from_proto(r.top_classes),
                wire.from_proto(r.top_scores),
                wire.from_proto(r.target_ranks),
                wire.from_proto(r.identifiability),
            )
            for r in message.representations
        },
        blocks=[_dict(b) for b in message.blocks],
        importance=importance,
    )


def _curve(message: pb.TokenKeepCurve) -> KeepCurve:
    return KeepCurve(list(message.accuracy), message.normalized_auc)


def _evaluation(message: pb.DatasetSummary) -> ImportanceEvaluation | None:
    if not message.HasField("importance_evaluation"):
        return None
    evaluation = message.importance_evaluation
    return ImportanceEvaluation(
        list(evaluation.keep_counts),
        _curve(evaluation.importance_order),
        _curve(evaluation.random_order),
    )


def collect_projection(responses: Iterable[pb.ProjectToClassSpaceResponse]) -> ClassProjection:
    header: pb.ProjectionHeader | None = None
    images: list[ImageProjection] = []
    dataset: list[dict[str, float]] = []
    evaluation: ImportanceEvaluation | None = None
    for response in responses:
        which = response.WhichOneof("payload")
        if which == "header":
            header = response.header
        elif which == "image":
            images.append(_image(response.image))
        elif which == "dataset":
            dataset = [_dict(b) for b in response.dataset.blocks]
            evaluation = _evaluation(response.dataset)
    if header is None:
        raise wire.TensorDecodeError("the stream ended without a header")
    return ClassProjection(
        images=images,
        dataset=dataset,
        class_names=list(header.class_names),
        prefix_token_count=header.prefix_token_count,
        grid=(header.grid_height, header.grid_width),
        provenance=_dict(header.provenance),
        parameters=_dict(header.parameters),
        importance_evaluation=evaluation,
    )


@dataclass(frozen=True)
class ImageMemories:
    image_index: int
    target_index: int
    top_memories: np.ndarray  # [tokens, k]
    top_coefficients: np.ndarray
    agreement_rate: float


@dataclass(frozen=True)
class MemorySet:
    kind: str
    memory_count: int
    top_classes: np.ndarray  # [memories, k]
    top_class_scores: np.ndarray
    top_memories: np.ndarray  # [classes, k]
    top_memory_scores: np.ndarray
    images: list[ImageMemories] = field(default_factory=list)


@dataclass(frozen=True)
class Memories:
    memories: dict[str, MemorySet]
    class_names: list[str]
    provenance: dict[str, Any]
    parameters: dict[str, Any]


def parse_memories(response: pb.ProjectMemoriesResponse) -> Memories:
    return Memories(
        memories={
            _MEMORY_KIND_NAMES[m.kind]: MemorySet(
                kind=_MEMORY_KIND_NAMES[m.kind],
                memory_count=m.memory_count,
                top_classes=wire.from_proto(m.top_classes),
                top_class_scores=wire.from_proto(m.top_class_scores),
                top_memories=wire.from_proto(m.top_memories),
                top_memory_scores=wire.from_proto(m.top_memory_scores),
                images=[
                    ImageMemories(
                        i.image_index,
                        i.target_index,
                        wire.from_proto(i.top_memories),
                        wire.from_proto(i.top_coefficients),
                        i.agreement_rate,
                    )
                    for i in m.images
                ],
            )
            for m in response.memories
        },
        class_names=list(response.class_names),
        provenance=_dict(response.provenance),
        parameters=_dict(response.parameters),
    )
