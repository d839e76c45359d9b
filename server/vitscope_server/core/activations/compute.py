"""GetActivations: read sites during one forward, select tokens, reduce, convert dtype.

Reductions run on the model's device so only what the caller asked for is
copied back and sent.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from vitscope_server.core.model.adapters import Layout, ModelAdapter, SiteDef
from vitscope_server.core.model.capture import (
    ForwardStopped,
    capture_sites,
    head_context_paths,
    last_block_needed,
)
from vitscope_server.core.model.images import ImageInput, prepare_batch
from vitscope_server.core.model.loading import LoadedModel
from vitscope_server.core.model.provenance import Provenance, provenance_of
from vitscope_server.core.model.readout import (
    COMPUTE_DTYPES,
    OUTPUT_DTYPES,
    DeviceSite,
    Prediction,
    Reduction,
    SiteOutput,
    TensorDType,
    check_site,
    predictions_of,
    reduce_on_device,
    top_predictions,
)
from vitscope_server.core.model.sites import resolve_site
from vitscope_server.core.model.tokens import (
    TokenMode,
    as_site_layout,
)
from vitscope_server.core.runtime.batching import outcome
from vitscope_server.core.runtime.cancel import CancelToken
from vitscope_server.core.runtime.errors import (
    FailedPrecondition,
    InvalidArgument,
    Reason,
    ResourceExhausted,
)
from vitscope_server.core.runtime.limits import RequestLimits
from vitscope_server.core.runtime.stages import Stage, StageTimes
from vitscope_server.core.runtime.transfer import to_host


@dataclass(frozen=True)
class ActivationQuery:
    sites: tuple[str, ...]
    token_mode: TokenMode = TokenMode.UNSPECIFIED
    token_indices: tuple[int, ...] = ()
    positions: tuple[tuple[int, int], ...] = ()
    reduction: Reduction = Reduction.NONE
    channels: tuple[int, ...] = ()
    top_k: int = 0
    output_dtype: TensorDType = TensorDType.FLOAT32
    top_predictions: int = 0
    # The classifier's logits for every image, float32 [batch, classes].
    logits: bool = False
    # The forward's precision: float32, or float16/bfloat16 under autocast.
    compute_dtype: TensorDType = TensorDType.FLOAT32


@dataclass(frozen=True)
class ActivationResult:
    provenance: Provenance
    query: ActivationQuery
    batch_size: int
    sites: list[SiteOutput]
    predictions: list[list[Prediction]] = field(default_factory=list)
    logits: np.ndarray | None = None
    # The batch's forward, reduction and copy off the device, as this request saw them.
    stages: StageTimes = field(default_factory=StageTimes)


@dataclass(frozen=True)
class _DeviceResult:
    """One request's result before its single copy off the device."""

    item: PreparedActivations
    batch_size: int
    sites: list[DeviceSite]
    # float32 [batch, classes] when asked for.
    logits: torch.Tensor | None
    # (probabilities, class indices, logits) of the top predictions, each [batch, k].
    top: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None


def _check_dtypes(query: ActivationQuery) -> None:
    if query.output_dtype not in OUTPUT_DTYPES:
        raise InvalidArgument(
            "output_dtype",
            f"{query.output_dtype.value} not allowed; allowed: {[d.value for d in OUTPUT_DTYPES]}",
        )
    if query.compute_dtype not in COMPUTE_DTYPES:
        raise InvalidArgument(
            "compute_dtype",
            f"{query.compute_dtype.value} not allowed; allowed: {[d.value for d in COMPUTE_DTYPES]}",
        )


def _effective(query: ActivationQuery, adapter: ModelAdapter) -> ActivationQuery:
    if not query.sites and not query.top_predictions and not query.logits:
        raise InvalidArgument(
            "sites",
            "at least one site is required (or top_predictions > 0)",
            reason=Reason.FIELD_REQUIRED,
        )
    _check_dtypes(query)
    mode = query.token_mode
    if mode is TokenMode.UNSPECIFIED:
        mode = TokenMode.ALL if query.reduction is Reduction.NONE else TokenMode.PATCHES
    if query.reduction is Reduction.PATCH_MAP:
        if not query.channels:
            raise InvalidArgument(
                "channels",
                "REDUCTION_PATCH_MAP needs at least one channel",
                reason=Reason.FIELD_REQUIRED,
            )
        if mode is not TokenMode.PATCHES:
            raise InvalidArgument(
                "tokens.mode",
                "REDUCTION_PATCH_MAP covers the patch grid; use PATCHES or leave unset",
            )
    if query.reduction is Reduction.TOP_CHANNELS and query.top_k <= 0:
        raise InvalidArgument(
            "top_k", f"REDUCTION_TOP_CHANNELS needs top_k >= 1, got {query.top_k}"
        )
    if query.top_predictions < 0:
        raise InvalidArgument("top_predictions", f"must be >= 0, got {query.top_predictions}")
    if query.top_predictions and not adapter.has_classifier:
        raise FailedPrecondition(
            f"top_predictions: model {adapter.spec.name} has no classifier",
            reason=Reason.NO_CLASSIFIER,
            subject=adapter.spec.name,
            field="top_predictions",
        )
    if query.logits and not adapter.has_classifier:
        raise FailedPrecondition(
            f"logits: model {adapter.spec.name} has no classifier",
            reason=Reason.NO_CLASSIFIER,
            subject=adapter.spec.name,
            field="logits",
        )
    if query.top_predictions > len(adapter.class_names):
        raise InvalidArgument(
            "top_predictions",
            f"{query.top_predictions} exceeds the {len(adapter.class_names)} classes",
        )
    return replace(
        query,
        token_mode=mode,
        token_indices=query.token_indices if mode is TokenMode.INDICES else (),
        positions=query.positions if mode is TokenMode.POSITIONS else (),
        channels=query.channels if query.reduction is Reduction.PATCH_MAP else (),
        top_k=query.top_k if query.reduction is Reduction.TOP_CHANNELS else 0,
    )


