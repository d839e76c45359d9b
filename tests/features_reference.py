"""Plain-hook reference for the built-in digits model, built by hand from its definition."""

from __future__ import annotations

import numpy as np
import timm
import torch
from safetensors.torch import load_file
from torch import nn

from vitscope_server.builtin import (
    DIGITS_ARCHITECTURE,
    DIGITS_KWARGS,
    DIGITS_MEAN,
    DIGITS_STD,
    DIGITS_WEIGHTS,
)


def build_digits_model() -> nn.Module:
    model = timm.create_model(DIGITS_ARCHITECTURE, pretrained=False, **DIGITS_KWARGS)
    model.load_state_dict(load_file(str(DIGITS_WEIGHTS)))
    return model.eval().requires_grad_(False)


def hidden(model: nn.Module, block: int, pixels: torch.Tensor) -> torch.Tensor:
    """MLP hidden units [B, T, 4D] of a timm ViT block, read with a plain hook."""
    store: dict[str, torch.Tensor] = {}
    handle = model.blocks[block].mlp.act.register_forward_hook(
        lambda m, a, o: store.__setitem__("h", o)
    )
    try:
        model(pixels)
    finally:
        handle.remove()
    return store["h"]


def normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(DIGITS_MEAN)[None, :, None, None]
    std = torch.tensor(DIGITS_STD)[None, :, None, None]
    return (x - mean) / std


def as_input(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [..., S, S, 3] (or [..., S, S] grey) -> float [B, 3, S, S] in [0, 1]."""
    if pixels.shape[-1] != 3:
        pixels = np.repeat(pixels[..., None], 3, axis=-1)
    return torch.tensor(pixels.reshape(-1, *pixels.shape[-3:])).permute(0, 3, 1, 2) / 255.0
