"""Explain: attribution maps for each image's target by every requested method, optionally
with deletion and insertion curves against a seeded random order (docs/methods.md section 5).

The run is a generator of events: a header, progress while integrated gradients run, one
result per image, then a summary; everything stays on the model's device until the small
maps are copied back.
"""

from __future__ import annotations

import math
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vitscope_server.core.explain.attention import attention_forward, relevancy, rollout
from vitscope_server.core.explain.faithfulness import (
    CurveInputs,
    CurvePair,
    curves,
    map_order,
    random_order,
)
from vitscope_server.core.explain.gradients import (
    Completeness,
    GradientProgress,
    baseline_images,
    integrated_gradients,
)
from vitscope_server.core.explain.maps import class_embedding_maps, display_maps, feature_maps
from vitscope_server.core.explain.query import Method, MethodSpec, PreparedExplanation
from vitscope_server.core.explain.targets import Prompt, TargetSpace, resolve_targets, target_space
from vitscope_server.core.model.pixels import denormalize, normalize, to_uint8
from vitscope_server.core.model.provenance import Provenance, provenance_of
from vitscope_server.core.runtime.blur import gaussian_blur
from vitscope_server.core.runtime.cancel import CancelToken
from vitscope_server.core.runtime.transfer import to_host


@dataclass(frozen=True)
class ExplanationHeader:
    provenance: Provenance
    prepared: PreparedExplanation
    class_names: list[str]
    cosine: bool


@dataclass(frozen=True)
class ExplainProgress:
    method: Method
    completed: int
    total: int


@dataclass(frozen=True)
class MethodMap:
    method: Method
    grid_map: np.ndarray  # float32 [grid_h, grid_w]
    upsampled: np.ndarray  # float32 [height, width] in [0, 1]
    faithfulness: CurvePair | None
    completeness: Completeness | None
    channel: int  # feature map: the channel mapped; otherwise -1


@dataclass(frozen=True)
class ImageExplanation:
    image_index: int
    target_index: int  # -1 for a model without classes
    target_name: str
    target_is_prediction: bool
    predicted_index: int
    predicted_logit: float
    predicted_probability: float
    target_probability: float
    image: np.ndarray  # uint8 [height, width, 3]: the input the maps are drawn over
    maps: list[MethodMap]
    random_order: CurvePair | None


@dataclass(frozen=True)
class MethodFaithfulness:
    method: Method
    mean_deletion_auc: float
    mean_insertion_auc: float


@dataclass(frozen=True)
class ExplanationSummary:
    image_count: int
    methods: list[MethodFaithfulness]
    random_mean_deletion_auc: float
    random_mean_insertion_auc: float


Event = ExplanationHeader | ExplainProgress | ImageExplanation | ExplanationSummary


@dataclass(frozen=True)
class _Computed:
    maps: torch.Tensor  # [B, grid_h, grid_w]
    completeness: list[Completeness] | None = None
    channels: list[int] | None = None


@dataclass(frozen=True)
class _Predicted:
    """The first forward's results: scores, targets, and the attention maps it served."""

    logits: torch.Tensor  # [B, C] float, detached; [B, 1] zeros for a model without classes
    targets: torch.Tensor  # [B]; -1 without classes
    is_prediction: list[bool]
    attention_maps: dict[Method, torch.Tensor]

    def target_scores(self) -> torch.Tensor:
        return self.logits.gather(1, self.targets[:, None])[:, 0]


def _predict(
    prepared: PreparedExplanation,
    space: TargetSpace | None,
    pixels: torch.Tensor,
    cancel: CancelToken,
    requests: Sequence[slice],
) -> _Predicted:
    """One forward for the predictions, the head on each request's rows. When rollout or
    relevancy is asked for, the same forward captures the attention they read (keeping
    the graph for relevancy)."""
    adapter = prepared.loaded.adapter
    specs = {spec.method: spec for spec in prepared.query.methods}
    wanted = specs.keys() & {Method.ROLLOUT, Method.RELEVANCY}
    batch = pixels.shape[0]
    probs: list[torch.Tensor] = []
    output = None
    if wanted:
        differentiable = Method.RELEVANCY in wanted
        output, probs = attention_forward(adapter, pixels, cancel, differentiable, requests)
    elif space is not None:
        with torch.no_grad():
            output = adapter.forward_by_request(pixels, requests)
    targets = torch.full((batch,), -1, dtype=torch.long, device=pixels.device)
    predicted = _Predicted(
        torch.zeros(batch, 1, device=pixels.device), targets, [False] * batch, {}
    )
    if space is not None and output is not None:
        scores = space.logits(output)
        logits = scores.detach().float()
        targets, is_prediction = resolve_targets(
            space, prepared.query.targets, space.predictions(logits)
        )
        predicted = _Predicted(logits, targets, is_prediction, {})
        if Method.RELEVANCY in wanted:
            score = scores.gather(1, targets[:, None]).sum()
            predicted.attention_maps[Method.RELEVANCY] = relevancy(score, probs, adapter)
    if Method.ROLLOUT in wanted:
        fusion = specs[Method.ROLLOUT].head_fusion
        predicted.attention_maps[Method.ROLLOUT] = rollout(probs, fusion, adapter)
    return predicted


