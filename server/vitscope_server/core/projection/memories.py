"""ProjectMemories: a block's key-value memories read in class space (Vilas et al. 2023).

MLP memories are the columns of fc2.weight, their coefficients fc1's pre-activation
outputs; attention memories are the columns of the output projection, their coefficients
what that projection multiplies (the per-head attention-weighted values, after the
attention's own norm where it has one). Value columns carry the block's layer scale, as
they reach the residual stream. The value-to-class matrix is the classifier's weight times
the values (cosine: unit class rows and unit value columns).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from vitscope_server.core.model.adapters import ModelAdapter
from vitscope_server.core.model.adapters.capabilities import MemoryKind, require
from vitscope_server.core.model.capture import capture_sites
from vitscope_server.core.model.class_space import (
    ClassSpace,
    LabelSet,
    class_count,
    class_space_of,
    projection_head,
)
from vitscope_server.core.model.images import ImageInput, prepare_batch
from vitscope_server.core.model.loading import LoadedModel
from vitscope_server.core.model.provenance import Provenance, provenance_of
from vitscope_server.core.projection.project import (
    ClassRef,
    ProjectionLimits,
    check_targets,
    default_top_k,
    returned_bytes,
)
from vitscope_server.core.runtime.cancel import CancelToken
from vitscope_server.core.runtime.errors import (
    InvalidArgument,
    Reason,
    ResourceExhausted,
)
from vitscope_server.core.runtime.transfer import to_host

MEMORY_KINDS = (MemoryKind.MLP, MemoryKind.ATTENTION)
# The agreement rate compares the 5 strongest keys with the 5 strongest values, as the authors did.
AGREEMENT_TOP = 5


@dataclass(frozen=True)
class MemoryQuery:
    block: int
    kinds: tuple[MemoryKind, ...] = ()
    top_k: int = 0
    cosine: bool = False
    targets: tuple[ClassRef, ...] = ()
    labels: LabelSet | None = None


@dataclass(frozen=True)
class ImageMemories:
    image_index: int
    target_index: int
    top_memories: np.ndarray  # int64 [tokens, k]
    top_coefficients: np.ndarray  # float32 [tokens, k]
    agreement_rate: float


@dataclass(frozen=True)
class MemorySet:
    kind: MemoryKind
    num_memories: int
    top_classes: np.ndarray  # int64 [memories, k]
    top_class_scores: np.ndarray
    top_memories: np.ndarray  # int64 [classes, k]
    top_memory_scores: np.ndarray
    images: list[ImageMemories]


@dataclass(frozen=True)
class MemoryResult:
    provenance: Provenance
    query: MemoryQuery
    class_space: ClassSpace
    batch_size: int
    memories: list[MemorySet]


@dataclass(frozen=True)
class PreparedMemories:
    loaded: LoadedModel
    query: MemoryQuery
    pixels: torch.Tensor | None


METHOD = "ProjectMemories"


def _values(adapter: ModelAdapter, block: int, kind: MemoryKind) -> torch.Tensor:
    return require(adapter.class_head(), METHOD).value_matrix(block, kind)


def _check_sizes(
    adapter: ModelAdapter, query: MemoryQuery, classes: int, batch: int, limits: ProjectionLimits
) -> None:
    """Refuse, before any compute, a response over the message limit or a value-to-class
    matrix over the server's memory limit."""
    layout = adapter.blocks[query.block]
    tokens = layout.num_prefix_tokens + layout.grid[0] * layout.grid[1]
    memories = [int(_values(adapter, query.block, kind).shape[1]) for kind in query.kinds]
    response = sum(returned_bytes(m + classes + batch * tokens, query.top_k) for m in memories)
    if response > limits.max_message_bytes:
        raise ResourceExhausted(
            f"the memories response would take about {response} bytes, over the "
            f"{limits.max_message_bytes}-byte message limit; ask for fewer images, fewer "
            "classes or a smaller top_k",
            reason=Reason.RESULT_TOO_LARGE,
        )
    matrix = classes * max(memories) * 4
    if matrix + response > limits.max_result_bytes:
        raise ResourceExhausted(
            f"the {classes} x {max(memories)} value-to-class matrix needs about {matrix} bytes, "
            f"over the server's {limits.max_result_bytes}-byte limit; ask for fewer classes",
            reason=Reason.RESULT_TOO_LARGE,
        )


def _served_kinds(loaded: LoadedModel, query: MemoryQuery) -> tuple[MemoryKind, ...]:
    """The kinds asked for, or by default those the block serves (a windowed block's
    attention memories are not in token order); one it cannot serve is refused."""
    head = projection_head(loaded, METHOD)
    causes = {kind: head.memory_refusal(query.block, kind) for kind in MEMORY_KINDS}
    served = tuple(kind for kind in MEMORY_KINDS if causes[kind] is None)
    refused = [kind for kind in query.kinds or MEMORY_KINDS if causes[kind] is not None]
    if refused and (query.kinds or not served):
        field = "kinds" if query.kinds else "block"
        raise loaded.adapter.missing(str(causes[refused[0]])).refusal(METHOD, field)
    return query.kinds or served


