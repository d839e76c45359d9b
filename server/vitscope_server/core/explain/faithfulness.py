"""Deletion and insertion curves (Petsiuk, Das, Saenko 2018), in batches on the server.

Deletion replaces patches, in decreasing map order, by a black reference; insertion adds
them, in the same order, to a blurred copy of the image. After each step the target's
probability is recorded; the curve's area is taken with trapezoids on a [0, 1] axis.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vitscope_server.core.model.adapters import ModelAdapter
from vitscope_server.core.runtime.cancel import CancelToken

# Steps per curve when the caller does not say: the fewest patches per step giving at most this.
DEFAULT_CURVE_STEPS = 50


@dataclass(frozen=True)
class Curve:
    probabilities: list[float]
    auc: float


@dataclass(frozen=True)
class CurvePair:
    deletion: Curve
    insertion: Curve


def default_patches_per_step(patches: int) -> int:
    return max(1, math.ceil(patches / DEFAULT_CURVE_STEPS))


def patch_counts(patches: int, per_step: int) -> list[int]:
    """Patches removed or added before each point: 0, per_step, 2 per_step, ..., all."""
    return [min(k * per_step, patches) for k in range(math.ceil(patches / per_step) + 1)]


def area(values: list[float]) -> float:
    """Trapezoids over equally spaced points on [0, 1]."""
    if len(values) == 1:
        return values[0]
    return (sum(values) - (values[0] + values[-1]) / 2) / (len(values) - 1)


def map_order(maps: torch.Tensor) -> torch.Tensor:
    """[B, H, W] -> [B, patches]: patch indices by decreasing value, ties by position."""
    return maps.flatten(1).argsort(dim=1, descending=True, stable=True)


def random_order(batch: int, patches: int, seed: int) -> torch.Tensor:
    """One torch.randperm per image, in image order, from one generator seeded with `seed`."""
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(patches, generator=generator) for _ in range(batch)])


@dataclass(frozen=True)
class CurveInputs:
    """What every curve of a request shares."""

    pixels: torch.Tensor  # [B, 3, H, W] model input
    deleted: torch.Tensor  # what a deleted patch shows (black)
    start: torch.Tensor  # what insertion starts from (blurred)
    targets: torch.Tensor  # [B]
    counts: list[int]


def _masked(
    inputs: CurveInputs, ranks: torch.Tensor, items: torch.Tensor, grid: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The images of `items` (flat indices over orders x 2 kinds x images x counts), and
    which image each came from."""
    batch, points = inputs.pixels.shape[0], len(inputs.counts)
    step = items % points
    image = (items // points) % batch
    insertion = (items // (points * batch)) % 2 == 1
    order = items // (points * batch * 2)
    counts = torch.tensor(inputs.counts, device=items.device)[step]
    chosen = ranks[order, image] < counts[:, None]  # [n, patches]: patches taken so far
    mask = F.interpolate(
        chosen.view(-1, 1, *grid).float(), size=inputs.pixels.shape[-2:], mode="nearest"
    ).bool()
    image_pixels = inputs.pixels[image]
    deleted = torch.where(mask, inputs.deleted[image], image_pixels)
    inserted = torch.where(mask, image_pixels, inputs.start[image])
    return torch.where(insertion.view(-1, 1, 1, 1), inserted, deleted), image


def curves(
    adapter: ModelAdapter,
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    inputs: CurveInputs,
    orders: torch.Tensor,
    batch_size: int,
    cancel: CancelToken,
) -> list[list[CurvePair]]:
    """orders [M, B, patches] -> per order, per image, its deletion and insertion curves."""
    count, batch, patches = orders.shape
    points = len(inputs.counts)
    ranks = torch.empty_like(orders)
    ranks.scatter_(2, orders, torch.arange(patches, device=orders.device).expand_as(orders))
    total = count * 2 * batch * points
    probabilities = torch.empty(total, device=inputs.pixels.device)
    with torch.inference_mode():
        for start in range(0, total, batch_size):
            cancel.raise_if_cancelled()
            items = torch.arange(start, min(start + batch_size, total), device=orders.device)
            images, image = _masked(inputs, ranks, items, adapter.grid)
            logits = logits_of(adapter.forward(images)).float()
            chosen = logits.softmax(dim=-1).gather(1, inputs.targets[image][:, None])[:, 0]
            probabilities[start : start + len(items)] = chosen
    values = probabilities.view(count, 2, batch, points).cpu().tolist()
    return [
        [
            CurvePair(
                Curve(values[m][0][i], area(values[m][0][i])),
                Curve(values[m][1][i], area(values[m][1][i])),
            )
            for i in range(batch)
        ]
        for m in range(count)
    ]