@dataclass(frozen=True)
class PreparedActivations:
    """A validated request with its images decoded and preprocessed (on the CPU)."""

    loaded: LoadedModel
    query: ActivationQuery
    sites: list[SiteDef]
    pixels: torch.Tensor
    # Decoding and preprocessing of its images.
    stages: StageTimes = field(default_factory=StageTimes)


def check_query(
    loaded: LoadedModel, query: ActivationQuery
) -> tuple[ActivationQuery, list[SiteDef]]:
    """The query after defaults and its sites, with every check that needs no image: the
    fields, the sites, and the token selection, reduction and channels against each site's
    shape as the load-time probe measured it (a raw module path is checked after the forward)."""
    adapter = loaded.adapter
    effective = _effective(query, adapter)
    sites = [resolve_site(adapter, name, f"sites[{i}]") for i, name in enumerate(effective.sites)]
    names = [site.name for site in sites]
    if len(set(names)) != len(names):
        raise InvalidArgument("sites", f"each site may appear once; {effective.sites} name {names}")
    for site in sites:
        shape = loaded.site_shapes.get(site.name)
        if shape is not None:
            check_site(effective, as_site_layout(site, shape), shape)
    return replace(effective, sites=tuple(names)), sites


def prepare_activations(
    loaded: LoadedModel, images: list[ImageInput], query: ActivationQuery, limits: RequestLimits
) -> PreparedActivations:
    """Everything that needs no compute slot: validation, decoding, preprocessing."""
    effective, sites = check_query(loaded, query)
    stages = StageTimes()
    pixels = prepare_batch(
        loaded.adapter, images, limits.max_batch, limits.max_pixels, stages=stages
    )
    return PreparedActivations(loaded, effective, sites, pixels, stages)


def batch_key(prepared: PreparedActivations) -> Hashable:
    """Requests with equal keys share one forward and get exactly what they would alone.

    Kept apart: other compute dtypes, and other attention blocks made explicit (that swaps
    the kernel for every image in the forward, as reading an open_clip tower's heads does).
    A raw module outside the blocks (a classifier head) reads rows whose kernel can depend
    on the batch size, so such a request runs alone, as does one that reads the output of a
    model whose head cannot run on its own rows (an open_clip tower's output projection)."""
    adapter = prepared.loaded.adapter
    if any(_outside_blocks(adapter, site) for site in prepared.sites):
        return object()
    query = prepared.query
    if (query.top_predictions or query.logits) and not adapter.head_apart:
        return object()
    attention = frozenset(s.attention_path for s in prepared.sites if s.attention_path is not None)
    contexts = frozenset(head_context_paths(prepared.sites))
    return (prepared.query.compute_dtype, attention, contexts)


def _outside_blocks(adapter: ModelAdapter, site: SiteDef) -> bool:
    if site.name != site.module_path or site.layout is not Layout.RAW:
        return False
    return last_block_needed(adapter, [site]) is None


def _stop_after(items: Sequence[PreparedActivations]) -> int | None:
    """The last block any request needs, or None when the whole forward must run."""
    deepest = 0
    for item in items:
        if item.query.top_predictions or item.query.logits:
            return None
        last = last_block_needed(item.loaded.adapter, item.sites)
        if last is None:
            return None
        deepest = max(deepest, last)
    return deepest


def _autocast(device: torch.device, dtype: TensorDType) -> AbstractContextManager[object]:
    if dtype is TensorDType.FLOAT32:
        return nullcontext()
    return torch.autocast(device.type, dtype=COMPUTE_DTYPES[dtype])


