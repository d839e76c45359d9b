"""protobuf <-> core types for ProjectToClassSpace and ProjectMemories, and the importance
overlay drawn as PNG (images leave the service here, never from the core)."""

from __future__ import annotations

from vitscope import tensors as wire
from vitscope.v1 import common_pb2
from vitscope.v1 import projection_pb2 as pb
from vitscope_server.core.model.class_importance import ImportanceEvaluation, KeepCurve
from vitscope_server.core.model.class_space import LabelSet
from vitscope_server.core.projection.memories import MemoryKind, MemoryQuery, MemoryResult
from vitscope_server.core.projection.project import (
    ClassRef,
    DatasetSummary,
    ImageProjection,
    ProjectionHeader,
    ProjectionQuery,
    Representation,
)
from vitscope_server.core.runtime.errors import Reason, ResourceExhausted
from vitscope_server.transport.convert import TOKEN_MODES_BACK, provenance, token_mode
from vitscope_server.transport.enums import core_to_wire, enum_values, wire_to_core
from vitscope_server.transport.png import heatmap_png

_REPRESENTATIONS = wire_to_core(pb.Representation, Representation)
_REPRESENTATIONS_BACK = core_to_wire(pb.Representation, Representation)
_MEMORY_KINDS = wire_to_core(pb.MemoryKind, MemoryKind)
_MEMORY_KINDS_BACK = core_to_wire(pb.MemoryKind, MemoryKind)


def _targets(refs: list[common_pb2.ClassRef]) -> tuple[ClassRef, ...]:
    targets: list[ClassRef] = []
    for ref in refs:
        which = ref.WhichOneof("ref")
        targets.append(ref.index if which == "index" else ref.name if which == "name" else None)
    return tuple(targets)


def label_set(has_labels: bool, labels: pb.LabelSet) -> LabelSet | None:
    if not has_labels:
        return None
    return LabelSet(tuple(labels.class_names), tuple(labels.templates))


def projection_query(request: pb.ProjectToClassSpaceRequest) -> ProjectionQuery:
    return ProjectionQuery(
        targets=_targets(list(request.targets)),
        representations=enum_values(
            _REPRESENTATIONS, list(request.representations), "representations", pb.Representation
        ),
        blocks=tuple(request.blocks),
        token_mode=token_mode(request.tokens),
        token_indices=tuple(request.tokens.indices),
        positions=tuple((p.row, p.col) for p in request.tokens.positions),
        top_k=request.top_k,
        importance_maps=request.importance_maps,
        labels=label_set(request.HasField("labels"), request.labels),
        evaluate_importance=request.evaluate_importance,
        keep_counts=tuple(request.keep_counts),
        evaluation_seed=request.evaluation_seed,
    )


def memory_query(request: pb.ProjectMemoriesRequest) -> MemoryQuery:
    return MemoryQuery(
        block=request.block,
        kinds=enum_values(_MEMORY_KINDS, list(request.kinds), "kinds", pb.MemoryKind),
        top_k=request.top_k,
        cosine=request.cosine,
        targets=_targets(list(request.targets)),
        labels=label_set(request.HasField("labels"), request.labels),
    )


def _header(header: ProjectionHeader) -> pb.ProjectionHeader:
    q = header.query
    space = header.class_space
    return pb.ProjectionHeader(
        provenance=provenance(header.provenance),
        parameters=pb.EffectiveProjectionParameters(
            representations=[_REPRESENTATIONS_BACK[r] for r in q.representations],
            blocks=list(q.blocks),
            token_mode=TOKEN_MODES_BACK[q.token_mode],
            token_indices=header.token_indices,
            top_k=q.top_k,
            importance_maps=q.importance_maps,
            class_count=space.num_classes,
            templates=list(space.templates),
            cosine=space.cosine,
            batch_size=header.batch_size,
            evaluate_importance=q.evaluate_importance,
            keep_counts=list(q.keep_counts),
            evaluation_seed=q.evaluation_seed,
        ),
        class_names=space.names,
        prefix_token_count=header.num_prefix_tokens,
        grid_height=header.grid[0],
        grid_width=header.grid[1],
    )


