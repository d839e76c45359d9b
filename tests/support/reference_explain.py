"""Independent attribution references: plain hooks on timm's attention dropout, explicit
matrix products in float64, hand-written autograd loops and per-patch masking loops.

Nothing here uses the server's adapters, capture or explanation code.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def hooked_attention(
    model: nn.Module, pixels: torch.Tensor, keep_grad: bool = False
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The logits and every block's softmax attention [B, heads, T, T] of a timm ViT, read at
    the attention dropout (fused attention off); with keep_grad their .grad is kept."""
    probs: list[torch.Tensor] = []

    def keep(module: nn.Module, args: object, output: torch.Tensor) -> None:
        if keep_grad:
            output.retain_grad()
        probs.append(output)

    handles = []
    for block in model.blocks:
        block.attn.fused_attn = False
        handles.append(block.attn.attn_drop.register_forward_hook(keep))
    try:
        logits = model(pixels)
    finally:
        for handle in handles:
            handle.remove()
    return logits, probs


def reading_row(matrix: np.ndarray, prefix: int, grid: tuple[int, int]) -> np.ndarray:
    row = matrix[0] if prefix else matrix.mean(axis=0)
    return row[prefix:].reshape(grid)


def rollout(probs: list[np.ndarray], fusion: str, prefix: int, grid: tuple[int, int]) -> np.ndarray:
    """One image: probs[b] [heads, T, T]; A_L ... A_1 with each A = rownorm(0.5 fuse + 0.5 I)."""
    fuse = {"mean": np.mean, "max": np.max, "min": np.min}[fusion]
    joint = np.eye(probs[0].shape[-1])
    for attention in probs:
        mixed = 0.5 * fuse(attention.astype(np.float64), axis=0) + 0.5 * np.eye(len(joint))
        mixed = mixed / mixed.sum(axis=1, keepdims=True)
        joint = mixed @ joint
    return reading_row(joint, prefix, grid)


def relevancy(
    model: nn.Module, pixels: torch.Tensor, target: int, prefix: int, grid: tuple[int, int]
) -> np.ndarray:
    """One image [1, 3, H, W]: R = I; R += mean_heads((dlogit/dA * A)+) @ R per block."""
    logits, probs = hooked_attention(model, pixels.clone().requires_grad_(True), keep_grad=True)
    logits[0, target].backward()
    joint = np.eye(probs[0].shape[-1])
    for attention in probs:
        assert attention.grad is not None
        weighted = (attention.grad[0] * attention[0]).clamp(min=0).mean(dim=0)
        joint = joint + weighted.detach().double().numpy() @ joint
    return reading_row(joint, prefix, grid)


def integrated_gradients(
    model: nn.Module, image: torch.Tensor, reference: torch.Tensor, target: int, steps: int
) -> tuple[torch.Tensor, float]:
    """One image [3, H, W]: the attributions [3, H, W] by a loop over the midpoints
    (k - 1/2) / steps, k = 1..steps, and f(x) - f(x')."""
    total = torch.zeros_like(image)
    for k in range(1, steps + 1):
        alpha = (k - 0.5) / steps
        point = (reference + alpha * (image - reference)).detach().requires_grad_(True)
        model(point[None])[0, target].backward()
        assert point.grad is not None
        total += point.grad
    with torch.no_grad():
        difference = model(image[None])[0, target] - model(reference[None])[0, target]
    return (image - reference) * total / steps, float(difference)


def patch_sum(values: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """[H, W] -> [grid_h, grid_w]: sums over each patch's pixels."""
    height, width = values.shape
    ph, pw = height // grid[0], width // grid[1]
    return values.reshape(grid[0], ph, grid[1], pw).sum(axis=(1, 3))


def curve(
    model: nn.Module,
    image: torch.Tensor,
    fill: torch.Tensor,
    order: list[int],
    counts: list[int],
    target: int,
    grid: tuple[int, int],
    insertion: bool,
) -> list[float]:
    """One image: the target probability after taking the first n patches of `order`, one
    forward per point. Deletion writes `fill` into the taken patches of the image; insertion
    writes the image's patches into `fill`."""
    height, width = image.shape[-2:]
    ph, pw = height // grid[0], width // grid[1]
    values = []
    for n in counts:
        canvas = (fill if insertion else image).clone()
        source = image if insertion else fill
        for patch in order[:n]:
            r, c = divmod(patch, grid[1])
            rows, cols = slice(r * ph, (r + 1) * ph), slice(c * pw, (c + 1) * pw)
            canvas[:, rows, cols] = source[:, rows, cols]
        with torch.no_grad():
            values.append(float(model(canvas[None]).softmax(dim=-1)[0, target]))
    return values
