"""protobuf <-> core types for Intervene."""

from __future__ import annotations

import numpy as np

from vitscope import tensors as wire
from vitscope.v1 import activations_pb2, common_pb2, tensor_pb2
from vitscope.v1 import interventions_pb2 as pb
from vitscope_server.core.interventions.compute import (
    Event,
    InterventionHeader,
    InterventionProgress,
    Reference,
    SweepResult,
    VariantResult,
)
from vitscope_server.core.interventions.edits import (
    ClassRef,
    Direction,
    Edit,
    InterventionQuery,
    Metric,
    MetricKind,
    Operation,
    Outputs,
    Selection,
    Sweep,
    SweepKind,
    Variant,
)
from vitscope_server.core.interventions.query import ImageSets
from vitscope_server.core.model.readout import OutputTensor
from vitscope_server.core.model.tokens import TokenMode
from vitscope_server.core.runtime.errors import InvalidArgument, Reason
from vitscope_server.transport.convert import (
    OUTPUT_DTYPES,
    REDUCTIONS,
    WIRE_DTYPES,
    image_inputs,
    image_predictions,
    provenance,
    tensor_array,
    token_mode,
)
from vitscope_server.transport.enums import core_to_wire, enum_value, wire_to_core

_OPERATIONS = wire_to_core(pb.EditOperation, Operation)
_OPERATIONS_BACK = core_to_wire(pb.EditOperation, Operation)
_SWEEPS = wire_to_core(pb.SweepKind, SweepKind)
_SWEEPS_BACK = core_to_wire(pb.SweepKind, SweepKind)
# Unset: the core picks the metric (logit difference with a source, else KL).
_METRICS: dict[pb.MetricKind.ValueType, MetricKind | None] = {
    pb.METRIC_KIND_UNSPECIFIED: None,
    **wire_to_core(pb.MetricKind, MetricKind),
}
_METRICS_BACK = core_to_wire(pb.MetricKind, MetricKind)


def _class(ref: common_pb2.ClassRef) -> ClassRef:
    which = ref.WhichOneof("ref")
    return ref.index if which == "index" else ref.name if which == "name" else None


def _required_class(ref: common_pb2.ClassRef, field: str) -> int | str:
    """A listed class must name one: an empty entry would shift every later column."""
    which = _class(ref)
    if which is None:
        raise InvalidArgument(field, "set index or name", reason=Reason.FIELD_REQUIRED)
    return which


def _selection(selection: pb.EditSelection) -> Selection:
    tokens = selection.tokens
    mode = token_mode(tokens)
    return Selection(
        TokenMode.ALL if mode is TokenMode.UNSPECIFIED else mode,
        tuple(tokens.indices),
        tuple((p.row, p.col) for p in tokens.positions),
        tuple(selection.heads),
        tuple(selection.channels),
    )


def _edit(edit: pb.Edit, field: str) -> Edit:
    direction = None
    if edit.HasField("direction"):
        which = edit.direction.WhichOneof("source")
        vector = (
            tuple(
                float(v)
                for v in tensor_array(edit.direction.vector, f"{field}.direction.vector").reshape(
                    -1
                )
            )
            if which == "vector"
            else ()
        )
        row = _class(edit.direction.class_row) if which == "class_row" else None
        direction = Direction(vector, row)
    return Edit(
        site=edit.site,
        operation=enum_value(_OPERATIONS, edit.operation, f"{field}.operation", pb.EditOperation),
        selection=_selection(edit.selection),
        value=edit.value,
        alpha=edit.alpha if edit.HasField("alpha") else 1.0,
        factor=edit.factor if edit.HasField("factor") else 1.0,
        direction=direction,
    )


def _sweep(request: pb.InterveneRequest) -> Sweep | None:
    if not request.HasField("sweep"):
        return None
    sweep = request.sweep
    operation = (
        Operation.ZERO
        if sweep.operation == pb.EDIT_OPERATION_UNSPECIFIED
        else enum_value(_OPERATIONS, sweep.operation, "sweep.operation", pb.EditOperation)
    )
    return Sweep(
        enum_value(_SWEEPS, sweep.kind, "sweep.kind", pb.SweepKind),
        sweep.part or "out",
        operation,
        tuple(sweep.blocks),
    )


