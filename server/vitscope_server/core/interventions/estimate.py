"""Memory estimate of Intervene, from the request alone, for admission by budget; and how
many variants one forward may carry within it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from vitscope_server.core.model.adapters import ModelAdapter
from vitscope_server.core.model.images import ImageInput
from vitscope_server.core.runtime.budget import images_bytes, named_forward_bytes


def fixed_bytes(
    adapter: ModelAdapter,
    shapes: Mapping[str, tuple[int, ...]],
    images: Sequence[ImageInput],
    fields: Sequence[str],
    recorded: Sequence[str],
    max_pixels: int,
) -> int:
    """Every image set decoded, and the source and reference values kept at `recorded` sites
    for all images (the largest pass counted: all images at once)."""
    return images_bytes(adapter, images, max_pixels, fields) + named_forward_bytes(
        adapter, shapes, len(images), recorded
    )


def variant_bytes(
    adapter: ModelAdapter, shapes: Mapping[str, tuple[int, ...]], images: int, read: Sequence[str]
) -> int:
    """One variant's rows in a forward: its images with every site read after the edits."""
    return named_forward_bytes(adapter, shapes, images, read)


def intervention_bytes(fixed: int, per_variant: int, variants_per_forward: int) -> int:
    return fixed + per_variant * variants_per_forward
