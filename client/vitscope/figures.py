"""What every demo page shares: the figure record and the sample digits it shows."""

from __future__ import annotations

import io
from dataclasses import dataclass
from importlib import resources

from PIL import Image

from vitscope.client import Client

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


def strongest_channels(
    client: Client, model: str, images: list[Image.Image], site: str, count: int
) -> list[int]:
    """Channels with the largest mean patch activation over the images, as the paper picks features."""
    width = int(client.describe(model).sites[site]["shape"][-1])
    top = client.activations(
        images, [site], model=model, reduction="top_channels", top_k=min(count * 3, width)
    )
    indices = top.sites[site].channel_indices
    assert indices is not None
    votes: dict[int, int] = {}
    for row in indices:
        for channel in row.tolist():
            votes[channel] = votes.get(channel, 0) + 1
    return sorted(votes, key=lambda c: -votes[c])[:count]