def prepare_memories(
    loaded: LoadedModel, images: list[ImageInput], query: MemoryQuery, limits: ProjectionLimits
) -> PreparedMemories:
    """Validation, decoding, preprocessing and size checks: everything that needs no slot."""
    adapter = loaded.adapter
    classes = class_count(loaded, query.labels, METHOD)
    count = len(adapter.blocks)
    if not 0 <= query.block < count:
        raise InvalidArgument("block", f"{query.block} does not exist; allowed 0..{count - 1}")
    if len(set(query.kinds)) != len(query.kinds):
        given = [k.value for k in query.kinds]
        allowed = [k.value for k in MEMORY_KINDS]
        raise InvalidArgument("kinds", f"{given} not allowed; each of {allowed} at most once")
    kinds = _served_kinds(loaded, query)
    memories = min(int(_values(adapter, query.block, kind).shape[1]) for kind in kinds)
    top_k = default_top_k(
        query.top_k,
        min(classes, memories),
        f"{classes} classes or the {memories} memories of the block",
    )
    pixels = prepare_batch(adapter, images, limits.max_batch, limits.max_pixels) if images else None
    batch = 0 if pixels is None else pixels.shape[0]
    check_targets(query.targets, batch)
    effective = replace(query, kinds=kinds, top_k=top_k)
    _check_sizes(adapter, effective, classes, batch, limits)
    return PreparedMemories(loaded, effective, pixels)


def _coefficients(
    loaded: LoadedModel,
    space: ClassSpace,
    pixels: torch.Tensor,
    block: int,
    kinds: tuple[MemoryKind, ...],
    cancel: CancelToken,
) -> tuple[dict[MemoryKind, torch.Tensor], torch.Tensor]:
    """Per-token coefficients of each requested kind [B, T, memories], and the model's
    predictions. Only the sites the requested kinds read are captured (an open_clip
    tower's attention coefficients need its probabilities, which unfuse its attention)."""
    adapter, head = loaded.adapter, projection_head(loaded, METHOD)
    sites = {site.name: site for kind in kinds for site in head.coefficient_sites(block, kind)}
    with capture_sites(adapter, list(sites.values()), pixels.shape[0], cancel) as captured:
        output = adapter.forward(pixels)
    scores = output if space.projection is None else F.normalize(output, dim=-1) @ space.weight.T
    coefficients = {kind: head.coefficients(block, kind, captured) for kind in kinds}
    return coefficients, scores.argmax(dim=-1)


def project_memories(prepared: PreparedMemories, cancel: CancelToken) -> MemoryResult:
    loaded, query = prepared.loaded, prepared.query
    adapter = loaded.adapter
    space = class_space_of(loaded, query.labels, cancel, METHOD)
    given = [space.resolve(t, f"targets[{i}]") for i, t in enumerate(query.targets)]
    cancel.raise_if_cancelled()
    with torch.no_grad():
        classes = space.token_weight()
        coefficients: dict[MemoryKind, torch.Tensor] = {}
        targets = torch.zeros(0, dtype=torch.long)
        if prepared.pixels is not None:
            coefficients, targets = _coefficients(
                loaded,
                space,
                prepared.pixels.to(loaded.device),
                query.block,
                query.kinds,
                cancel,
            )
            for i, target in enumerate(given):
                if target is not None:
                    targets[i] = target
        on_device = [
            _kind_tensors(adapter, classes, coefficients.get(kind), targets, query, kind)
            for kind in query.kinds
        ]
        flat = [t.contiguous() for _, tensors in on_device for t in tensors]
        host = to_host([*flat, targets.to(classes.device).contiguous()])
    host_targets, arrays = host[-1], iter(host[:-1])
    sets = [
        _memory_set(kind, count, len(tensors) > 4, arrays, host_targets)
        for kind, (count, tensors) in zip(query.kinds, on_device, strict=True)
    ]
    batch = 0 if prepared.pixels is None else int(prepared.pixels.shape[0])
    return MemoryResult(provenance_of(loaded), query, space, batch, sets)


def _kind_tensors(
    adapter: ModelAdapter,
    classes: torch.Tensor,
    coefficients: torch.Tensor | None,
    targets: torch.Tensor,
    query: MemoryQuery,
    kind: MemoryKind,
) -> tuple[int, list[torch.Tensor]]:
    """One kind's number of memories and its results on the device: top classes per memory
    and top memories per class (indices, scores), then, with images, each token's top
    memories (indices, coefficients) and each image's agreement rate."""
    values = _values(adapter, query.block, kind)
    if query.cosine:
        matrix = F.normalize(classes, dim=1) @ F.normalize(values, dim=0)
    else:
        matrix = classes @ values
    per_memory = matrix.T.topk(query.top_k, dim=1)
    per_class = matrix.topk(query.top_k, dim=1)
    tensors = [
        per_memory.indices,
        per_memory.values.float(),
        per_class.indices,
        per_class.values.float(),
    ]
    if coefficients is None:
        return int(values.shape[1]), tensors
    top = coefficients.topk(query.top_k, dim=-1)
    strongest = coefficients.topk(AGREEMENT_TOP, dim=-1).indices  # [B, T, 5]
    class_values = matrix.index_select(0, targets).topk(AGREEMENT_TOP, dim=1).indices  # [B, 5]
    agrees = (strongest[..., :, None] == class_values[:, None, None, :]).any(-1).any(-1)
    return int(values.shape[1]), [*tensors, top.indices, top.values.float(), agrees.float().mean(1)]


def _memory_set(
    kind: MemoryKind,
    count: int,
    with_images: bool,
    arrays: Iterator[np.ndarray],
    targets: np.ndarray,
) -> MemorySet:
    """One kind's set read from the request's single copy (in _kind_tensors' order)."""
    memory_indices, memory_values, class_indices, class_values = (next(arrays) for _ in range(4))
    images = []
    if with_images:
        indices, values, rates = next(arrays), next(arrays), next(arrays)
        images = [
            ImageMemories(i, int(targets[i]), indices[i], values[i], float(rates[i]))
            for i in range(indices.shape[0])
        ]
    return MemorySet(
        kind, count, memory_indices, memory_values, class_indices, class_values, images
    )
