"""Which image parts matter for a class (Vilas et al. 2023), and how well that ranking holds.

Maps: per block, the class token's attention output is projected to class space, the
cross-entropy against the class taken once, and minus its gradient with respect to that
block's attention probabilities (class-token row, prefix columns dropped) kept per head.
Evaluation: the model run on the prefix tokens plus the top-n patches of a map, against the
same n in a seeded random order; normalized AUC = sum(acc) / (max(acc) x N).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from vitscope_server.core.model.adapters import ModelAdapter
from vitscope_server.core.model.adapters.capabilities import require
from vitscope_server.core.model.class_space import ClassSpace
from vitscope_server.core.model.pixels import denormalize, to_uint8
from vitscope_server.core.runtime.cancel import CancelToken
from vitscope_server.core.runtime.errors import (
    FailedPrecondition,
    InvalidArgument,
    require_in_range,
    require_unique,
)

# Each keep count is one forward of the batch per token order: bound that work.
MAX_KEEP_COUNTS = 64


@dataclass(frozen=True)
class ImportanceMaps:
    per_head: np.ndarray  # [blocks, heads, grid_h, grid_w]
    summed: np.ndarray  # [grid_h, grid_w], min-max normalized
    upsampled: np.ndarray  # [height, width]
    image: np.ndarray  # uint8 [height, width, 3]: the input the maps are drawn over


@dataclass(frozen=True)
class KeepCurve:
    """Accuracy of the model run on the prefix tokens plus n patch tokens, per keep count."""

    accuracy: list[float]
    normalized_auc: float


@dataclass(frozen=True)
class ImportanceEvaluation:
    keep_counts: tuple[int, ...]
    importance_order: KeepCurve
    random_order: KeepCurve


def default_keep_counts(patches: int) -> tuple[int, ...]:
    """0, 1, 2, 4, ... below the number of patches, then all of them."""
    counts = [0]
    n = 1
    while n < patches:
        counts.append(n)
        n *= 2
    return (*counts, patches)


def effective_keep_counts(
    adapter: ModelAdapter,
    evaluate: bool,
    importance_maps: bool,
    keep_counts: tuple[int, ...],
    name: str,
) -> tuple[int, ...]:
    """The effective keep counts (ascending), or () when evaluation is off."""
    if not evaluate:
        if keep_counts:
            raise InvalidArgument("keep_counts", "given without evaluate_importance")
        return ()
    if not importance_maps:
        raise InvalidArgument(
            "evaluate_importance", "needs importance_maps, whose summed map orders the tokens"
        )
    head = require(adapter.class_head(), "evaluate_importance", "evaluate_importance")
    if not head.runs_on_token_subsets():
        raise FailedPrecondition(
            f"evaluate_importance does not apply to model {name}: it does not read its "
            "prediction at the class token, so it cannot be run on a subset of patch tokens",
            subject=name,
            field="evaluate_importance",
        )
    patches = adapter.grid[0] * adapter.grid[1]
    if not keep_counts:
        return default_keep_counts(patches)
    if len(keep_counts) > MAX_KEEP_COUNTS:
        raise InvalidArgument(
            "keep_counts", f"{len(keep_counts)} given; allowed at most {MAX_KEEP_COUNTS}"
        )
    require_in_range("keep_counts", keep_counts, 0, patches)
    require_unique("keep_counts", keep_counts)
    return tuple(sorted(keep_counts))


def projectable_blocks(adapter: ModelAdapter) -> range:
    """The blocks that hold the token sequence the classifier reads."""
    return adapter.tail_blocks()


def check_importance_maps(adapter: ModelAdapter, blocks: tuple[int, ...]) -> None:
    """Importance maps differentiate the class token's projected attention output with
    respect to each block's probabilities: refuse, naming the cause, a model without them."""
    method, field = "importance_maps", "importance_maps"
    if adapter.blocks[blocks[-1]].num_prefix_tokens == 0:
        raise adapter.missing("it has no class token, whose attention the maps read").refusal(
            method, field
        )
    require(adapter.attention_math(), method, field)
    for block in blocks:
        reason = adapter.unavailable_reason(block, "attn.probs")
        if reason is not None or adapter.blocks[block].windowed:
            cause = f"block {block} serves no attention probabilities over its tokens ({reason})"
            raise adapter.missing(cause).refusal(method, field)


