"""Memory estimate of OptimizeFeatures, from the request alone, for admission by budget."""

from __future__ import annotations

from vitscope_server.core.features.optimize import PreparedOptimization
from vitscope_server.core.runtime.budget import backward_bytes


def optimization_bytes(prepared: PreparedOptimization) -> int:
    """Forward and backward of every augmented copy of every feature's image."""
    params = prepared.params
    batch = len(prepared.features) * params.copies
    return backward_bytes(prepared.loaded.adapter, batch, params.image_size**2)
