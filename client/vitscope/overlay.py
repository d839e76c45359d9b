"""Heatmap overlays of patch-wise activation maps (numpy + PIL, no torch)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

# Anchors of a perceptually ordered dark-to-bright colour ramp.
_RAMP = np.array(
    [
        [0, 0, 4],
        [40, 11, 84],
        [101, 21, 110],
        [159, 42, 99],
        [212, 72, 66],
        [245, 125, 21],
        [250, 193, 39],
        [252, 255, 164],
    ],
    dtype=np.float32,
)


def normalise(values: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1]; a constant map becomes zeros."""
    values = values.astype(np.float32)
    low, high = float(values.min()), float(values.max())
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def colorize(unit: np.ndarray) -> np.ndarray:
    """[H, W] in [0, 1] -> [H, W, 3] uint8."""
    position = np.clip(unit, 0.0, 1.0) * (len(_RAMP) - 1)
    low = np.floor(position).astype(int)
    high = np.minimum(low + 1, len(_RAMP) - 1)
    weight = (position - low)[..., None]
    return (_RAMP[low] * (1 - weight) + _RAMP[high] * weight).astype(np.uint8)


def heatmap_overlay(image: Image.Image, patch_map: np.ndarray, alpha: float = 0.55) -> Image.Image:
    """The map, min-max normalised and bilinearly upsampled, blended over the image."""
    base = image.convert("RGB")
    heat = (
        Image.fromarray(normalise(patch_map) * 255.0)
        .convert("L")
        .resize(base.size, Image.Resampling.BILINEAR)
    )
    coloured = Image.fromarray(colorize(np.asarray(heat, dtype=np.float32) / 255.0))
    return Image.blend(base, coloured, alpha)


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
