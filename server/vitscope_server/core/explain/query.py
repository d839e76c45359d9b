"""An Explain request: its methods and parameters, validated with defaults filled in and its
cost bounded, all before any compute."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from enum import Enum

import torch

from vitscope_server.core.explain.attention import HeadFusion, attention_cause, relevancy_cause
from vitscope_server.core.explain.faithfulness import default_patches_per_step, patch_counts
from vitscope_server.core.explain.gradients import Baseline
from vitscope_server.core.explain.targets import Target, check_targets
from vitscope_server.core.model.adapters import Layout, ModelAdapter
from vitscope_server.core.model.adapters.capabilities import Missing
from vitscope_server.core.model.class_space import LabelSet
from vitscope_server.core.model.images import ImageInput, prepare_batch
from vitscope_server.core.model.loading import LoadedModel
from vitscope_server.core.model.sites import resolve_site
from vitscope_server.core.runtime.blur import MAX_BLUR_SIGMA
from vitscope_server.core.runtime.errors import (
    FailedPrecondition,
    InvalidArgument,
    Reason,
    ResourceExhausted,
    quote,
)

DEFAULT_STEPS = 50
MAX_STEPS = 4096
# Forward (and backward) passes one request may take, integrated gradients and curves together.
MAX_PASSES = 2048


class Method(Enum):
    ROLLOUT = "rollout"
    RELEVANCY = "relevancy"
    INTEGRATED_GRADIENTS = "integrated_gradients"
    CLASS_EMBEDDING = "class_embedding"
    FEATURE_MAP = "feature_map"


# The parameter groups each method takes (named as the request's fields).
_PARAMETERS = {
    Method.ROLLOUT: {"rollout"},
    Method.INTEGRATED_GRADIENTS: {"integrated_gradients"},
    Method.FEATURE_MAP: {"feature_map"},
}
# Methods that explain a class, so the model must have classes.
_TARGETED = {Method.RELEVANCY, Method.INTEGRATED_GRADIENTS, Method.CLASS_EMBEDDING}


@dataclass(frozen=True)
class MethodSpec:
    """One method as asked (unset values None), or as run (every value filled in)."""

    method: Method
    head_fusion: HeadFusion = HeadFusion.MEAN
    steps: int | None = None
    baseline: Baseline = Baseline.BLACK
    batch_size: int | None = None
    blur_sigma: float | None = None
    seed: int = 0
    site: str = ""
    # None: per image, the strongest channel (reported as -1 once effective).
    channel: int | None = None
    # The parameter groups the request set, to refuse those of another method.
    parameters: frozenset[str] = frozenset()


@dataclass(frozen=True)
class FaithfulnessSpec:
    patches_per_step: int | None = None
    blur_sigma: float | None = None
    seed: int = 0
    counts: tuple[int, ...] = ()


@dataclass(frozen=True)
class ExplainQuery:
    methods: tuple[MethodSpec, ...]
    targets: tuple[Target, ...] = ()
    labels: LabelSet | None = None
    faithfulness: FaithfulnessSpec | None = None


@dataclass(frozen=True)
class ExplainLimits:
    max_batch: int
    max_pixels: int
    max_result_bytes: int  # one request's results, and one pass's saved activations
    max_message_bytes: int  # one streamed message: one image's maps


@dataclass(frozen=True)
class PreparedExplanation:
    loaded: LoadedModel
    query: ExplainQuery  # effective
    pixels: torch.Tensor
    limits: ExplainLimits


def default_blur_sigma(adapter: ModelAdapter) -> float:
    """A heavy blur at any resolution: an eighth of the input height."""
    return adapter.data_config.input_size[1] / 8


def backward_bytes_per_image(loaded: LoadedModel) -> int:
    """A rough bound on the activations one image's forward keeps for its backward pass:
    about 14 token-width tensors and two attention matrices per block, float32."""
    adapter = loaded.adapter
    tokens = adapter.num_prefix_tokens + adapter.grid[0] * adapter.grid[1]
    probs = loaded.site_shapes.get("blocks.0.attn.probs", (1, 1, tokens, tokens))
    attention = math.prod(probs[1:])
    return len(adapter.blocks) * (14 * tokens * adapter.embed_dim + 2 * attention) * 4


def _blur_sigma(value: float | None, default: float, field: str) -> float:
    if value is None:
        return default
    if not 0 < value <= MAX_BLUR_SIGMA:
        raise InvalidArgument(field, f"{value} not allowed; allowed > 0 and <= {MAX_BLUR_SIGMA:g}")
    return value


def _gradient_batch(
    spec: MethodSpec, loaded: LoadedModel, limits: ExplainLimits, field: str
) -> int:
    fits = max(1, limits.max_result_bytes // backward_bytes_per_image(loaded))
    if spec.batch_size is None:
        return min(limits.max_batch, fits)
    if not 1 <= spec.batch_size <= limits.max_batch:
        raise InvalidArgument(
            f"{field}.batch_size", f"{spec.batch_size} not allowed; allowed 1..{limits.max_batch}"
        )
    if spec.batch_size > fits:
        raise ResourceExhausted(
            f"{field}.batch_size: {spec.batch_size} interpolated images need about "
            f"{spec.batch_size * backward_bytes_per_image(loaded)} bytes for their backward "
            f"pass, over the server's {limits.max_result_bytes}-byte limit; allowed up to {fits}",
            reason=Reason.LIMIT_EXCEEDED,
            field=f"{field}.batch_size",
        )
    return spec.batch_size


def _feature_site(spec: MethodSpec, loaded: LoadedModel, field: str) -> str:
    adapter = loaded.adapter
    # By default the deepest block on the model's patch grid (a hierarchical model's later
    # stages have coarser grids).
    on_grid = [i for i, block in enumerate(adapter.blocks) if block.grid == adapter.grid]
    name = spec.site or f"blocks.{on_grid[-1]}.mlp.hidden"
    site = resolve_site(adapter, name, f"{field}.site")
    shape = loaded.site_shapes.get(site.name, ())
    tokens = adapter.num_prefix_tokens + adapter.grid[0] * adapter.grid[1]
    if site.layout is not Layout.TOKENS or len(shape) != 3 or shape[1] != tokens:
        raise InvalidArgument(
            f"{field}.site",
            f"{quote(name)} holds no per-token features on the model's patch grid; "
            "use a token site such as blocks.{i}.mlp.hidden or blocks.{i}.out",
        )
    if spec.channel is not None and not 0 <= spec.channel < shape[2]:
        raise InvalidArgument(
            f"{field}.channel",
            f"{spec.channel} out of range for site {quote(name)}; allowed 0..{shape[2] - 1}",
        )
    return site.name


def _classes_reason(loaded: LoadedModel) -> str | None:
    """Why the model has no classes to explain (open_clip towers take a label set)."""
    adapter = loaded.adapter
    if adapter.family != "open_clip" and not adapter.has_classifier:
        return "it has no classifier, so no class to explain"
    return None


def _method_reason(method: Method, loaded: LoadedModel) -> str | None:
    """Why the method does not apply to this model, or None when it does."""
    adapter = loaded.adapter
    if method in _TARGETED and _classes_reason(loaded):
        return _classes_reason(loaded)
    if method is Method.ROLLOUT:
        return attention_cause(adapter)
    if method is Method.RELEVANCY:
        return relevancy_cause(adapter)
    if method is Method.CLASS_EMBEDDING:
        head, math = adapter.class_head(), adapter.attention_math()
        if isinstance(head, Missing) or isinstance(math, Missing):
            return head.cause if isinstance(head, Missing) else getattr(math, "cause", None)
        if adapter.blocks[-1].num_prefix_tokens == 0:
            return "it has no class token, whose attention the map reads"
    return None


def _effective_method(
    spec: MethodSpec, loaded: LoadedModel, limits: ExplainLimits, field: str
) -> MethodSpec:
    stray = spec.parameters - _PARAMETERS.get(spec.method, set())
    if stray:
        raise InvalidArgument(
            f"{field}.{sorted(stray)[0]}", f"not allowed with method {spec.method.value}"
        )
    reason = _method_reason(spec.method, loaded)
    if reason is not None:
        classless = spec.method in _TARGETED and _classes_reason(loaded) is not None
        raise FailedPrecondition(
            f"{field}: {spec.method.value} does not apply to model {loaded.spec.name}: {reason}",
            reason=Reason.NO_CLASSIFIER if classless else Reason.MODEL_UNSUPPORTED,
            subject=loaded.spec.name,
            field=f"{field}.method",
        )
    if spec.method is Method.INTEGRATED_GRADIENTS:
        name = f"{field}.integrated_gradients"
        steps = DEFAULT_STEPS if spec.steps is None else spec.steps
        if not 1 <= steps <= MAX_STEPS:
            raise InvalidArgument(f"{name}.steps", f"{steps} not allowed; allowed 1..{MAX_STEPS}")
        sigma = _blur_sigma(
            spec.blur_sigma, default_blur_sigma(loaded.adapter), f"{name}.blur_sigma"
        )
        batch = _gradient_batch(spec, loaded, limits, name)
        return replace(spec, steps=steps, blur_sigma=sigma, batch_size=batch)
    if spec.method is Method.FEATURE_MAP:
        return replace(spec, site=_feature_site(spec, loaded, f"{field}.feature_map"))
    return spec


def _effective_faithfulness(spec: FaithfulnessSpec, adapter: ModelAdapter) -> FaithfulnessSpec:
    patches = adapter.grid[0] * adapter.grid[1]
    per_step = spec.patches_per_step
    if per_step is None:
        per_step = default_patches_per_step(patches)
    elif not 1 <= per_step <= patches:
        raise InvalidArgument(
            "faithfulness.patches_per_step", f"{per_step} not allowed; allowed 1..{patches}"
        )
    sigma = _blur_sigma(spec.blur_sigma, default_blur_sigma(adapter), "faithfulness.blur_sigma")
    return replace(
        spec,
        patches_per_step=per_step,
        blur_sigma=sigma,
        counts=tuple(patch_counts(patches, per_step)),
    )


def _check_cost(
    loaded: LoadedModel, query: ExplainQuery, limits: ExplainLimits, batch: int
) -> None:
    """Passes, backward memory and result bytes, against the server's limits (every image
    reaches the model at its input size)."""
    _, height, width = loaded.adapter.data_config.input_size
    passes = 0
    for spec in query.methods:
        if spec.method is Method.INTEGRATED_GRADIENTS:
            assert spec.steps is not None and spec.batch_size is not None
            passes += math.ceil(batch * spec.steps / spec.batch_size)
    if query.faithfulness is not None:
        images = (len(query.methods) + 1) * 2 * batch * len(query.faithfulness.counts)
        passes += math.ceil(images / limits.max_batch)
    if passes > MAX_PASSES:
        raise ResourceExhausted(
            f"methods: about {passes} forward passes of up to {limits.max_batch} images, over the "
            f"limit of {MAX_PASSES}; ask for fewer images, integrated_gradients.steps, or a larger "
            "faithfulness.patches_per_step",
            reason=Reason.LIMIT_EXCEEDED,
        )
    whole = [s.method.value for s in query.methods]
    whole = [m for m in whole if m in (Method.RELEVANCY.value, Method.CLASS_EMBEDDING.value)]
    needed = batch * backward_bytes_per_image(loaded)
    if whole and needed > limits.max_result_bytes:
        raise ResourceExhausted(
            f"images: {whole[0]} over {batch} images needs about {needed} bytes for its "
            f"backward pass, over the server's {limits.max_result_bytes}-byte limit; send fewer",
            reason=Reason.LIMIT_EXCEEDED,
            field="images",
        )
    points = len(query.faithfulness.counts) if query.faithfulness else 0
    # Per map: the grid map, the float32 upsampled map, its PNG (at most raw RGB) and curves.
    grid = loaded.adapter.grid[0] * loaded.adapter.grid[1]
    per_map = grid * 4 + height * width * 7 + 1024 + points * 8
    per_image = (len(query.methods) + 1) * per_map
    if per_image > limits.max_message_bytes or batch * per_image > limits.max_result_bytes:
        raise ResourceExhausted(
            f"methods: one image's maps take about {per_image} bytes, over the "
            f"{limits.max_message_bytes}-byte message limit; ask for fewer methods",
            reason=Reason.RESULT_TOO_LARGE,
            field="methods",
        )


def check_explanation(
    loaded: LoadedModel, query: ExplainQuery, images: int, limits: ExplainLimits
) -> ExplainQuery:
    """The query after defaults, with every check that needs no image but their number:
    the methods and their options, the targets, and the passes, memory and result bytes
    against the server's limits."""
    if not query.methods:
        raise InvalidArgument(
            "methods", "at least one method is required", reason=Reason.FIELD_REQUIRED
        )
    seen = [spec.method for spec in query.methods]
    repeated = sorted({m.value for m in seen if seen.count(m) > 1})
    if repeated:
        raise InvalidArgument("methods", f"each method may appear once; repeated {repeated}")
    methods = tuple(
        _effective_method(spec, loaded, limits, f"methods[{i}]")
        for i, spec in enumerate(query.methods)
    )
    faithfulness = None
    if query.faithfulness is not None:
        reason = _classes_reason(loaded)
        if reason is not None:
            raise FailedPrecondition(
                f"faithfulness does not apply to model {loaded.spec.name}: it needs the "
                f"target's probability, and {reason}",
                reason=Reason.NO_CLASSIFIER,
                subject=loaded.spec.name,
                field="faithfulness",
            )
        faithfulness = _effective_faithfulness(query.faithfulness, loaded.adapter)
    effective = replace(query, methods=methods, faithfulness=faithfulness)
    if images:
        check_targets(loaded, query.targets, images)
        _check_cost(loaded, effective, limits, images)
    return effective


def prepare_explanation(
    loaded: LoadedModel, images: list[ImageInput], effective: ExplainQuery, limits: ExplainLimits
) -> PreparedExplanation:
    """Decoding and preprocessing for a query as check_explanation returned it: the rest of
    what needs no slot."""
    pixels = prepare_batch(loaded.adapter, images, limits.max_batch, limits.max_pixels)
    return PreparedExplanation(loaded, effective, pixels, limits)
