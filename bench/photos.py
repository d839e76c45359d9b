"""The benchmarks' images: eight real photos that ship with scikit-image."""

from __future__ import annotations

import skimage.data
from PIL import Image

NAMES = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "camera",
)


def photos() -> list[Image.Image]:
    return [Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in NAMES]