def _image(image: ImageProjection, names: list[str]) -> pb.ImageProjection:
    message = pb.ImageProjection(
        image_index=image.image_index,
        target_index=image.target_index,
        target_name=image.target_name,
        target_is_prediction=image.target_is_prediction,
        prediction=common_pb2.Prediction(
            class_index=image.predicted_index,
            class_name=names[image.predicted_index],
            probability=image.predicted_probability,
            logit=image.predicted_score,
        ),
        representations=[
            pb.RepresentationTokens(
                representation=_REPRESENTATIONS_BACK[t.representation],
                top_classes=wire.to_proto(t.top_classes),
                top_scores=wire.to_proto(t.top_scores),
                target_ranks=wire.to_proto(t.target_ranks),
                identifiability=wire.to_proto(t.identifiability),
            )
            for t in image.tokens
        ],
        blocks=[pb.BlockSummary(**vars(b)) for b in image.blocks],
    )
    if image.importance is not None:
        maps = image.importance
        message.importance.CopyFrom(
            pb.ImportanceMaps(
                per_head=wire.to_proto(maps.per_head),
                summed=wire.to_proto(maps.summed),
                upsampled=wire.to_proto(maps.upsampled),
                overlay_png=heatmap_png(maps.image, maps.upsampled),
            )
        )
    return message


def _curve(curve: KeepCurve) -> pb.TokenKeepCurve:
    return pb.TokenKeepCurve(accuracy=curve.accuracy, normalized_auc=curve.normalized_auc)


def _dataset(dataset: DatasetSummary, num_images: int) -> pb.DatasetSummary:
    message = pb.DatasetSummary(
        image_count=num_images, blocks=[pb.DatasetBlockSummary(**vars(b)) for b in dataset.blocks]
    )
    evaluation: ImportanceEvaluation | None = dataset.importance_evaluation
    if evaluation is not None:
        message.importance_evaluation.CopyFrom(
            pb.ImportanceEvaluation(
                keep_counts=list(evaluation.keep_counts),
                importance_order=_curve(evaluation.importance_order),
                random_order=_curve(evaluation.random_order),
            )
        )
    return message


def projection_responses(
    header: ProjectionHeader,
    images: list[ImageProjection],
    dataset: DatasetSummary,
    max_bytes: int,
) -> list[pb.ProjectToClassSpaceResponse]:
    """Every message, built (and size-checked) before the first is sent."""
    responses = [pb.ProjectToClassSpaceResponse(header=_header(header))]
    names = header.class_space.names
    responses += [pb.ProjectToClassSpaceResponse(image=_image(i, names)) for i in images]
    responses.append(pb.ProjectToClassSpaceResponse(dataset=_dataset(dataset, len(images))))
    largest = max(r.ByteSize() for r in responses)
    if largest > max_bytes:
        raise ResourceExhausted(
            f"one image's projection takes {largest} bytes, over the {max_bytes}-byte message "
            "limit; ask for fewer blocks, tokens, representations or a smaller top_k",
            reason=Reason.RESULT_TOO_LARGE,
        )
    return responses


def memories_response(result: MemoryResult, max_bytes: int) -> pb.ProjectMemoriesResponse:
    q = result.query
    space = result.class_space
    response = pb.ProjectMemoriesResponse(
        provenance=provenance(result.provenance),
        parameters=pb.EffectiveMemoryParameters(
            block=q.block,
            kinds=[_MEMORY_KINDS_BACK[k] for k in q.kinds],
            top_k=q.top_k,
            cosine=q.cosine,
            class_count=space.num_classes,
            templates=list(space.templates),
            batch_size=result.batch_size,
        ),
        class_names=space.names,
        memories=[
            pb.MemorySet(
                kind=_MEMORY_KINDS_BACK[m.kind],
                memory_count=m.num_memories,
                top_classes=wire.to_proto(m.top_classes),
                top_class_scores=wire.to_proto(m.top_class_scores),
                top_memories=wire.to_proto(m.top_memories),
                top_memory_scores=wire.to_proto(m.top_memory_scores),
                images=[
                    pb.ImageMemories(
                        image_index=i.image_index,
                        target_index=i.target_index,
                        top_memories=wire.to_proto(i.top_memories),
                        top_coefficients=wire.to_proto(i.top_coefficients),
                        agreement_rate=i.agreement_rate,
                    )
                    for i in m.images
                ],
            )
            for m in result.memories
        ],
    )
    if response.ByteSize() > max_bytes:
        raise ResourceExhausted(
            f"the memories response takes {response.ByteSize()} bytes, over the {max_bytes}-byte "
            "message limit; ask for fewer images or a smaller top_k",
            reason=Reason.RESULT_TOO_LARGE,
        )
    return response
