"""GetActivations: read sites during one forward, select tokens, reduce, convert dtype.

Reductions run on the model's device so only what the caller asked for is
copied back and sent.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from enum import Enum

import numpy as np
import torch

from vitscope_server.core.model.adapters import Layout, ModelAdapter, SiteDef
from vitscope_server.core.model.capture import ForwardStopped, capture_sites, last_block_needed
from vitscope_server.core.model.images import ImageInput, prepare_batch
from vitscope_server.core.model.loading import LoadedModel
from vitscope_server.core.model.provenance import Provenance, provenance_of
from vitscope_server.core.model.sites import resolve_site
from vitscope_server.core.model.tokens import (
    TokenMode,
    as_site_layout,
    resolve_token_indices,
    select_tokens,
)
from vitscope_server.core.runtime.batching import per_item
from vitscope_server.core.runtime.cancel import CancelToken
from vitscope_server.core.runtime.errors import (
    FailedPrecondition,
    InvalidArgument,
    Reason,
    ResourceExhausted,
    require_in_range,
)


class Reduction(Enum):
    NONE = "none"
    MEAN = "mean"
    PATCH_MAP = "patch_map"
    TOP_CHANNELS = "top_channels"


class TensorDType(Enum):
    """Element types of result tensors; bfloat16 results hold their bit patterns as uint16."""

    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    INT64 = "int64"


OUTPUT_DTYPES = (TensorDType.FLOAT32, TensorDType.FLOAT16, TensorDType.BFLOAT16)
COMPUTE_DTYPES = {
    TensorDType.FLOAT32: torch.float32,
    TensorDType.FLOAT16: torch.float16,
    TensorDType.BFLOAT16: torch.bfloat16,
}


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
class OutputTensor:
    """A result tensor; bfloat16 arrays hold bit patterns as uint16."""

    role: str
    dtype: TensorDType
    array: np.ndarray


@dataclass(frozen=True)
class SiteOutput:
    site: SiteDef
    token_indices: list[int]
    channels: list[int]
    tensors: list[OutputTensor]


@dataclass(frozen=True)
class Prediction:
    class_index: int
    class_name: str
    probability: float
    logit: float


@dataclass(frozen=True)
class ActivationResult:
    provenance: Provenance
    query: ActivationQuery
    batch_size: int
    sites: list[SiteOutput]
    predictions: list[list[Prediction]] = field(default_factory=list)
    logits: np.ndarray | None = None


@dataclass(frozen=True)
class ActivationLimits:
    """Per-request bounds; the values come from the server's settings."""

    max_batch: int
    max_pixels: int
    max_result_bytes: int


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


def _to_output(role: str, tensor: torch.Tensor, dtype: TensorDType) -> OutputTensor:
    if tensor.dtype == torch.int64:
        return OutputTensor(role, TensorDType.INT64, tensor.contiguous().cpu().numpy())
    if dtype is TensorDType.BFLOAT16:
        bits = (
            tensor.to(torch.bfloat16).contiguous().view(torch.int16).cpu().numpy().view(np.uint16)
        )
        return OutputTensor(role, dtype, bits)
    target = torch.float16 if dtype is TensorDType.FLOAT16 else torch.float32
    return OutputTensor(role, dtype, tensor.to(target).contiguous().cpu().numpy())


def _check_channels(channels: tuple[int, ...], site: SiteDef, num_channels: int) -> None:
    if len(channels) > num_channels:
        raise InvalidArgument("channels", f"at most {num_channels} for site {site.name!r}")
    require_in_range("channels", channels, 0, num_channels - 1, f" for site {site.name!r}")


def _reduce(query: ActivationQuery, site: SiteDef, tensor: torch.Tensor) -> SiteOutput:
    """Selects tokens and applies the reduction to one site's canonical tensor."""
    reduction = query.reduction
    if site.layout in (Layout.WINDOW_ATTENTION, Layout.RAW):
        if reduction is not Reduction.NONE or query.token_mode is not TokenMode.ALL:
            raise InvalidArgument(
                "sites",
                f"{site.name!r} has {site.layout.value} layout {list(tensor.shape)}; "
                "it allows only REDUCTION_NONE with all tokens",
            )
        return SiteOutput(site, [], [], [_to_output("values", tensor, query.output_dtype)])
    token_axis = 2 if site.layout is Layout.ATTENTION else 1
    indices = resolve_token_indices(query, site, tensor.shape[token_axis])
    selected = select_tokens(tensor, token_axis, indices)
    if reduction is Reduction.NONE:
        values = selected
    elif reduction is Reduction.MEAN:
        values = selected.mean(dim=token_axis)
    elif site.layout is Layout.ATTENTION:
        raise InvalidArgument(
            "reduction", f"site {site.name!r} holds attention probabilities; allowed: NONE, MEAN"
        )
    elif reduction is Reduction.PATCH_MAP:
        _check_channels(query.channels, site, tensor.shape[-1])
        channel_tensor = torch.tensor(query.channels, device=tensor.device)
        height, width = site.grid
        maps = selected.index_select(2, channel_tensor).transpose(1, 2)
        values = maps.reshape(tensor.shape[0], len(query.channels), height, width)
        return SiteOutput(
            site, indices, list(query.channels), [_to_output("values", values, query.output_dtype)]
        )
    else:
        num_channels = tensor.shape[-1]
        if query.top_k > num_channels:
            raise InvalidArgument(
                "top_k", f"{query.top_k} exceeds the {num_channels} channels of {site.name!r}"
            )
        top = selected.mean(dim=1).topk(query.top_k, dim=-1)
        return SiteOutput(
            site,
            indices,
            [],
            [
                _to_output("values", top.values, query.output_dtype),
                _to_output("channel_indices", top.indices, TensorDType.INT64),
            ],
        )
    return SiteOutput(site, indices, [], [_to_output("values", values, query.output_dtype)])


