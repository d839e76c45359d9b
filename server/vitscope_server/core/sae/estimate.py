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
    largest = max(
        (images[i : i + batch] for i in range(0, len(images), batch)),
        key=lambda chunk: images_bytes(adapter, chunk, max_pixels),
        default=[],
    )
    count = len(largest)
    tokens = count * (adapter.num_prefix_tokens + math.prod(adapter.grid))
    sae_bytes = tokens * (2 * sae.d_sae + 2 * sae.d_in) * _FLOAT
    return images_bytes(adapter, largest, max_pixels) + forward_bytes(adapter, count, 1) + sae_bytes
