"""Memory estimates of GetActivations and TopActivatingImages, from the request alone, for
admission by budget."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from vitscope_server.core.model.adapters import ModelAdapter
from vitscope_server.core.model.images import ImageInput
from vitscope_server.core.runtime.budget import forward_bytes, images_bytes, named_forward_bytes


def activations_bytes(
    adapter: ModelAdapter,
    site_shapes: Mapping[str, tuple[int, ...]],
    images: Sequence[ImageInput],
    sites: Sequence[str],
    max_pixels: int,
) -> int:
    """The images, decoded, and one forward keeping every named site."""
    return images_bytes(adapter, images, max_pixels) + named_forward_bytes(
        adapter, site_shapes, len(images), sites
    )


def scan_batch_bytes(
    adapter: ModelAdapter, images: Sequence[ImageInput], fields: Sequence[str], max_pixels: int
) -> int:
    """One batch of a top-image scan: its images and a forward keeping one site."""
    return images_bytes(adapter, images, max_pixels, fields) + forward_bytes(
        adapter, len(images), 1
    )
