"""How a feature image is produced from what the optimizer changes.

PIXEL is the paper's (Ghiasi et al. 2022): the pixels themselves. FOURIER is the
decorrelated-color spectrum of Olah et al. 2017 ("Feature Visualization"), which
favors smooth, natural-colored images: the optimizer moves real-FFT coefficients whose
frequencies are pre-scaled by 1/f, and colors are mixed through the ImageNet color
correlation, so every step changes the whole image at low frequencies first.
"""

from __future__ import annotations

from enum import Enum

import torch


class Parameterization(Enum):
    PIXEL = "pixel"
    FOURIER = "fourier"


# The square root of ImageNet's RGB color-correlation matrix (Olah et al. 2017); rows are
# R, G, B outputs, columns the decorrelated inputs. Normalized by its largest column norm.
COLOR_CORRELATION_SQRT = (
    (0.26, 0.09, 0.02),
    (0.27, 0.00, -0.05),
    (0.27, -0.09, 0.03),
)
# Amplitude falls as 1 / f**FOURIER_DECAY; f is clipped below at 1 / S (the lowest nonzero one).
FOURIER_DECAY = 1.0
FOURIER_INIT_STD = 0.01
# Shrinks the inverse FFT so that the initial image sits near the sigmoid's middle.
FOURIER_DIVISOR = 4.0

DETAILS = {
    Parameterization.PIXEL: "pixels, uniform [0, 1] init, clamped to [0, 1] after each step",
    Parameterization.FOURIER: (
        f"real-FFT spectrum, N(0, {FOURIER_INIT_STD}^2) init, scaled by S / max(f, 1/S)^"
        f"{FOURIER_DECAY:g}, inverse real FFT / {FOURIER_DIVISOR:g}, ImageNet color "
        "decorrelation, sigmoid; no clamp"
    ),
}


class ImageParameters:
    """The optimized leaf tensor and the pixels [K, 3, S, S] in [0, 1] it stands for."""

    tensor: torch.Tensor

    def pixels(self) -> torch.Tensor:
        raise NotImplementedError

    def constrain(self) -> None:
        """Called after each optimizer step."""


class PixelImage(ImageParameters):
    def __init__(
        self, count: int, size: int, generator: torch.Generator, device: torch.device
    ) -> None:
        self.tensor = torch.rand(count, 3, size, size, generator=generator).to(device)
        self.tensor.requires_grad_()

    def pixels(self) -> torch.Tensor:
        return self.tensor

    def constrain(self) -> None:
        with torch.no_grad():
            self.tensor.clamp_(0, 1)


def spectrum_scale(size: int) -> torch.Tensor:
    """[S, S // 2 + 1]: S / max(f, 1/S)^decay, f = sqrt(fy^2 + fx^2) in cycles per pixel."""
    fy = torch.fft.fftfreq(size, dtype=torch.float64)[:, None]
    fx = torch.fft.rfftfreq(size, dtype=torch.float64)[None, :]
    frequency = (fy**2 + fx**2).sqrt().clamp(min=1.0 / size)
    return (size / frequency**FOURIER_DECAY).float()


def color_matrix() -> torch.Tensor:
    matrix = torch.tensor(COLOR_CORRELATION_SQRT, dtype=torch.float32)
    return matrix / matrix.norm(dim=0).max()


class FourierImage(ImageParameters):
    """tensor: [K, 3, S, S // 2 + 1, 2], the real and imaginary parts of each coefficient."""

    def __init__(
        self, count: int, size: int, generator: torch.Generator, device: torch.device
    ) -> None:
        self.size = size
        shape = (count, 3, size, size // 2 + 1, 2)
        self.tensor = (torch.randn(shape, generator=generator) * FOURIER_INIT_STD).to(device)
        self.tensor.requires_grad_()
        self.scale = spectrum_scale(size).to(device)
        self.colors = color_matrix().to(device)

    def pixels(self) -> torch.Tensor:
        spectrum = torch.view_as_complex(self.tensor) * self.scale
        decorrelated = torch.fft.irfft2(spectrum, s=(self.size, self.size)) / FOURIER_DIVISOR
        rgb = torch.einsum("cd,kdhw->kchw", self.colors, decorrelated)
        return torch.sigmoid(rgb)


def image_parameters(
    kind: Parameterization,
    count: int,
    size: int,
    generator: torch.Generator,
    device: torch.device,
) -> ImageParameters:
    """The initial parameters, drawn from the generator (first in the run's draw order)."""
    images = {Parameterization.PIXEL: PixelImage, Parameterization.FOURIER: FourierImage}
    return images[kind](count, size, generator, device)
