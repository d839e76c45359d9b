"""Integrated gradients (Sundararajan, Taly, Yan 2017), run in batches of interpolated images.

attribution = (x - x') * mean over k = 1..m of dS/dx at x' + ((k - 1/2) / m)(x - x'), S the
target's score: a Riemann sum at the midpoints of the m intervals, whose error falls as 1/m^2
(the paper's right sum, at k / m, falls as 1/m). Completeness: the attributions sum to
S(x) - S(x'); how far they are off is reported. The map pools |attribution| summed over
channels to the patch grid (summed over each patch's pixels).
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn.functional as F

from vitscope_server.core.model.adapters import ModelAdapter
from vitscope_server.core.model.pixels import normalize
from vitscope_server.core.runtime.blur import gaussian_blur
from vitscope_server.core.runtime.cancel import CancelToken


class Baseline(Enum):
    BLACK = "black"
    BLURRED = "blurred"
    NOISE = "noise"


@dataclass(frozen=True)
class GradientProgress:
    """Interpolated images done so far, of all of them (images x steps)."""

    completed: int
    total: int


@dataclass(frozen=True)
class Completeness:
    attribution_sum: float
    score_difference: float

    @property
    def error(self) -> float:
        return abs(self.attribution_sum - self.score_difference)

    @property
    def relative_error(self) -> float:
        scale = abs(self.score_difference)
        return self.error / scale if scale > 0 else (0.0 if self.error == 0 else float("inf"))


@dataclass(frozen=True)
class IntegratedGradients:
    maps: torch.Tensor  # [B, H, W] patch grid
    completeness: list[Completeness]


def baseline_images(
    adapter: ModelAdapter, pixels: torch.Tensor, baseline: Baseline, sigma: float, seed: int
) -> torch.Tensor:
    """The reference x' for each image, in the model's normalized input space."""
    config = adapter.data_config
    if baseline is Baseline.BLURRED:
        # The blur is per channel and linear, so it commutes with the normalization.
        return gaussian_blur(pixels, sigma)
    if baseline is Baseline.NOISE:
        generator = torch.Generator().manual_seed(seed)
        noise = torch.rand(pixels.shape, generator=generator).to(pixels)
        return normalize(noise, config)
    return normalize(torch.zeros_like(pixels), config)


def patch_pool(values: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[B, H, W] per-pixel values -> [B, grid_h, grid_w] sums over each patch's pixels."""
    height, width = values.shape[-2:]
    area = height * width / (grid[0] * grid[1])
    return F.adaptive_avg_pool2d(values[:, None], grid)[:, 0] * area


def _target_scores(
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    adapter: ModelAdapter,
    images: torch.Tensor,
    targets: torch.Tensor,
) -> torch.Tensor:
    return logits_of(adapter.forward(images)).gather(1, targets[:, None])[:, 0]


def integrated_gradients(
    adapter: ModelAdapter,
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    pixels: torch.Tensor,
    reference: torch.Tensor,
    targets: torch.Tensor,
    image_scores: torch.Tensor,
    steps: int,
    batch_size: int,
    cancel: CancelToken,
) -> Generator[GradientProgress, None, IntegratedGradients]:
    """Yields progress after each batch of interpolated images; returns the maps.
    image_scores [B]: the targets' scores on the images, S(x), known from the prediction."""
    batch = pixels.shape[0]
    total = batch * steps
    delta = pixels - reference
    alphas = (torch.arange(steps, device=pixels.device, dtype=pixels.dtype) + 0.5) / steps
    gradient_sum = torch.zeros_like(pixels)
    for start in range(0, total, batch_size):
        cancel.raise_if_cancelled()
        points = torch.arange(start, min(start + batch_size, total), device=pixels.device)
        image, step = points // steps, points % steps
        inputs = reference[image] + alphas[step].view(-1, 1, 1, 1) * delta[image]
        with torch.enable_grad():
            inputs.requires_grad_(True)
            scores = _target_scores(logits_of, adapter, inputs, targets[image])
            (gradient,) = torch.autograd.grad(scores.sum(), inputs)
        gradient_sum.index_add_(0, image, gradient)
        yield GradientProgress(int(points[-1]) + 1, total)
    attributions = delta * gradient_sum / steps
    with torch.no_grad():
        difference = image_scores - _target_scores(logits_of, adapter, reference, targets)
    sums = attributions.sum(dim=(1, 2, 3))
    completeness = [
        Completeness(float(s), float(d))
        for s, d in zip(sums.tolist(), difference.tolist(), strict=True)
    ]
    maps = patch_pool(attributions.abs().sum(dim=1), adapter.grid)
    return IntegratedGradients(maps, completeness)
