"""Memory estimate of EvaluateSae, from the request alone, for admission by budget."""

from __future__ import annotations

import math
from collections.abc import Sequence

from vitscope_server.core.model.adapters import ModelAdapter
from vitscope_server.core.model.images import ImageInput
from vitscope_server.core.model.sae import SaeInfo
from vitscope_server.core.runtime.budget import forward_bytes, images_bytes

_FLOAT = 4


def evaluation_bytes(
    adapter: ModelAdapter,
    images: Sequence[ImageInput],
    batch: int,
    sae: SaeInfo,
    max_pixels: int,
) -> int:
    """The largest batch's images decoded, a forward keeping the site, and the SAE's
    pre-activations, codes and reconstruction of its tokens (batches run one at a time)."""
    starts = range(0, len(images), batch)
    chunks = [
        images_bytes(
            adapter,
            images[start : start + batch],
            max_pixels,
            [f"images[{i}]" for i in range(start, min(start + batch, len(images)))],
        )
        for start in starts
    ]
    if not chunks:
        return 0
    largest = max(range(len(chunks)), key=chunks.__getitem__)
    count = len(images[starts[largest] : starts[largest] + batch])
    tokens = count * (adapter.num_prefix_tokens + math.prod(adapter.grid))
    sae_bytes = tokens * (2 * sae.d_sae + 2 * sae.d_in) * _FLOAT
    return chunks[largest] + forward_bytes(adapter, count, 1) + sae_bytes
