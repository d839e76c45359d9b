"""ProjectToClassSpace: token representations read through the model's own final norm(s)
and classifier, block by block (Vilas, Schaumlöffel, Roig 2023).

Each representation is projected one block and one slice of the batch at a time (a bounded
score tensor whatever the number of blocks, images and classes) and reduced at once: ranks
come from comparing with the target's score (no sort), top-k from torch.topk. Everything
stays on the model's device until the small results are copied back.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from enum import Enum

import numpy as np
import torch

from vitscope_server.core.model.adapters import ModelAdapter, SiteDef
from vitscope_server.core.model.adapters.capabilities import ClassifierHead
from vitscope_server.core.model.capture import capture_sites
from vitscope_server.core.model.class_importance import (
    ImportanceEvaluation,
    ImportanceMaps,
    check_importance_maps,
    effective_keep_counts,
    evaluate_importance,
    importance_gradients,
    importance_maps,
    projectable_blocks,
)
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
from vitscope_server.core.model.tokens import TokenMode, resolve_token_indices, select_tokens
from vitscope_server.core.runtime.batching import per_item
from vitscope_server.core.runtime.cancel import CancelToken
from vitscope_server.core.runtime.errors import (
    InvalidArgument,
    Reason,
    ResourceExhausted,
    require_in_range,
    require_unique,
)
from vitscope_server.core.runtime.transfer import to_host


class Representation(Enum):
    """What is projected: the residual stream after a block, or one sublayer's output."""

    RESIDUAL = "residual"
    ATTENTION = "attention"
    MLP = "mlp"

    @property
    def part(self) -> str:
        """The canonical block site it is read from (blocks.{i}.{part})."""
        return {"residual": "out", "attention": "attn.out", "mlp": "mlp.out"}[self.value]


DEFAULT_TOP_K = 5
# The most class scores held at once (float32 bytes); the batch is sliced to stay under it.
SCORE_BYTES = 64 << 20

ClassRef = int | str | None


@dataclass(frozen=True)
class ProjectionQuery:
    targets: tuple[ClassRef, ...] = ()
    representations: tuple[Representation, ...] = ()
    blocks: tuple[int, ...] = ()
    token_mode: TokenMode = TokenMode.UNSPECIFIED
    token_indices: tuple[int, ...] = ()
    positions: tuple[tuple[int, int], ...] = ()
    top_k: int = 0
    importance_maps: bool = False
    labels: LabelSet | None = None
    evaluate_importance: bool = False
    keep_counts: tuple[int, ...] = ()
    evaluation_seed: int = 0


@dataclass(frozen=True)
class ProjectionLimits:
    max_batch: int
    max_pixels: int
    max_result_bytes: int  # one request's results and captured activations
    max_message_bytes: int  # one streamed message: one image's results


@dataclass(frozen=True)
class TokenProjection:
    """One representation of one image over the requested blocks and tokens."""

    representation: Representation
    top_classes: np.ndarray  # int64 [blocks, tokens, k]
    top_scores: np.ndarray  # float32 [blocks, tokens, k]
    target_ranks: np.ndarray  # int64 [blocks, tokens]
    identifiability: np.ndarray  # float32 [blocks, tokens]


@dataclass(frozen=True)
class BlockSummary:
    block: int
    identifiable_patch_percent: float
    cls_rank: int
    block_change_rate: float
    attention_change_rate: float
    mlp_change_rate: float
    composition_input: float
    composition_attention: float
    composition_mlp: float
    composition_none: float


@dataclass(frozen=True)
class ImageProjection:
    image_index: int
    target_index: int
    target_name: str
    target_is_prediction: bool
    predicted_index: int
    predicted_score: float
    predicted_probability: float
    tokens: list[TokenProjection]
    blocks: list[BlockSummary]
    importance: ImportanceMaps | None


@dataclass(frozen=True)
class DatasetBlockSummary:
    block: int
    mean_identifiable_patch_percent: float
    mean_identifiability: float
    images_with_identifiable_percent: float


