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


def normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(DIGITS_MEAN)[None, :, None, None]
    std = torch.tensor(DIGITS_STD)[None, :, None, None]
    return (x - mean) / std


def as_input(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [..., S, S, 3] (or [..., S, S] grey) -> float [B, 3, S, S] in [0, 1]."""
    if pixels.shape[-1] != 3:
        pixels = np.repeat(pixels[..., None], 3, axis=-1)
    return torch.tensor(pixels.reshape(-1, *pixels.shape[-3:])).permute(0, 3, 1, 2) / 255.0


# The square root of ImageNet's color correlation, as published with Olah et al. 2017.
COLOR_SQRT = np.array([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])


def fourier_pixels(spectrum: torch.Tensor) -> torch.Tensor:
    """[K, 3, S, S//2+1, 2] real/imaginary coefficients -> pixels [K, 3, S, S] in (0, 1).

    The inverse real FFT written as the explicit sum x[h, w] = 1/S^2 sum_{v, u} c_u
    Re(X[v, u] exp(2 pi i (v h + u w) / S)), c_u = 2 for the columns whose mirror images the
    half spectrum leaves out, else 1; X scaled by S / max(f, 1/S); then / 4, the normalized
    color matrix, a sigmoid.
    """
    size, half = spectrum.shape[2], spectrum.shape[3]
    v = np.arange(size)
    u = np.arange(half)
    fy = np.minimum(v, size - v) / size
    frequency = np.maximum(np.hypot(fy[:, None], u[None, :] / size), 1.0 / size)
    scale = torch.tensor(size / frequency, dtype=torch.float64)
    weight = np.where((u == 0) | (2 * u == size), 1.0, 2.0)
    theta = (
        2
        * np.pi
        * (
            v[:, None, None, None] * v[None, None, :, None]
            + u[None, :, None, None] * v[None, None, None, :]
        )
        / size
    )  # [v, u, h, w]
    cos = torch.tensor(weight[None, :, None, None] * np.cos(theta))
    sin = torch.tensor(weight[None, :, None, None] * np.sin(theta))
    real = spectrum[..., 0].double() * scale
    imag = spectrum[..., 1].double() * scale
    image = (
        torch.einsum("kcvu,vuhw->kchw", real, cos) - torch.einsum("kcvu,vuhw->kchw", imag, sin)
    ) / size**2
    colors = COLOR_SQRT / np.linalg.norm(COLOR_SQRT, axis=0).max()
    rgb = torch.einsum("cd,kdhw->kchw", torch.tensor(colors), image / 4)
    return torch.sigmoid(rgb).float()
