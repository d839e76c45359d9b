"""The server's batchers, built from its settings and reporting to its metrics."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from vitscope_server.core.activations.compute import (
    ActivationResult,
    PreparedActivations,
    run_activations,
)
from vitscope_server.core.explain.batching import run_explanations
from vitscope_server.core.explain.compute import Event as ExplainEvent
from vitscope_server.core.explain.query import PreparedExplanation
from vitscope_server.core.inversion.invert import Event, PreparedInversion
from vitscope_server.core.inversion.learned import run_learned
from vitscope_server.core.projection.project import (
    PreparedProjection,
    ProjectionResult,
    run_projections,
)
from vitscope_server.core.runtime.batching import Batcher, RunBatch
from vitscope_server.core.runtime.cancel import CancelToken
from vitscope_server.core.runtime.limits import RequestLimits
from vitscope_server.core.runtime.slots import ComputeSlots
from vitscope_server.settings import ServerSettings
from vitscope_server.transport.metrics import Metrics, labelled

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass(frozen=True)
class Batchers:
    """One per RPC whose concurrent requests for a model share forwards; ModelInfer shares
    GetActivations'. batch_max_images 0 turns batching off: each request runs alone. Their
    queues and the compute slots' share one max_queue (ComputeSlots.waiting)."""

    activations: Batcher[PreparedActivations, ActivationResult]
    projections: Batcher[PreparedProjection, ProjectionResult]
    learned_inversions: Batcher[PreparedInversion, list[Event]]
    explanations: Batcher[PreparedExplanation, list[ExplainEvent]]


def create_batchers(
    settings: ServerSettings, slots: ComputeSlots, limits: RequestLimits, metrics: Metrics
) -> Batchers:
    def activations(
        items: Sequence[PreparedActivations], cancel: CancelToken
    ) -> list[ActivationResult | BaseException]:
        return run_activations(items, cancel, limits)

    def batcher(method: str, run: RunBatch[Item, Result]) -> Batcher[Item, Result]:
        return Batcher(
            run,
            slots,
            max_images=max(settings.batch_max_images, 1),
            max_delay=settings.batch_delay_ms / 1000 if settings.batch_max_images else 0.0,
            on_batch=_observer(metrics, method),
        )

    return Batchers(
        batcher("GetActivations", activations),
        batcher("ProjectToClassSpace", run_projections),
        batcher("Invert", run_learned),
        batcher("Explain", run_explanations),
    )


def _observer(metrics: Metrics, method: str) -> Callable[[str, int, float], None]:
    def observe(model: str, images: int, delay: float) -> None:
        labelled(metrics.batch_images, method, model).observe(images)
        labelled(metrics.batch_delay, method, model).observe(delay)

    return observe