@dataclass(frozen=True)
class DatasetSummary:
    blocks: list[DatasetBlockSummary]
    importance_evaluation: ImportanceEvaluation | None


@dataclass(frozen=True)
class ProjectionHeader:
    provenance: Provenance
    query: ProjectionQuery
    token_indices: list[int]
    class_space: ClassSpace
    batch_size: int
    num_prefix_tokens: int
    grid: tuple[int, int]


@dataclass(frozen=True)
class PreparedProjection:
    loaded: LoadedModel
    query: ProjectionQuery
    token_indices: list[int]
    pixels: torch.Tensor


METHOD = "ProjectToClassSpace"


def _check_blocks(adapter: ModelAdapter, blocks: tuple[int, ...], field: str) -> tuple[int, ...]:
    allowed = projectable_blocks(adapter)
    if not blocks:
        return tuple(allowed)
    require_in_range(field, blocks, 0, len(adapter.blocks) - 1)
    require_unique(field, blocks)
    early = [b for b in blocks if b not in allowed]
    if early:
        raise InvalidArgument(
            field,
            f"block {early[0]} holds another token sequence than the classifier reads (the "
            f"class token enters, or the last stage begins, at block {allowed.start}); "
            f"allowed {allowed.start}..{allowed.stop - 1}",
        )
    return tuple(sorted(blocks))


def check_targets(targets: tuple[ClassRef, ...], batch: int, field: str = "targets") -> None:
    if targets and len(targets) != batch:
        raise InvalidArgument(
            field, f"give none or one per image; got {len(targets)} for {batch} images"
        )


def default_top_k(top_k: int, limit: int, what: str) -> int:
    """An explicit top_k must fit `limit`; an unset one is the default, or `limit` if smaller."""
    if top_k < 0:
        raise InvalidArgument("top_k", f"must be >= 1, got {top_k}")
    if top_k > limit:
        raise InvalidArgument("top_k", f"{top_k} exceeds the {what}; allowed 1..{limit}")
    return top_k or min(DEFAULT_TOP_K, limit)


def returned_bytes(rows: int, top_k: int) -> int:
    """Bytes of `rows` returned top-k rows: an int64 index and a float32 score per entry."""
    return rows * top_k * 12


def _check_sizes(
    adapter: ModelAdapter,
    query: ProjectionQuery,
    tokens: int,
    batch: int,
    limits: ProjectionLimits,
) -> None:
    """Refuse, before any decode, what would not fit a message or the server's memory (every
    image reaches the model at its input size)."""
    _, height, width = adapter.data_config.input_size
    blocks = len(query.blocks)
    rows = len(query.representations) * blocks * tokens
    # Per row the top-k, the target's rank (int64) and its identifiability (float32).
    per_image = returned_bytes(rows, query.top_k) + rows * 12
    if query.importance_maps:
        per_image += height * width * (4 + 3)  # the float32 upsampled map and its RGB overlay
    if per_image > limits.max_message_bytes:
        raise ResourceExhausted(
            f"one image's projection would take about {per_image} bytes, over the "
            f"{limits.max_message_bytes}-byte message limit; ask for fewer blocks, tokens, "
            "representations or a smaller top_k",
            reason=Reason.RESULT_TOO_LARGE,
        )
    layout = adapter.blocks[-1]
    all_tokens = layout.num_prefix_tokens + layout.grid[0] * layout.grid[1]
    embedding = {-1} if query.evaluate_importance else set()
    residual = len(set(query.blocks) | {b - 1 for b in query.blocks} | embedding)
    captured = (residual + 2 * blocks) * batch * all_tokens * layout.width * 4
    needed = captured + batch * per_image
    if needed > limits.max_result_bytes:
        raise ResourceExhausted(
            f"projecting {batch} images over {blocks} blocks needs about {needed} bytes of "
            f"captured activations and results, over the server's {limits.max_result_bytes}-byte "
            "limit; ask for fewer images or blocks",
            reason=Reason.RESULT_TOO_LARGE,
        )


