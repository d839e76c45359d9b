"""Memory estimates of ProjectToClassSpace and ProjectMemories, from the request alone, for
admission by budget."""

from __future__ import annotations

from collections.abc import Sequence

from vitscope_server.core.model.adapters import ModelAdapter
from vitscope_server.core.model.images import ImageInput
from vitscope_server.core.projection.project import ProjectionQuery
from vitscope_server.core.runtime.budget import forward_bytes, images_bytes


def projection_bytes(
    adapter: ModelAdapter, images: Sequence[ImageInput], query: ProjectionQuery, max_pixels: int
) -> int:
    """The images and a forward keeping every projected block's residual."""
    blocks = len(query.blocks) or len(adapter.blocks)
    return images_bytes(adapter, images, max_pixels) + forward_bytes(adapter, len(images), blocks)


def memories_bytes(adapter: ModelAdapter, images: Sequence[ImageInput], max_pixels: int) -> int:
    """The images and a forward keeping one block's coefficients."""
    return images_bytes(adapter, images, max_pixels) + forward_bytes(adapter, len(images), 1)
