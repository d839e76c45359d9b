"""Explain requests built from plain values, and responses as numpy arrays."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from google.protobuf.json_format import MessageToDict

from vitscope import tensors as wire
from vitscope.enums import short_names
from vitscope.selection import ClassLike, class_ref
from vitscope.v1 import explain_pb2 as pb

METHODS = short_names(pb.ExplanationMethod)
# Short names the CLI accepts.
ALIASES = {"ig": "integrated_gradients"}
METHOD_NAMES = {v: k for k, v in METHODS.items()}
HEAD_FUSIONS = short_names(pb.HeadFusion)
BASELINES = short_names(pb.AttributionBaseline)


@dataclass(frozen=True)
class Prompt:
    """A free-text target for an open_clip tower."""

    text: str


@dataclass(frozen=True)
class MethodOptions:
    """Per-method parameters; None leaves the server's default."""

    head_fusion: str | None = None  # rollout: mean | max | min
    steps: int | None = None  # integrated gradients
    baseline: str | None = None  # integrated gradients: black | blurred | noise
    batch_size: int | None = None  # integrated gradients: interpolated images per pass
    blur_sigma: float | None = None  # integrated gradients' blurred baseline
    seed: int = 0  # integrated gradients' noise baseline
    site: str = ""  # feature map
    channel: int | None = None  # feature map


def method_name(name: str) -> str:
    resolved = ALIASES.get(name, name)
    if resolved not in METHODS:
        allowed = ", ".join([*METHODS, *ALIASES])
        raise ValueError(f"method {name!r} unknown; allowed: {allowed}")
    return resolved


def method_request(name: str, options: MethodOptions) -> pb.ExplanationMethodRequest:
    """The method with only its own parameters set."""
    resolved = method_name(name)
    request = pb.ExplanationMethodRequest(method=METHODS[resolved])
    if resolved == "rollout" and options.head_fusion is not None:
        request.rollout.head_fusion = HEAD_FUSIONS[options.head_fusion]
    if resolved == "integrated_gradients":
        request.integrated_gradients.CopyFrom(
            pb.IntegratedGradientsParameters(
                steps=options.steps,
                baseline=BASELINES[options.baseline]
                if options.baseline
                else pb.ATTRIBUTION_BASELINE_UNSPECIFIED,
                batch_size=options.batch_size,
                blur_sigma=options.blur_sigma,
                seed=options.seed,
            )
        )
    if resolved == "feature_map":
        request.feature_map.CopyFrom(
            pb.FeatureMapParameters(site=options.site, channel=options.channel)
        )
    return request


def target_message(target: ClassLike | Prompt) -> pb.ExplanationTarget:
    if isinstance(target, Prompt):
        return pb.ExplanationTarget(prompt=target.text)
    if target is None:
        return pb.ExplanationTarget()
    return pb.ExplanationTarget(class_ref=class_ref(target))


def faithfulness_message(
    patches_per_step: int | None, blur_sigma: float | None, seed: int
) -> pb.FaithfulnessParameters:
    return pb.FaithfulnessParameters(
        patches_per_step=patches_per_step, blur_sigma=blur_sigma, seed=seed
    )


@dataclass(frozen=True)
class Curve:
    """The target's probability after each step, and the area under it on [0, 1]."""

    probabilities: list[float]
    auc: float


@dataclass(frozen=True)
class Faithfulness:
    deletion: Curve  # lower AUC is better
    insertion: Curve  # higher AUC is better


@dataclass(frozen=True)
class MethodMap:
    method: str
    grid_map: np.ndarray  # [grid_h, grid_w], the method's own values
    upsampled: np.ndarray  # [height, width] in [0, 1]
    overlay_png: bytes
    faithfulness: Faithfulness | None
    # Integrated gradients: attribution_sum, score_difference, completeness_error,
    # relative_completeness_error.
    completeness: dict[str, float] | None
    channel: int  # feature map: the channel mapped