def check_projection(
    loaded: LoadedModel, query: ProjectionQuery, images: int, limits: ProjectionLimits
) -> tuple[ProjectionQuery, list[int]]:
    """The query after defaults and its token indices, with every check that needs no image
    but their number: the fields against the model, the targets, and whether the results
    would fit a message and the server's result limit."""
    adapter = loaded.adapter
    classes = class_count(loaded, query.labels, METHOD)
    if len(set(query.representations)) != len(query.representations):
        raise InvalidArgument("representations", "each may appear once")
    blocks = _check_blocks(adapter, query.blocks, "blocks")
    top_k = default_top_k(query.top_k, classes, f"{classes} classes")
    if query.importance_maps:
        check_importance_maps(adapter, blocks)
    keep_counts = effective_keep_counts(
        adapter,
        query.evaluate_importance,
        query.importance_maps,
        query.keep_counts,
        loaded.spec.name,
    )
    mode = TokenMode.ALL if query.token_mode is TokenMode.UNSPECIFIED else query.token_mode
    effective = replace(
        query,
        representations=query.representations or tuple(Representation),
        blocks=blocks,
        token_mode=mode,
        top_k=top_k,
        keep_counts=keep_counts,
    )
    site = adapter.block_site(blocks[-1], "out")
    tokens = site.num_prefix_tokens + site.grid[0] * site.grid[1]
    indices = resolve_token_indices(effective, site, tokens)
    if images:
        check_targets(query.targets, images)
        _check_sizes(adapter, effective, len(indices), images, limits)
    return effective, indices


def prepare_projection(
    loaded: LoadedModel,
    images: list[ImageInput],
    checked: tuple[ProjectionQuery, list[int]],
    limits: ProjectionLimits,
) -> PreparedProjection:
    """Decoding and preprocessing of a query check_projection passed (`checked` is what it
    returned): the rest of what needs no slot."""
    effective, indices = checked
    pixels = prepare_batch(loaded.adapter, images, limits.max_batch, limits.max_pixels)
    return PreparedProjection(loaded, effective, indices, pixels)


@dataclass(frozen=True)
class _Forward:
    """Captured representations and the model's own scores for one request's images."""

    residual: dict[int, torch.Tensor]  # block -> [B, T, D]; -1 is the embedding
    attention: dict[int, torch.Tensor]
    mlp: dict[int, torch.Tensor]
    probs: dict[int, torch.Tensor]
    final_scores: torch.Tensor  # [B, C]


def _residual_blocks(query: ProjectionQuery) -> list[int]:
    """The residual stream read: after each block, at its input, and the embedding when the
    importance evaluation needs it."""
    embedding = {-1} if query.evaluate_importance else set()
    return sorted(set(query.blocks) | {b - 1 for b in query.blocks} | embedding)


def _residual_site(adapter: ModelAdapter, block: int) -> SiteDef:
    """The residual stream after `block` (-1: the embedding) as the next block receives it
    (a late class token included), or the last block's output."""
    if block + 1 < len(adapter.blocks):
        return adapter.block_input_site(block + 1)
    return adapter.block_site(block, "out")


@dataclass(frozen=True)
class _SharedForward:
    """One forward over every batched request's images, with the union of their sites."""

    captured: dict[str, torch.Tensor]
    features: torch.Tensor  # before the head: each request's own rows go through it

    def of(
        self, adapter: ModelAdapter, space: ClassSpace, query: ProjectionQuery, rows: slice
    ) -> _Forward:
        """One request's part, as its own forward would have produced it."""
        captured = self.captured
        return _Forward(
            {b: captured[_residual_site(adapter, b).name][rows] for b in _residual_blocks(query)},
            {b: captured[f"blocks.{b}.attn.out"][rows] for b in query.blocks},
            {b: captured[f"blocks.{b}.mlp.out"][rows] for b in query.blocks},
            (
                {b: captured[f"blocks.{b}.attn.probs"][rows] for b in query.blocks}
                if query.importance_maps
                else {}
            ),
            space.output_scores(adapter.forward_head_on(self.features, rows)),
        )


