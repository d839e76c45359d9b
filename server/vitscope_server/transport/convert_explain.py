"""protobuf <-> core types for Explain, and each map's overlay drawn as PNG."""

from __future__ import annotations

from typing import Literal

import numpy as np

from vitscope import tensors as wire
from vitscope.v1 import common_pb2
from vitscope.v1 import explain_pb2 as pb
from vitscope_server.core.explain.attention import HeadFusion
from vitscope_server.core.explain.compute import (
    Event,
    ExplainProgress,
    ExplanationHeader,
    ExplanationSummary,
    ImageExplanation,
    MethodMap,
)
from vitscope_server.core.explain.faithfulness import Curve, CurvePair
from vitscope_server.core.explain.gradients import Baseline
from vitscope_server.core.explain.query import (
    ExplainQuery,
    FaithfulnessSpec,
    Method,
    MethodSpec,
)
from vitscope_server.core.explain.targets import Prompt, Target
from vitscope_server.core.runtime.errors import Reason, ResourceExhausted
from vitscope_server.transport.convert import provenance
from vitscope_server.transport.convert_projection import label_set
from vitscope_server.transport.enums import core_to_wire, enum_value, wire_to_core
from vitscope_server.transport.png import heatmap_png

_METHODS = wire_to_core(pb.ExplanationMethod, Method)
_METHODS_BACK = core_to_wire(pb.ExplanationMethod, Method)
_FUSIONS = wire_to_core(pb.HeadFusion, HeadFusion, unspecified=HeadFusion.MEAN)
_FUSIONS_BACK = core_to_wire(pb.HeadFusion, HeadFusion)
_BASELINES = wire_to_core(pb.AttributionBaseline, Baseline, unspecified=Baseline.BLACK)
_BASELINES_BACK = core_to_wire(pb.AttributionBaseline, Baseline)
_PARAMETER_GROUPS: tuple[Literal["rollout", "integrated_gradients", "feature_map"], ...] = (
    "rollout",
    "integrated_gradients",
    "feature_map",
)


def _method(request: pb.ExplanationMethodRequest, field: str) -> MethodSpec:
    ig = request.integrated_gradients
    feature = request.feature_map
    return MethodSpec(
        method=enum_value(_METHODS, request.method, f"{field}.method", pb.ExplanationMethod),
        head_fusion=enum_value(
            _FUSIONS, request.rollout.head_fusion, f"{field}.rollout.head_fusion", pb.HeadFusion
        ),
        steps=ig.steps if ig.HasField("steps") else None,
        baseline=enum_value(
            _BASELINES,
            ig.baseline,
            f"{field}.integrated_gradients.baseline",
            pb.AttributionBaseline,
        ),
        batch_size=ig.batch_size if ig.HasField("batch_size") else None,
        blur_sigma=ig.blur_sigma if ig.HasField("blur_sigma") else None,
        seed=ig.seed,
        site=feature.site,
        channel=feature.channel if feature.HasField("channel") else None,
        parameters=frozenset(g for g in _PARAMETER_GROUPS if request.HasField(g)),
    )


def _target(target: pb.ExplanationTarget) -> Target:
    which = target.WhichOneof("target")
    if which == "prompt":
        return Prompt(target.prompt)
    if which == "class_ref":
        ref = target.class_ref.WhichOneof("ref")
        return target.class_ref.index if ref == "index" else target.class_ref.name if ref else None
    return None


def explain_query(request: pb.ExplainRequest) -> ExplainQuery:
    faithfulness = None
    if request.HasField("faithfulness"):
        f = request.faithfulness
        faithfulness = FaithfulnessSpec(
            patches_per_step=f.patches_per_step if f.HasField("patches_per_step") else None,
            blur_sigma=f.blur_sigma if f.HasField("blur_sigma") else None,
            seed=f.seed,
        )
    return ExplainQuery(
        methods=tuple(_method(m, f"methods[{i}]") for i, m in enumerate(request.methods)),
        targets=tuple(_target(t) for t in request.targets),
        labels=label_set(request.HasField("labels"), request.labels),
        faithfulness=faithfulness,
    )


def _effective_method(spec: MethodSpec) -> pb.EffectiveExplanationMethod:
    message = pb.EffectiveExplanationMethod(method=_METHODS_BACK[spec.method])
    if spec.method is Method.ROLLOUT:
        message.head_fusion = _FUSIONS_BACK[spec.head_fusion]
    elif spec.method is Method.INTEGRATED_GRADIENTS:
        message.steps = spec.steps or 0
        message.baseline = _BASELINES_BACK[spec.baseline]
        message.batch_size = spec.batch_size or 0
        message.blur_sigma = spec.blur_sigma or 0.0
        message.seed = spec.seed
    elif spec.method is Method.FEATURE_MAP:
        message.site = spec.site
        message.channel = -1 if spec.channel is None else spec.channel
    return message