def _predictions(adapter: ModelAdapter, logits: torch.Tensor, k: int) -> list[list[Prediction]]:
    probabilities = logits.float().softmax(dim=-1)
    top = probabilities.topk(k, dim=-1)
    names = adapter.class_names
    result = []
    for row in range(logits.shape[0]):
        result.append(
            [
                Prediction(int(c), names[int(c)], float(p), float(logits[row, int(c)]))
                for p, c in zip(top.values[row].tolist(), top.indices[row].tolist(), strict=True)
            ]
        )
    return result


@dataclass(frozen=True)
class PreparedActivations:
    """A validated request with its images decoded and preprocessed (on the CPU)."""

    loaded: LoadedModel
    query: ActivationQuery
    sites: list[SiteDef]
    pixels: torch.Tensor


def prepare_activations(
    loaded: LoadedModel, images: list[ImageInput], query: ActivationQuery, limits: ActivationLimits
) -> PreparedActivations:
    """Everything that needs no compute slot: validation, decoding, preprocessing."""
    adapter = loaded.adapter
    effective = _effective(query, adapter)
    sites = [resolve_site(adapter, name, f"sites[{i}]") for i, name in enumerate(effective.sites)]
    names = [site.name for site in sites]
    if len(set(names)) != len(names):
        raise InvalidArgument("sites", f"each site may appear once; {effective.sites} name {names}")
    pixels = prepare_batch(adapter, images, limits.max_batch, limits.max_pixels)
    return PreparedActivations(loaded, replace(effective, sites=tuple(names)), sites, pixels)


def batch_key(prepared: PreparedActivations) -> Hashable:
    """Requests with equal keys share one forward and get exactly what they would alone.

    Kept apart: other compute dtypes, and other attention blocks made explicit (that swaps
    the kernel for every image in the forward). A raw module outside the blocks (a
    classifier head) reads rows whose kernel can depend on the batch size, so such a
    request runs alone, as does one that reads the output of a model whose head cannot
    run on its own rows (an open_clip tower's output projection)."""
    adapter = prepared.loaded.adapter
    if any(_outside_blocks(adapter, site) for site in prepared.sites):
        return object()
    query = prepared.query
    if (query.top_predictions or query.logits) and not adapter.head_apart:
        return object()
    attention = frozenset(s.attention_path for s in prepared.sites if s.attention_path is not None)
    return (prepared.query.compute_dtype, attention)


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
    items: Sequence[PreparedActivations], cancel: CancelToken, limits: ActivationLimits
) -> list[ActivationResult | BaseException]:
    """One forward over every request's images with the union of their sites captured, then
    each request's token selection and reductions on its own rows (on the device).

    All items share a batch_key. The result or error of each is returned in order; an error
    in the forward itself is raised (it concerns them all)."""
    loaded = items[0].loaded
    adapter = loaded.adapter
    sites = list({site.name: site for item in items for site in item.sites}.values())
    pixels = torch.cat([item.pixels for item in items]) if len(items) > 1 else items[0].pixels
    batch = pixels.to(loaded.device)
    cancel.raise_if_cancelled()
    with torch.inference_mode(), _autocast(loaded.device, items[0].query.compute_dtype):
        with capture_sites(adapter, sites, batch.shape[0], cancel, _stop_after(items)) as captured:
            try:
                features: torch.Tensor | None = adapter.forward_features(batch)
            except ForwardStopped:
                features = None
        return per_item(
            items,
            [int(item.pixels.shape[0]) for item in items],
            lambda item, rows: _split(item, captured, features, rows, limits),
        )


def _split(
    item: PreparedActivations,
    captured: dict[str, torch.Tensor],
    features: torch.Tensor | None,
    rows: slice,
    limits: ActivationLimits,
) -> ActivationResult:
    """One request's result from its rows of the shared forward."""
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
        outputs.append(_reduce(effective, as_site_layout(site, tuple(tensor.shape)), tensor))
        result_bytes += sum(t.array.nbytes for t in outputs[-1].tensors)
        if result_bytes > limits.max_result_bytes:
            raise ResourceExhausted(
                f"sites: the result exceeds {limits.max_result_bytes} bytes; "
                "ask for fewer sites, tokens or images, a reduction, or float16",
                reason=Reason.RESULT_TOO_LARGE,
            )
    logits = None
    if features is not None and (effective.top_predictions or effective.logits):
        logits = adapter.forward_head_on(features, rows)
    predictions = (
        _predictions(adapter, logits, effective.top_predictions)
        if logits is not None and effective.top_predictions
        else []
    )
    logits_array = logits.float().cpu().numpy() if logits is not None and effective.logits else None
    return ActivationResult(
        provenance_of(item.loaded),
        effective,
        rows.stop - rows.start,
        outputs,
        predictions,
        logits_array,
    )


def get_activations(
    prepared: PreparedActivations, cancel: CancelToken, limits: ActivationLimits
) -> ActivationResult:
    """One request alone: a batch of one."""
    (outcome,) = run_activations([prepared], cancel, limits)
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome
