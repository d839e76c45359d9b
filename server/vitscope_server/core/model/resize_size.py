"""How large an image a model's evaluation transform builds, worked out from sizes alone.

A shortest-side resize of a 1 x 1,000,000 image to 248 makes a 248 x 248,000,000 image; this
finds that before any pixel is decoded, so such an image is refused instead of resized.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Size = tuple[int, int]  # (width, height)


def _shortest_side(size: Size, side: int, max_size: int | None) -> Size:
    width, height = size
    short, long = min(width, height), max(width, height)
    new_short, new_long = side, max(1, int(side * long / max(short, 1)))
    if max_size is not None and new_long > max_size:
        new_short, new_long = max(1, int(max_size * new_short / new_long)), max_size
    return (new_short, new_long) if width <= height else (new_long, new_short)


def _pair(value: Any) -> tuple[int, int] | None:
    """A (height, width) target from an int-or-sequence size attribute, None for an int."""
    if isinstance(value, int):
        return None
    items = list(value)
    return (int(items[0]), int(items[-1]))


def _keep_ratio(size: Size, target: Sequence[int], longest: float) -> Size:
    """timm's and open_clip's ResizeKeepRatio: between fitting inside and covering the target."""
    width, height = size
    ratio_h, ratio_w = height / target[0], width / target[-1]
    ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1.0 - longest)
    return (max(1, round(width / ratio)), max(1, round(height / ratio)))


def _step_size(step: Any, size: Size) -> Size:
    """The output size of one transform step; steps without a size keep it."""
    target = getattr(step, "size", None)
    if target is None:
        return size
    name = type(step).__name__
    if "KeepRatio" in name:
        return _keep_ratio(size, list(target), float(getattr(step, "longest", 0.0)))
    pair = _pair(target)
    if "Crop" in name and pair is not None:
        return (pair[1], pair[0])
    if pair is None or (isinstance(target, (list, tuple)) and len(target) == 1):
        side = int(target) if isinstance(target, int) else int(target[0])
        return _shortest_side(size, side, getattr(step, "max_size", None))
    return (pair[1], pair[0])


def peak_pixels(transform: Any, width: int, height: int) -> int:
    """The most pixels any step of `transform` (a Compose or one step) holds for this image."""
    steps = getattr(transform, "transforms", [transform])
    size: Size = (width, height)
    peak = width * height
    for step in steps:
        size = _step_size(step, size)
        peak = max(peak, size[0] * size[1])
    return peak