def _method_maps(
    spec: MethodSpec,
    prepared: PreparedExplanation,
    space: TargetSpace | None,
    pixels: torch.Tensor,
    predicted: _Predicted,
    cancel: CancelToken,
) -> Generator[ExplainProgress, None, _Computed]:
    adapter = prepared.loaded.adapter
    if spec.method in predicted.attention_maps:
        return _Computed(predicted.attention_maps[spec.method])
    if spec.method is Method.FEATURE_MAP:
        maps, channels = feature_maps(adapter, spec.site, spec.channel, pixels, cancel)
        return _Computed(maps, channels=channels)
    assert space is not None
    targets = predicted.targets
    if spec.method is Method.CLASS_EMBEDDING:
        if space.class_space is None:
            missing = prepared.loaded.adapter.missing(space.class_space_missing)
            raise missing.refusal("class_embedding")
        return _Computed(class_embedding_maps(adapter, space.class_space, pixels, targets, cancel))
    assert spec.steps is not None and spec.batch_size is not None and spec.blur_sigma is not None
    reference = baseline_images(adapter, pixels, spec.baseline, spec.blur_sigma, spec.seed)
    run = integrated_gradients(
        adapter,
        space.logits,
        pixels,
        reference,
        targets,
        predicted.target_scores(),
        spec.steps,
        spec.batch_size,
        cancel,
    )
    while True:
        try:
            progress: GradientProgress = next(run)
        except StopIteration as done:
            return _Computed(done.value.maps, completeness=done.value.completeness)
        yield ExplainProgress(spec.method, progress.completed, progress.total)


def _curves(
    prepared: PreparedExplanation,
    space: TargetSpace,
    pixels: torch.Tensor,
    targets: torch.Tensor,
    maps: list[torch.Tensor],
    cancel: CancelToken,
) -> list[list[CurvePair]]:
    """Per map and then for the random order (last): each image's curves."""
    faithfulness = prepared.query.faithfulness
    assert faithfulness is not None and faithfulness.blur_sigma is not None
    adapter = prepared.loaded.adapter
    patches = adapter.grid[0] * adapter.grid[1]
    orders = [map_order(m.to(pixels.device)) for m in maps]
    orders.append(random_order(pixels.shape[0], patches, faithfulness.seed).to(pixels.device))
    inputs = CurveInputs(
        pixels,
        normalize(torch.zeros_like(pixels), adapter.data_config),
        gaussian_blur(pixels, faithfulness.blur_sigma),
        targets,
        list(faithfulness.counts),
    )
    batch = prepared.limits.max_batch
    return curves(adapter, space.logits, inputs, torch.stack(orders), batch, cancel)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def summary(methods: list[Method], per_image: list[ImageExplanation]) -> ExplanationSummary:
    def means(pairs: list[CurvePair | None]) -> tuple[float, float]:
        present = [p for p in pairs if p is not None]
        return _mean([p.deletion.auc for p in present]), _mean([p.insertion.auc for p in present])

    rows = [
        MethodFaithfulness(m, *means([image.maps[j].faithfulness for image in per_image]))
        for j, m in enumerate(methods)
    ]
    return ExplanationSummary(len(per_image), rows, *means([i.random_order for i in per_image]))


