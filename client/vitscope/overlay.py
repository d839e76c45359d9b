"""Heatmap overlays of patch-wise activation maps (numpy, PIL and a matplotlib color map)."""

from __future__ import annotations

import matplotlib
import numpy as np
from PIL import Image, ImageDraw

# Perceptually ordered, dark to bright; the server draws its overlays with the same map.
COLOR_MAP = "inferno"


def normalize(values: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1]; a constant map becomes zeros."""
    values = values.astype(np.float32)
    low, high = float(values.min()), float(values.max())
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def colorize(unit: np.ndarray) -> np.ndarray:
    """[H, W] in [0, 1] -> [H, W, 3] uint8."""
    return matplotlib.colormaps[COLOR_MAP](np.clip(unit, 0.0, 1.0), bytes=True)[..., :3]


def heatmap_overlay(image: Image.Image, patch_map: np.ndarray, alpha: float = 0.55) -> Image.Image:
    """The map, min-max normalized and bilinearly upsampled, blended over the image."""
    base = image.convert("RGB")
    heat = (
        Image.fromarray(normalize(patch_map) * 255.0)
        .convert("L")
        .resize(base.size, Image.Resampling.BILINEAR)
    )
    colored = Image.fromarray(colorize(np.asarray(heat, dtype=np.float32) / 255.0))
    return Image.blend(base, colored, alpha)


def grid(
    tiles: list[list[Image.Image]], captions: list[list[str]] | None = None, tile: int = 128
) -> Image.Image:
    """Tiles in rows, each resized to tile x tile, with an optional caption strip under each."""
    rows = len(tiles)
    cols = max(len(row) for row in tiles)
    caption_height = 14 if captions else 0
    canvas = Image.new("RGB", (cols * tile, rows * (tile + caption_height)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(tiles):
        for c, picture in enumerate(row):
            x, y = c * tile, r * (tile + caption_height)
            canvas.paste(
                picture.convert("RGB").resize((tile, tile), Image.Resampling.NEAREST), (x, y)
            )
            if captions:
                draw.text((x + 2, y + tile + 1), captions[r][c], fill="black")
    return canvas