def _shared_forward(
    adapter: ModelAdapter, queries: list[ProjectionQuery], pixels: torch.Tensor, cancel: CancelToken
) -> _SharedForward:
    residual_blocks = sorted({b for q in queries for b in _residual_blocks(q)})
    blocks = sorted({b for q in queries for b in q.blocks})
    with_probs = any(q.importance_maps for q in queries)
    sites: list[SiteDef] = [_residual_site(adapter, b) for b in residual_blocks]
    for b in blocks:
        sites += [adapter.block_site(b, "attn.out"), adapter.block_site(b, "mlp.out")]
        if with_probs:
            sites.append(adapter.block_site(b, "attn.probs"))
    with capture_sites(adapter, sites, pixels.shape[0], cancel) as captured:
        features = adapter.forward_features(pixels)
    return _SharedForward(captured, features)


@dataclass(frozen=True)
class _Ranked:
    target_scores: torch.Tensor  # [blocks, B, T]
    ranks: torch.Tensor  # int32 [blocks, B, T]
    top_scores: torch.Tensor  # [blocks, B, T, k]
    top_classes: torch.Tensor  # [blocks, B, T, k]

    @property
    def top1(self) -> torch.Tensor:
        return self.top_classes[..., 0]


def _rank(scores: torch.Tensor, targets: torch.Tensor, top_k: int) -> _Ranked:
    """Scores [B, T, C] -> 0-based rank of each image's target (how many classes score
    strictly higher) and the top-k, each [B, T, ...]; one pass each over the scores."""
    index = targets.view(-1, 1, 1).expand(*scores.shape[:2], 1)
    target_scores = scores.gather(-1, index)
    ranks = (scores > target_scores).sum(dim=-1, dtype=torch.int32)
    top = scores.topk(top_k, dim=-1)
    return _Ranked(target_scores.squeeze(-1), ranks, top.values, top.indices)


def _joined(parts: list[_Ranked], join: Callable[[list[torch.Tensor]], torch.Tensor]) -> _Ranked:
    """Slices of the batch (torch.cat) or blocks (torch.stack) as one result."""
    return _Ranked(
        join([p.target_scores for p in parts]),
        join([p.ranks for p in parts]),
        join([p.top_scores for p in parts]),
        join([p.top_classes for p in parts]),
    )


