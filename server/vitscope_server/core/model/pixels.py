"""Pixels in [0, 1] and the model's normalized input, converted one way everywhere."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch


class Normalization(Protocol):
    """Anything with the model's per-channel mean and std (DataConfig, an inverter's geometry)."""

    @property
    def mean(self) -> Sequence[float]: ...

    @property
    def std(self) -> Sequence[float]: ...


def _channel_view(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(3, 1, 1)


def normalize(pixels: torch.Tensor, config: Normalization) -> torch.Tensor:
    """[..., 3, H, W] pixels in [0, 1] -> the model's input."""
    return (pixels - _channel_view(config.mean, pixels)) / _channel_view(config.std, pixels)


def denormalize(inputs: torch.Tensor, config: Normalization) -> torch.Tensor:
    """The model's input [..., 3, H, W] -> pixels (in [0, 1] where the input came from there)."""
    return inputs * _channel_view(config.std, inputs) + _channel_view(config.mean, inputs)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[..., 3, H, W] in [0, 1] -> uint8 [..., H, W, 3], as an 8-bit image file holds them."""
    scaled = (images.detach().clamp(0, 1) * 255).round().to(torch.uint8)
    return scaled.movedim(-3, -1).cpu().numpy()
