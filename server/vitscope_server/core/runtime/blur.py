"""A separable Gaussian blur on image batches: the blurred references of attribution methods.

Its values are torchvision's `gaussian_blur` with kernel size 2 * radius + 1 (the tests
compare them), but torchvision convolves with the full 2-D kernel: at 224 px with the default
sigma (an eighth of the height, a 169-px kernel) it is about 40 times slower than these two
1-D passes, which is why the blur stays written out here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MAX_BLUR_SIGMA = 10_000.0
"""The largest sigma a request may ask for: far past any image's size, where the blur is flat."""


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """[B, C, H, W] blurred per channel; borders reflected, the kernel cut at 3 sigma (and at
    the image's size, which reflection needs)."""
    height, width = images.shape[-2:]
    radius = min(math.ceil(3 * min(sigma, MAX_BLUR_SIGMA)), height - 1, width - 1)
    if radius < 1:
        return images.clone()
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    padded = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    rows = F.conv2d(padded, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(rows, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