def explain(
    prepared: PreparedExplanation,
    cancel: CancelToken,
    requests: Sequence[slice] | None = None,
) -> Iterator[Event]:
    """The header, progress, one ImageExplanation per image, then the summary.

    requests: the rows of each request when several share the run (explain_batching);
    the model's head runs on each one's rows, as it would alone."""
    loaded, query = prepared.loaded, prepared.query
    adapter = loaded.adapter
    pixels = prepared.pixels.to(loaded.device)
    batch = pixels.shape[0]
    prompts = list(dict.fromkeys(t.text for t in query.targets if isinstance(t, Prompt)))
    space = target_space(loaded, query.labels, prompts, cancel)
    cancel.raise_if_cancelled()
    predicted = _predict(prepared, space, pixels, cancel, requests or [slice(0, batch)])
    names = space.names if space is not None else []
    yield ExplanationHeader(provenance_of(loaded), prepared, names, bool(space and space.cosine))
    computed = []
    for spec in query.methods:
        cancel.raise_if_cancelled()
        computed.append((yield from _method_maps(spec, prepared, space, pixels, predicted, cancel)))
    pairs: list[list[CurvePair]] | None = None
    if query.faithfulness is not None and space is not None:
        maps = [c.maps for c in computed]
        pairs = _curves(prepared, space, pixels, predicted.targets, maps, cancel)
    size = (int(pixels.shape[-2]), int(pixels.shape[-1]))
    shown = [display_maps(c.maps.to(pixels.device), size) for c in computed]
    images = to_uint8(denormalize(pixels.float(), adapter.data_config))
    host = _on_host(computed, shown, predicted, space)
    per_image = [
        _image(i, query.methods, computed, host, pairs, images[i], space, predicted)
        for i in range(batch)
    ]
    yield from per_image
    yield summary([s.method for s in query.methods], per_image)


@dataclass(frozen=True)
class _OnHost:
    """Every image's maps and class numbers, copied off the device at once."""

    maps: list[np.ndarray]  # per method, float32 [B, grid_h, grid_w]
    shown: list[np.ndarray]  # per method, float32 [B, H, W]
    targets: np.ndarray  # int64 [B]
    top: np.ndarray  # int64 [B]; -1 without classes
    top_logits: np.ndarray  # float32 [B]
    top_probabilities: np.ndarray  # float32 [B]
    target_probabilities: np.ndarray  # float32 [B]


def _on_host(
    computed: list[_Computed],
    shown: list[torch.Tensor],
    predicted: _Predicted,
    space: TargetSpace | None,
) -> _OnHost:
    """One copy for the whole batch rather than a few per image and method."""
    logits, targets = predicted.logits, predicted.targets
    probabilities = logits.softmax(dim=-1)
    top = space.predictions(logits) if space is not None else torch.full_like(targets, -1)
    tops, chosen = top.clamp(min=0)[:, None], targets.clamp(min=0)[:, None]
    scores = [
        targets,
        top,
        logits.gather(1, tops)[:, 0].float(),
        probabilities.gather(1, tops)[:, 0].float(),
        probabilities.gather(1, chosen)[:, 0].float(),
    ]
    tensors = [c.maps.float() for c in computed] + [m.float() for m in shown] + scores
    arrays = to_host([t.contiguous() for t in tensors])
    count = len(computed)
    return _OnHost(arrays[:count], arrays[count : 2 * count], *arrays[2 * count :])


def _image(
    i: int,
    methods: tuple[MethodSpec, ...],
    computed: list[_Computed],
    host: _OnHost,
    pairs: list[list[CurvePair]] | None,
    image: np.ndarray,
    space: TargetSpace | None,
    predicted: _Predicted,
) -> ImageExplanation:
    """One image's results, read from the batch's copy on the host."""
    maps = [
        MethodMap(
            spec.method,
            host.maps[j][i],
            host.shown[j][i],
            pairs[j][i] if pairs is not None else None,
            c.completeness[i] if c.completeness is not None else None,
            c.channels[i] if c.channels is not None else -1,
        )
        for j, (spec, c) in enumerate(zip(methods, computed, strict=True))
    ]
    target, top = int(host.targets[i]), int(host.top[i])
    classes = space is not None
    return ImageExplanation(
        image_index=i,
        target_index=target,
        target_name=space.names[target] if space is not None else "",
        target_is_prediction=predicted.is_prediction[i],
        predicted_index=top,
        predicted_logit=float(host.top_logits[i]) if classes else 0.0,
        predicted_probability=float(host.top_probabilities[i]) if classes else 0.0,
        target_probability=float(host.target_probabilities[i]) if classes else 0.0,
        image=image,
        maps=maps,
        random_order=pairs[-1][i] if pairs is not None else None,
    )
