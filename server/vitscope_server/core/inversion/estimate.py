"""Each method's memory estimate, from its request alone, for admission by budget."""

from __future__ import annotations

import numpy as np

from vitscope_server.core.inversion.invert import InvertQuery, Method
from vitscope_server.core.model.adapters import ModelAdapter
from vitscope_server.core.model.images import ImageInput
from vitscope_server.core.runtime.budget import backward_bytes, forward_bytes, images_bytes


def inversion_bytes(
    adapter: ModelAdapter,
    images: list[ImageInput],
    query: InvertQuery,
    representation: tuple[np.ndarray, int] | None,
    max_pixels: int,
) -> int:
    """Originals, the representation, and a forward per depth or an optimization."""
    sent = 0 if representation is None else 2 * int(representation[0].size) * 4
    values = None if representation is None else representation[0]
    batch = len(images) if values is None else (int(values.shape[0]) if values.ndim else 1)
    _, height, width = adapter.data_config.input_size
    work = (
        backward_bytes(adapter, batch, height * width)
        if query.method is Method.OPTIMIZATION
        else forward_bytes(adapter, batch, max(1, len(query.depths)))
    )
    return images_bytes(adapter, images, max_pixels) + sent + work
