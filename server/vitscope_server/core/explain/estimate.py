"""Memory estimate of Explain, from the request alone, for admission by budget."""

from __future__ import annotations

from collections.abc import Sequence

from vitscope_server.core.model.adapters import ModelAdapter
from vitscope_server.core.model.images import ImageInput
from vitscope_server.core.runtime.budget import backward_bytes, images_bytes


def explanation_bytes(adapter: ModelAdapter, images: Sequence[ImageInput], max_pixels: int) -> int:
    """The images and a forward and backward of the batch at the model's input size."""
    _, height, width = adapter.data_config.input_size
    return images_bytes(adapter, images, max_pixels) + backward_bytes(
        adapter, len(images), height * width
    )