def importance_gradients(
    adapter: ModelAdapter,
    space: ClassSpace,
    probs: dict[int, torch.Tensor],
    residual: dict[int, torch.Tensor],
    blocks: tuple[int, ...],
    targets: torch.Tensor,
    cancel: CancelToken,
) -> torch.Tensor:
    """[B, blocks, heads, patches]: minus d CE(class token's projected attention output) / d probs,
    class-token query row, prefix columns dropped; one backward per block."""
    prefix = adapter.blocks[blocks[-1]].num_prefix_tokens
    head = require(adapter.class_head(), "importance_maps")
    math = require(adapter.attention_math(), "importance_maps")
    maps = []
    with torch.enable_grad():
        for b in blocks:
            cancel.raise_if_cancelled()
            # Only the class token's query row: the output is read at the class token alone.
            cls_row = probs[b][:, :, :1].detach().clone().requires_grad_(True)
            values = math.values(b, residual[b - 1]).detach()
            output = math.output(b, cls_row, values)
            scores = space.scores(head.normed(output, b, "attn.out"))[:, 0]
            loss = F.cross_entropy(scores * space.logit_scale, targets, reduction="sum")
            (gradient,) = torch.autograd.grad(loss, cls_row)
            maps.append(-gradient[:, :, 0, prefix:])
    return torch.stack(maps, dim=1)


def importance_maps(
    adapter: ModelAdapter, raw: torch.Tensor, pixels: torch.Tensor
) -> list[ImportanceMaps]:
    height, width = adapter.blocks[-1].grid
    batch, blocks, heads, _ = raw.shape
    per_head = raw.reshape(batch, blocks, heads, height, width)
    summed = per_head.sum(dim=(1, 2))
    low = summed.amin(dim=(1, 2), keepdim=True)
    high = summed.amax(dim=(1, 2), keepdim=True)
    normalized = torch.where(high > low, (summed - low) / (high - low), torch.zeros_like(summed))
    upsampled = F.interpolate(
        normalized[:, None], size=tuple(pixels.shape[-2:]), mode="bilinear", align_corners=False
    )[:, 0]
    images = to_uint8(denormalize(pixels.float(), adapter.data_config))
    return [
        ImportanceMaps(
            per_head[i].float().cpu().numpy(),
            normalized[i].float().cpu().numpy(),
            upsampled[i].float().cpu().numpy(),
            images[i],
        )
        for i in range(batch)
    ]


def _keep_curve(
    adapter: ModelAdapter,
    space: ClassSpace,
    embedded: torch.Tensor,
    order: torch.Tensor,
    keep_counts: tuple[int, ...],
    targets: torch.Tensor,
    cancel: CancelToken,
) -> KeepCurve:
    """The model run on the prefix tokens plus the first n patches of `order` [B, patches]
    (kept in sequence order; position embeddings are already in the tokens)."""
    batch, _, width = embedded.shape
    prefix = adapter.blocks[-1].num_prefix_tokens
    head = require(adapter.class_head(), "evaluate_importance")
    prefix_index = torch.arange(prefix, device=embedded.device).expand(batch, prefix)
    accuracy = []
    for n in keep_counts:
        cancel.raise_if_cancelled()
        kept = order[:, :n].sort(dim=1).values + prefix
        index = torch.cat([prefix_index, kept], dim=1)
        subset = embedded.gather(1, index[..., None].expand(-1, -1, width))
        scores = space.output_scores(head.forward_from_embedded(subset))
        accuracy.append(float((scores.argmax(dim=-1) == targets).float().mean()))
    best = max(accuracy)
    auc = sum(accuracy) / (best * len(accuracy)) if best > 0 else 0.0
    return KeepCurve(accuracy, auc)


def evaluate_importance(
    adapter: ModelAdapter,
    space: ClassSpace,
    embedded: torch.Tensor,
    maps: list[ImportanceMaps],
    keep_counts: tuple[int, ...],
    seed: int,
    targets: torch.Tensor,
    cancel: CancelToken,
) -> ImportanceEvaluation:
    """Accuracy as patch tokens are kept in descending order of the returned summed map (ties
    by position), and in a random order: one torch.randperm per image from a generator seeded
    with `seed`."""
    summed = torch.from_numpy(np.stack([m.summed.reshape(-1) for m in maps]))
    by_importance = summed.argsort(dim=1, descending=True, stable=True)
    generator = torch.Generator().manual_seed(seed)
    patches = summed.shape[1]
    at_random = torch.stack([torch.randperm(patches, generator=generator) for _ in maps])
    curves = [
        _keep_curve(
            adapter,
            space,
            embedded,
            order.to(embedded.device),
            keep_counts,
            targets,
            cancel,
        )
        for order in (by_importance, at_random)
    ]
    return ImportanceEvaluation(keep_counts, *curves)
