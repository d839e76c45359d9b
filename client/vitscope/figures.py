"""What every demo page shares: the figure record and the sample digits it shows."""

from __future__ import annotations

import io
from dataclasses import dataclass
from importlib import resources

from PIL import Image

SAMPLE_PACKAGE = "vitscope.samples"


@dataclass(frozen=True)
class Figure:
    file: str
    caption: str


def sample_digits() -> list[tuple[str, Image.Image]]:
    """Held-out MNIST test digits shipped with the client, named like '7-0042.png'."""
    folder = resources.files(SAMPLE_PACKAGE)
    names = sorted(entry.name for entry in folder.iterdir() if entry.name.endswith(".png"))
    return [
        (name, Image.open(io.BytesIO(folder.joinpath(name).read_bytes())).convert("RGB"))
        for name in names
    ]