def run_activations(
    items: Sequence[PreparedActivations], cancel: CancelToken, limits: RequestLimits
) -> list[ActivationResult | BaseException]:
    """One forward over every request's images with the union of their sites captured, then
    each request's token selection, reductions and casts on its own rows (on the device), and
    one copy of everything off the device.

    All items share a batch_key. The result or error of each is returned in order; an error
    in the forward itself is raised (it concerns them all)."""
    loaded = items[0].loaded
    adapter = loaded.adapter
    stages = StageTimes()
    sites = list({site.name: site for item in items for site in item.sites}.values())
    pixels, rows = _shared_inputs(items)
    batch = pixels.to(loaded.device)
    cancel.raise_if_cancelled()
    with torch.inference_mode(), _autocast(loaded.device, items[0].query.compute_dtype):
        stop = _stop_after(items)
        with (
            stages.timing(Stage.FORWARD),
            capture_sites(adapter, sites, batch.shape[0], cancel, stop) as got,
        ):
            try:
                features: torch.Tensor | None = adapter.forward_features(batch)
            except ForwardStopped:
                features = None
        with stages.timing(Stage.REDUCE):
            reduced = [
                outcome(_split, item, got, features, own, limits)
                for item, own in zip(items, rows, strict=True)
            ]
    with stages.timing(Stage.DEVICE_TO_HOST):
        arrays = to_host(
            [t for r in reduced if isinstance(r, _DeviceResult) for t in _device_tensors(r)]
        )
    return _to_results(reduced, arrays, stages)


def _shared_inputs(items: Sequence[PreparedActivations]) -> tuple[torch.Tensor, list[slice]]:
    """The batch's input and each item's rows of it; items holding the same images (the
    outputs of one ModelInfer) share their rows, so those images run once."""
    first_rows: dict[int, slice] = {}
    distinct: list[torch.Tensor] = []
    for item in items:
        if id(item.pixels) not in first_rows:
            start = sum(int(t.shape[0]) for t in distinct)
            first_rows[id(item.pixels)] = slice(start, start + int(item.pixels.shape[0]))
            distinct.append(item.pixels)
    pixels = torch.cat(distinct) if len(distinct) > 1 else distinct[0]
    return pixels, [first_rows[id(item.pixels)] for item in items]


def _split(
    item: PreparedActivations,
    captured: dict[str, torch.Tensor],
    features: torch.Tensor | None,
    rows: slice,
    limits: RequestLimits,
) -> _DeviceResult:
    """One request's result from its rows of the shared forward, still on the device."""
    adapter, effective = item.loaded.adapter, item.query
    outputs = []
    result_bytes = 0
    for site in item.sites:
        tensor = captured.get(site.name)
        if tensor is None:
            raise InvalidArgument(
                "sites",
                f"{site.name!r} ({site.module_path}) is not reached by the forward pass",
            )
        tensor = tensor[rows]
        outputs.append(
            reduce_on_device(effective, as_site_layout(site, tuple(tensor.shape)), tensor)
        )
        result_bytes += sum(o.tensor.numel() * o.tensor.element_size() for o in outputs[-1].tensors)
        if result_bytes > limits.max_result_bytes:
            raise ResourceExhausted(
                f"sites: the result exceeds {limits.max_result_bytes} bytes; "
                "ask for fewer sites, tokens or images, a reduction, or float16",
                reason=Reason.RESULT_TOO_LARGE,
            )
    logits = None
    if features is not None and (effective.top_predictions or effective.logits):
        logits = adapter.forward_head_on(features, rows)
    top = (
        top_predictions(logits, effective.top_predictions)
        if logits is not None and effective.top_predictions
        else None
    )
    kept = logits.float().contiguous() if logits is not None and effective.logits else None
    return _DeviceResult(item, rows.stop - rows.start, outputs, kept, top)


def _device_tensors(result: _DeviceResult) -> list[torch.Tensor]:
    tensors = [o.tensor for site in result.sites for o in site.tensors]
    tensors += [] if result.logits is None else [result.logits]
    return tensors + ([] if result.top is None else list(result.top))


def _to_results(
    reduced: Sequence[_DeviceResult | BaseException],
    host_arrays: list[np.ndarray],
    stages: StageTimes,
) -> list[ActivationResult | BaseException]:
    """Each result a view of the one copy off the device (`host_arrays`: every request's
    tensors in order)."""
    arrays = iter(host_arrays)
    results: list[ActivationResult | BaseException] = []
    for reduced_item in reduced:
        if isinstance(reduced_item, BaseException):
            results.append(reduced_item)
            continue
        sites = [site.on_host(arrays) for site in reduced_item.sites]
        logits = None if reduced_item.logits is None else next(arrays)
        predictions = []
        if reduced_item.top is not None:
            probabilities, classes, values = next(arrays), next(arrays), next(arrays)
            names = reduced_item.item.loaded.adapter.class_names
            predictions = predictions_of(names, probabilities, classes, values)
        results.append(
            ActivationResult(
                provenance_of(reduced_item.item.loaded),
                reduced_item.item.query,
                reduced_item.batch_size,
                sites,
                predictions,
                logits,
                StageTimes(dict(stages.seconds)),
            )
        )
    return results


def get_activations(
    prepared: PreparedActivations, cancel: CancelToken, limits: RequestLimits
) -> ActivationResult:
    """One request alone: a batch of one."""
    (outcome,) = run_activations([prepared], cancel, limits)
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome
