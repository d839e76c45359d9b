"""The server's batchers, built from its settings and reporting to its metrics."""

from __future__ import annotations

from collections.abc import Sequence

from vitscope_server.core.activations import (
    ActivationLimits,
    ActivationResult,
    PreparedActivations,
    run_activations,
)
from vitscope_server.core.batching import Batcher
from vitscope_server.core.cancel import CancelToken
from vitscope_server.core.slots import ComputeSlots
from vitscope_server.settings import ServerSettings
from vitscope_server.transport.metrics import Metrics


def activation_batcher(
    settings: ServerSettings, slots: ComputeSlots, limits: ActivationLimits, metrics: Metrics
) -> Batcher[PreparedActivations, ActivationResult]:
    """GetActivations requests for one model share forwards (batch_max_images 0: never)."""

    def run(
        items: Sequence[PreparedActivations], cancel: CancelToken
    ) -> list[ActivationResult | BaseException]:
        return run_activations(items, cancel, limits)

    def observe(model: str, images: int, delay: float) -> None:
        metrics.batch_images.labels("GetActivations", model).observe(images)
        metrics.batch_delay.labels("GetActivations", model).observe(delay)

    return Batcher(
        run,
        slots,
        max_images=max(settings.batch_max_images, 1),
        max_delay=settings.batch_delay_ms / 1000 if settings.batch_max_images else 0.0,
        on_batch=observe,
    )