def _header(header: ExplanationHeader) -> pb.ExplanationHeader:
    prepared = header.prepared
    adapter = prepared.loaded.adapter
    message = pb.ExplanationHeader(
        provenance=provenance(header.provenance),
        methods=[_effective_method(m) for m in prepared.query.methods],
        class_names=header.class_names,
        batch_size=int(prepared.pixels.shape[0]),
        prefix_token_count=adapter.num_prefix_tokens,
        grid_height=adapter.grid[0],
        grid_width=adapter.grid[1],
        cosine=header.cosine,
    )
    f = prepared.query.faithfulness
    if f is not None:
        message.faithfulness.CopyFrom(
            pb.EffectiveFaithfulnessParameters(
                patches_per_step=f.patches_per_step or 0,
                blur_sigma=f.blur_sigma or 0.0,
                seed=f.seed,
                patch_counts=list(f.counts),
            )
        )
    return message


def _curve(curve: Curve) -> pb.FaithfulnessCurve:
    return pb.FaithfulnessCurve(probabilities=curve.probabilities, auc=curve.auc)


def _faithfulness(pair: CurvePair) -> pb.Faithfulness:
    return pb.Faithfulness(deletion=_curve(pair.deletion), insertion=_curve(pair.insertion))


def _map(result: MethodMap, image: np.ndarray) -> pb.ExplanationMap:
    message = pb.ExplanationMap(
        method=_METHODS_BACK[result.method],
        grid_map=wire.to_proto(result.grid_map),
        upsampled=wire.to_proto(result.upsampled),
        overlay_png=heatmap_png(image, result.upsampled),
        channel=result.channel,
    )
    if result.faithfulness is not None:
        message.faithfulness.CopyFrom(_faithfulness(result.faithfulness))
    c = result.completeness
    if c is not None:
        message.integrated_gradients.CopyFrom(
            pb.IntegratedGradientsDiagnostics(
                attribution_sum=c.attribution_sum,
                score_difference=c.score_difference,
                completeness_error=c.error,
                relative_completeness_error=c.relative_error,
            )
        )
    return message


def _image(image: ImageExplanation, names: list[str]) -> pb.ImageExplanation:
    message = pb.ImageExplanation(
        image_index=image.image_index,
        target_index=image.target_index,
        target_name=image.target_name,
        target_is_prediction=image.target_is_prediction,
        target_probability=image.target_probability,
        maps=[_map(m, image.image) for m in image.maps],
    )
    if image.predicted_index >= 0:
        message.prediction.CopyFrom(
            common_pb2.Prediction(
                class_index=image.predicted_index,
                class_name=names[image.predicted_index],
                probability=image.predicted_probability,
                logit=image.predicted_logit,
            )
        )
    if image.random_order is not None:
        message.random_order.CopyFrom(_faithfulness(image.random_order))
    return message


def _summary(summary: ExplanationSummary) -> pb.ExplanationSummary:
    return pb.ExplanationSummary(
        image_count=summary.image_count,
        methods=[
            pb.MethodFaithfulness(
                method=_METHODS_BACK[m.method],
                mean_deletion_auc=m.mean_deletion_auc,
                mean_insertion_auc=m.mean_insertion_auc,
            )
            for m in summary.methods
        ],
        random_mean_deletion_auc=summary.random_mean_deletion_auc,
        random_mean_insertion_auc=summary.random_mean_insertion_auc,
    )


def explain_response(event: Event, names: list[str], max_bytes: int) -> pb.ExplainResponse:
    """One event as one message, refused when it would not fit one message."""
    if isinstance(event, ExplanationHeader):
        response = pb.ExplainResponse(header=_header(event))
    elif isinstance(event, ExplainProgress):
        response = pb.ExplainResponse(
            progress=pb.ExplanationProgress(
                method=_METHODS_BACK[event.method],
                completed_count=event.completed,
                total_count=event.total,
            )
        )
    elif isinstance(event, ImageExplanation):
        response = pb.ExplainResponse(image=_image(event, names))
    else:
        response = pb.ExplainResponse(summary=_summary(event))
    if response.ByteSize() > max_bytes:
        raise ResourceExhausted(
            f"one image's explanation takes {response.ByteSize()} bytes, over the {max_bytes}-byte "
            "message limit; ask for fewer methods",
            reason=Reason.RESULT_TOO_LARGE,
        )
    return response