def _outputs(outputs: pb.InterventionOutputs) -> Outputs:
    return Outputs(
        top_k=outputs.top_k,
        classes=tuple(
            _required_class(r, f"outputs.classes[{i}]") for i, r in enumerate(outputs.classes)
        ),
        logits=outputs.logits,
        sites=tuple(outputs.sites),
        token_mode=token_mode(outputs.tokens),
        token_indices=tuple(outputs.tokens.indices),
        positions=tuple((p.row, p.col) for p in outputs.tokens.positions),
        reduction=enum_value(
            REDUCTIONS, outputs.reduction, "outputs.reduction", activations_pb2.Reduction
        ),
        channels=tuple(outputs.channels),
        top_channels=outputs.top_channels,
        output_dtype=enum_value(
            OUTPUT_DTYPES, outputs.output_dtype, "outputs.output_dtype", tensor_pb2.Dtype
        ),
    )


def intervention_query(request: pb.InterveneRequest) -> InterventionQuery:
    variants = tuple(
        Variant(
            tuple(_edit(e, f"variants[{i}].edits[{j}]") for j, e in enumerate(v.edits)), v.label
        )
        for i, v in enumerate(request.variants)
    )
    metric = Metric(
        enum_value(_METRICS, request.metric.kind, "metric.kind", pb.MetricKind),
        _class(request.metric.target),
        _class(request.metric.other),
    )
    return InterventionQuery(
        variants,
        _sweep(request),
        metric,
        _outputs(request.outputs),
        request.variants_per_forward if request.HasField("variants_per_forward") else None,
    )


def image_sets(request: pb.InterveneRequest) -> ImageSets:
    return ImageSets(
        image_inputs(list(request.images)),
        image_inputs(list(request.source_images)),
        image_inputs(list(request.reference_images)),
    )


def _float(array: np.ndarray | None) -> tensor_pb2.Tensor | None:
    return None if array is None else wire.to_proto(np.ascontiguousarray(array, dtype=np.float32))


def _output_tensor(tensor: OutputTensor) -> tensor_pb2.Tensor:
    array = np.ascontiguousarray(tensor.array)
    return tensor_pb2.Tensor(
        dtype=WIRE_DTYPES[tensor.dtype], shape=list(array.shape), data=array.tobytes()
    )


def _reference(run: Reference) -> pb.ReferenceRun:
    return pb.ReferenceRun(
        metric=_float(run.metric), predictions=image_predictions(run.predictions)
    )


def _header(header: InterventionHeader) -> pb.InterventionHeader:
    prepared = header.prepared
    plan = prepared.plan
    sweep = prepared.query.sweep
    message = pb.InterventionHeader(
        provenance=provenance(header.provenance),
        variant_count=len(plan.variants),
        variants_per_forward=plan.variants_per_forward,
        image_count=int(prepared.base.shape[0]),
        metric=_METRICS_BACK[prepared.metric] if prepared.metric else pb.METRIC_KIND_UNSPECIFIED,
        target_classes=header.targets,
        other_classes=header.others,
        base=_reference(header.base),
        class_names=prepared.loaded.adapter.class_names,
    )
    if header.source is not None:
        message.source.CopyFrom(_reference(header.source))
    if sweep is not None and plan.sweep is not None:
        message.sweep.CopyFrom(
            pb.Sweep(
                kind=_SWEEPS_BACK[sweep.kind],
                part=sweep.part,
                operation=_OPERATIONS_BACK[sweep.operation],
                blocks=list(sweep.blocks),
            )
        )
        message.sweep_shape.extend(plan.sweep.shape)
        message.sweep_axes.extend(plan.sweep.axes)
    return message


def _variant(result: VariantResult) -> pb.VariantResult:
    return pb.VariantResult(
        index=result.index,
        label=result.label,
        metric=_float(result.metric),
        normalized=_float(result.normalized),
        logits=_float(result.logits),
        class_logits=_float(result.class_logits),
        predictions=image_predictions(result.predictions),
        sites=[
            pb.InterventionSiteResult(
                site=s.site.name,
                token_indices=s.token_indices,
                channels=s.channels,
                tensors=[_output_tensor(t) for t in s.tensors],
                roles=[t.role for t in s.tensors],
            )
            for s in result.sites
        ],
    )


def intervene_response(event: Event) -> pb.InterveneResponse:
    if isinstance(event, InterventionHeader):
        return pb.InterveneResponse(header=_header(event))
    if isinstance(event, InterventionProgress):
        return pb.InterveneResponse(
            progress=pb.InterventionProgress(
                completed_count=event.completed,
                total_count=event.total,
                variant_indices=event.indices,
                values=_float(event.values),
                normalized=_float(event.normalized),
            )
        )
    if isinstance(event, VariantResult):
        return pb.InterveneResponse(variant=_variant(event))
    assert isinstance(event, SweepResult)
    return pb.InterveneResponse(
        sweep=pb.SweepResult(
            shape=list(event.shape),
            axes=list(event.axes),
            values=_float(event.values),
            normalized=_float(event.normalized),
        )
    )
