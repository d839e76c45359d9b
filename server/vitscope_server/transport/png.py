"""Images leave the service as PNG bytes, heatmaps drawn with a matplotlib color map."""

from __future__ import annotations

import io

import matplotlib
import numpy as np
from PIL import Image

# Perceptually ordered, dark to bright; the client draws its overlays with the same map.
COLOR_MAP = "inferno"
OVERLAY_ALPHA = 0.55


def png(pixels: np.ndarray) -> bytes:
    """uint8 [H, W, 3] (or [H, W]) -> PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def heatmap_png(image: np.ndarray, values: np.ndarray) -> bytes:
    """`values` [H, W] at the image's size, min-max normalized, colored and blended over the
    uint8 RGB `image` [H, W, 3]."""
    values = values.astype(np.float32)
    low, high = float(values.min()), float(values.max())
    unit = (values - low) / (high - low) if high > low else np.zeros_like(values)
    colors = matplotlib.colormaps[COLOR_MAP](unit, bytes=True)[..., :3]
    blended = Image.blend(
        Image.fromarray(image).convert("RGB"), Image.fromarray(colors), OVERLAY_ALPHA
    )
    return png(np.asarray(blended))