@dataclass(frozen=True)
class ImageExplanation:
    image_index: int
    target_index: int
    target_name: str
    target_is_prediction: bool
    prediction: dict[str, Any]
    target_probability: float
    maps: dict[str, MethodMap]
    random_order: Faithfulness | None


@dataclass(frozen=True)
class Explanation:
    images: list[ImageExplanation]
    class_names: list[str]
    grid: tuple[int, int]
    prefix_token_count: int
    provenance: dict[str, Any]
    # Every method's effective parameters, by method name.
    methods: dict[str, dict[str, Any]]
    # The curves' x axis: patches removed or added before each point (faithfulness only).
    patch_counts: list[int] = field(default_factory=list)
    # Mean AUCs over the images: method (and "random") -> (deletion, insertion).
    mean_auc: dict[str, tuple[float, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class ExplainProgress:
    method: str
    completed: int
    total: int


def _dict(message: Any) -> dict[str, Any]:
    return MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _faithfulness(message: pb.Faithfulness) -> Faithfulness:
    return Faithfulness(
        Curve(list(message.deletion.probabilities), message.deletion.auc),
        Curve(list(message.insertion.probabilities), message.insertion.auc),
    )


def _map(message: pb.ExplanationMap) -> MethodMap:
    return MethodMap(
        method=METHOD_NAMES[message.method],
        grid_map=wire.from_proto(message.grid_map),
        upsampled=wire.from_proto(message.upsampled),
        overlay_png=message.overlay_png,
        faithfulness=_faithfulness(message.faithfulness)
        if message.HasField("faithfulness")
        else None,
        completeness=_dict(message.integrated_gradients)
        if message.HasField("integrated_gradients")
        else None,
        channel=message.channel,
    )


def _image(message: pb.ImageExplanation) -> ImageExplanation:
    maps = [_map(m) for m in message.maps]
    return ImageExplanation(
        image_index=message.image_index,
        target_index=message.target_index,
        target_name=message.target_name,
        target_is_prediction=message.target_is_prediction,
        prediction=_dict(message.prediction) if message.HasField("prediction") else {},
        target_probability=message.target_probability,
        maps={m.method: m for m in maps},
        random_order=_faithfulness(message.random_order)
        if message.HasField("random_order")
        else None,
    )


def collect(
    responses: Iterable[pb.ExplainResponse],
    on_progress: Callable[[ExplainProgress], object] | None = None,
) -> Explanation:
    header: pb.ExplanationHeader | None = None
    images: list[ImageExplanation] = []
    mean_auc: dict[str, tuple[float, float]] = {}
    for response in responses:
        which = response.WhichOneof("payload")
        if which == "header":
            header = response.header
        elif which == "progress" and on_progress is not None:
            p = response.progress
            on_progress(ExplainProgress(METHOD_NAMES[p.method], p.completed_count, p.total_count))
        elif which == "image":
            images.append(_image(response.image))
        elif which == "summary":
            s = response.summary
            for m in s.methods:
                mean_auc[METHOD_NAMES[m.method]] = (m.mean_deletion_auc, m.mean_insertion_auc)
            mean_auc["random"] = (s.random_mean_deletion_auc, s.random_mean_insertion_auc)
    if header is None:
        raise wire.TensorDecodeError("the stream ended without a header")
    has_curves = header.HasField("faithfulness")
    return Explanation(
        images=images,
        class_names=list(header.class_names),
        grid=(header.grid_height, header.grid_width),
        prefix_token_count=header.prefix_token_count,
        provenance=_dict(header.provenance),
        methods={METHOD_NAMES[m.method]: _dict(m) for m in header.methods},
        patch_counts=list(header.faithfulness.patch_counts),
        mean_auc=mean_auc if has_curves else {},
    )


def method_requests(
    methods: Sequence[str], options: dict[str, MethodOptions]
) -> list[pb.ExplanationMethodRequest]:
    """One request per method name, with its options (by resolved name) where given."""
    return [method_request(m, options.get(method_name(m), MethodOptions())) for m in methods]