def _projected(
    head: ClassifierHead,
    space: ClassSpace,
    tensors: dict[int, torch.Tensor],
    part: str,
    blocks: list[int],
    targets: torch.Tensor,
    top_k: int,
    cancel: CancelToken,
) -> _Ranked:
    """Norms, class scores, ranks and top-k per block and slice of the batch: at most
    SCORE_BYTES of scores exist at once."""
    batch, tokens = tensors[blocks[0]].shape[:2]
    rows = max(1, SCORE_BYTES // (tokens * space.num_classes * 4))
    per_block = []
    for b in blocks:
        cancel.raise_if_cancelled()
        slices = []
        for start in range(0, batch, rows):
            normed = head.normed(tensors[b][start : start + rows], max(b, 0), part)
            slices.append(_rank(space.scores(normed), targets[start : start + rows], top_k))
        per_block.append(_joined(slices, torch.cat))
    return _joined(per_block, torch.stack)


def _summaries(
    blocks: tuple[int, ...],
    residual: _Ranked,
    residual_order: list[int],
    attention: _Ranked,
    mlp: _Ranked,
    prefix: int,
) -> torch.Tensor:
    """[B, blocks, 9] per-block numbers over patch tokens, in the order of BlockSummary's fields after block."""
    position = {b: i for i, b in enumerate(residual_order)}
    rows = []
    for j, b in enumerate(blocks):
        out, before = position[b], position[b - 1]
        patches = slice(prefix, None)
        ranks = residual.ranks[out, :, patches]
        scores_out = residual.target_scores[out, :, patches]
        scores_in = residual.target_scores[before, :, patches]
        top1 = residual.top1[out, :, patches]
        from_input = top1 == residual.top1[before, :, patches]
        from_attention = top1 == attention.top1[j, :, patches]
        from_mlp = top1 == mlp.top1[j, :, patches]
        cls_rank = (
            residual.ranks[out, :, 0].float() if prefix else torch.full_like(scores_out[:, 0], -1.0)
        )
        rows.append(
            torch.stack(
                [
                    (ranks == 0).float().mean(dim=1) * 100.0,
                    cls_rank,
                    (scores_out > scores_in).float().mean(dim=1),
                    (attention.target_scores[j, :, patches] > scores_in).float().mean(dim=1),
                    (mlp.target_scores[j, :, patches] > scores_in).float().mean(dim=1),
                    from_input.float().mean(dim=1),
                    from_attention.float().mean(dim=1),
                    from_mlp.float().mean(dim=1),
                    (~(from_input | from_attention | from_mlp)).float().mean(dim=1),
                ],
                dim=1,
            )
        )
    return torch.stack(rows, dim=1)


def _block_summary(block: int, values: list[float]) -> BlockSummary:
    percent, cls_rank, *rates = values
    return BlockSummary(block, percent, int(cls_rank), *rates)


Ranked = dict[Representation, _Ranked]


def _targets(predicted: torch.Tensor, given: list[int | None]) -> torch.Tensor:
    """Each image's given target, or its prediction where none is given."""
    targets = predicted.clone()
    for i, target in enumerate(given):
        if target is not None:
            targets[i] = target
    return targets


def _rank_all(
    head: ClassifierHead,
    space: ClassSpace,
    forward: _Forward,
    blocks: tuple[int, ...],
    targets: torch.Tensor,
    top_k: int,
    cancel: CancelToken,
) -> Ranked:
    """Every representation ranked; the residual also at the blocks' inputs (sorted(residual))."""
    captured = {
        Representation.RESIDUAL: (forward.residual, sorted(forward.residual)),
        Representation.ATTENTION: (forward.attention, list(blocks)),
        Representation.MLP: (forward.mlp, list(blocks)),
    }
    return {
        r: _projected(head, space, tensors, r.part, order, targets, top_k, cancel)
        for r, (tensors, order) in captured.items()
    }


def _per_token(
    ranked: Ranked,
    prepared: PreparedProjection,
    residual_order: list[int],
    num_classes: int,
) -> dict[Representation, tuple[torch.Tensor, ...]]:
    """(top classes, top scores, ranks, identifiability) per requested representation, each
    [B, blocks, tokens, ...] on the device, for the requested tokens and blocks only."""
    selected_residual = [residual_order.index(b) for b in prepared.query.blocks]
    per_token = {}
    for name in prepared.query.representations:
        # Views where the selection is contiguous (all tokens, all blocks): no copies.
        r = ranked[name]
        top_classes, top_scores, ranks = (
            select_tokens(t, 2, prepared.token_indices)
            for t in (r.top_classes, r.top_scores, r.ranks)
        )
        if name is Representation.RESIDUAL:
            top_classes, top_scores, ranks = (
                select_tokens(t, 0, selected_residual) for t in (top_classes, top_scores, ranks)
            )
        identifiability = 1.0 - ranks.float() / num_classes
        per_token[name] = tuple(
            t.transpose(0, 1)
            for t in (top_classes, top_scores.float(), ranks.long(), identifiability)
        )
    return per_token


def _importance(
    prepared: PreparedProjection,
    space: ClassSpace,
    forward: _Forward,
    pixels: torch.Tensor,
    targets: torch.Tensor,
    cancel: CancelToken,
) -> tuple[list[ImportanceMaps] | None, ImportanceEvaluation | None]:
    """The class token's importance maps and their token-keeping evaluation, when asked."""
    adapter, query = prepared.loaded.adapter, prepared.query
    if not query.importance_maps:
        return None, None
    gradients = importance_gradients(
        adapter, space, forward.probs, forward.residual, query.blocks, targets, cancel
    )
    importance = importance_maps(adapter, gradients, pixels)
    if not query.evaluate_importance:
        return importance, None
    with torch.inference_mode():
        evaluation = evaluate_importance(
            adapter,
            space,
            forward.residual[-1],
            importance,
            query.keep_counts,
            query.evaluation_seed,
            targets,
            cancel,
        )
    return importance, evaluation


@dataclass(frozen=True)
class _OnDevice:
    """One request's small results, still on the model's device."""

    targets: torch.Tensor  # int64 [B]
    predicted: torch.Tensor  # int64 [B]
    predicted_scores: torch.Tensor  # float32 [B]
    predicted_probabilities: torch.Tensor  # float32 [B]
    per_token: dict[Representation, tuple[torch.Tensor, ...]]
    summaries: torch.Tensor  # float32 [B, blocks, 9]
    dataset: torch.Tensor  # float32 [blocks, 3]

    def tensors(self) -> list[torch.Tensor]:
        fixed = [self.targets, self.predicted, self.predicted_scores]
        fixed += [self.predicted_probabilities, self.summaries, self.dataset]
        return fixed + [t for parts in self.per_token.values() for t in parts]


@dataclass(frozen=True)
class _Projected:
    """Everything one image's ImageProjection is read from, on the host."""

    space: ClassSpace
    given: list[int | None]
    targets: np.ndarray
    predicted: np.ndarray
    predicted_scores: np.ndarray
    predicted_probabilities: np.ndarray
    per_token: dict[Representation, list[np.ndarray]]
    summaries: np.ndarray
    importance: list[ImportanceMaps] | None


def _on_host(
    device: _OnDevice, space: ClassSpace, given: list[int | None]
) -> tuple[_Projected, np.ndarray]:
    """Every small result copied off the device at once (one transfer, no synchronisation per
    block or image); the dataset summary comes back beside them."""
    arrays = iter(to_host([t.contiguous() for t in device.tensors()]))
    targets, predicted, scores, probabilities, summaries, dataset = (next(arrays) for _ in range(6))
    per_token = {name: [next(arrays) for _ in parts] for name, parts in device.per_token.items()}
    projected = _Projected(
        space, given, targets, predicted, scores, probabilities, per_token, summaries, None
    )
    return projected, dataset


def _image(i: int, projected: _Projected, query: ProjectionQuery) -> ImageProjection:
    target, predicted = int(projected.targets[i]), int(projected.predicted[i])
    return ImageProjection(
        image_index=i,
        target_index=target,
        target_name=projected.space.names[target],
        target_is_prediction=not projected.given or projected.given[i] is None,
        predicted_index=predicted,
        predicted_score=float(projected.predicted_scores[i]),
        predicted_probability=float(projected.predicted_probabilities[i]),
        tokens=[
            TokenProjection(name, *(part[i] for part in projected.per_token[name]))
            for name in query.representations
        ],
        blocks=[
            _block_summary(b, projected.summaries[i, j].tolist())
            for j, b in enumerate(query.blocks)
        ],
        importance=projected.importance[i] if projected.importance is not None else None,
    )


def projection_batch_key(prepared: PreparedProjection) -> Hashable:
    """Requests with equal keys share one forward: those over the same blocks, so that the
    forward captures for every image no more than each request's memory estimate counted.
    Importance maps differentiate their captured tensors and expose attention
    probabilities (another kernel), and a model whose head cannot run on each request's
    own rows (an open_clip tower) would change the scores' last bits: they run alone."""
    query = prepared.query
    if query.importance_maps or not prepared.loaded.adapter.head_apart:
        return object()
    return (query.blocks, query.evaluate_importance)


ProjectionResult = tuple[ProjectionHeader, list[ImageProjection], DatasetSummary]


def run_projections(
    items: Sequence[PreparedProjection], cancel: CancelToken
) -> list[ProjectionResult | BaseException]:
    """One forward over every request's images with the union of their sites captured, then
    each request's projections on its own rows (on the device).

    All items share a projection_batch_key. The result or error of each is returned in
    order; an error in the forward itself is raised (it concerns them all)."""
    loaded = items[0].loaded
    pixels = torch.cat([item.pixels for item in items]) if len(items) > 1 else items[0].pixels
    pixels = pixels.to(loaded.device)
    queries = [item.query for item in items]
    cancel.raise_if_cancelled()
    # Importance maps differentiate captured tensors, which inference mode would forbid.
    with _grad_mode(items[0].query):
        shared = _shared_forward(loaded.adapter, queries, pixels, cancel)
    return per_item(
        items,
        [int(item.pixels.shape[0]) for item in items],
        lambda item, rows: _project(item, shared, pixels[rows], rows, cancel),
    )


def _grad_mode(query: ProjectionQuery) -> AbstractContextManager[object]:
    return torch.no_grad() if query.importance_maps else torch.inference_mode()


def _project(
    prepared: PreparedProjection,
    shared: _SharedForward,
    pixels: torch.Tensor,
    rows: slice,
    cancel: CancelToken,
) -> ProjectionResult:
    """Every projection of one request from its rows of the shared forward."""
    loaded, query = prepared.loaded, prepared.query
    adapter = loaded.adapter
    space = class_space_of(loaded, query.labels, cancel, METHOD)
    head = projection_head(loaded, METHOD)
    layout = adapter.blocks[query.blocks[-1]]
    given = [space.resolve(t, f"targets[{i}]") for i, t in enumerate(query.targets)]
    blocks = query.blocks
    with _grad_mode(query):
        forward = shared.of(adapter, space, query, rows)
        predicted = forward.final_scores.argmax(dim=-1)
        targets = _targets(predicted, given)
        ranked = _rank_all(head, space, forward, blocks, targets, query.top_k, cancel)
        residual_order = sorted(forward.residual)
        cancel.raise_if_cancelled()
        residual = ranked[Representation.RESIDUAL]
        on_device = _OnDevice(
            targets,
            predicted,
            *_predicted_rows(forward.final_scores, predicted, space.logit_scale),
            _per_token(ranked, prepared, residual_order, space.num_classes),
            _summaries(
                blocks,
                residual,
                residual_order,
                ranked[Representation.ATTENTION],
                ranked[Representation.MLP],
                layout.num_prefix_tokens,
            ),
            _dataset_numbers(blocks, residual, residual_order, layout.num_prefix_tokens, space),
        )
    importance, evaluation = _importance(prepared, space, forward, pixels, targets, cancel)
    projected, dataset = _on_host(on_device, space, given)
    projected = replace(projected, importance=importance)
    images = [_image(i, projected, query) for i in range(pixels.shape[0])]
    header = ProjectionHeader(
        provenance_of(loaded, query.evaluation_seed),
        query,
        prepared.token_indices,
        space,
        int(pixels.shape[0]),
        layout.num_prefix_tokens,
        layout.grid,
    )
    summary = [DatasetBlockSummary(b, *map(float, dataset[j])) for j, b in enumerate(blocks)]
    return header, images, DatasetSummary(summary, evaluation)


def _predicted_rows(
    final_scores: torch.Tensor, predicted: torch.Tensor, logit_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's score and probability of its predicted class, float32 [B]."""
    scores = final_scores.float()
    probabilities = (scores * logit_scale).softmax(dim=-1)
    rows = predicted[:, None]
    return scores.gather(1, rows)[:, 0], probabilities.gather(1, rows)[:, 0]


def _dataset_numbers(
    blocks: tuple[int, ...],
    residual: _Ranked,
    residual_order: list[int],
    prefix: int,
    space: ClassSpace,
) -> torch.Tensor:
    """[blocks, 3] over the whole batch, in DatasetBlockSummary's order: mean rate, mean r,
    and the percent of images with an identifiable patch."""
    rows = []
    for b in blocks:
        ranks = residual.ranks[residual_order.index(b), :, prefix:]
        identifiable = (ranks == 0).float()
        rows.append(
            torch.stack(
                [
                    identifiable.mean(dim=1).mean() * 100.0,
                    (1.0 - ranks.float() / space.num_classes).mean(),
                    identifiable.amax(dim=1).mean() * 100.0,
                ]
            )
        )
    return torch.stack(rows)
