"""GetActivations and ModelInfer take one path: every check before any decode, the memory
estimate and admission, one decode, one submission of all of a caller's queries (one forward
for all of them, shared with concurrent callers), and the result views."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from vitscope_server.core.activations.compute import (
    ActivationQuery,
    ActivationResult,
    PreparedActivations,
    batch_key,
    check_query,
)
from vitscope_server.core.activations.estimate import activations_bytes
from vitscope_server.core.model.images import ImageInput, prepare_batch
from vitscope_server.core.model.loading import LoadedModel
from vitscope_server.core.runtime.batching import Batcher, BatchInfo
from vitscope_server.core.runtime.budget import MemoryBudget
from vitscope_server.core.runtime.cancel import CancelToken
from vitscope_server.core.runtime.limits import RequestLimits
from vitscope_server.core.runtime.stages import Stage, StageTimes


@dataclass(frozen=True)
class Served:
    """One result per query, in order, with the batch's shape and the request's stages."""

    results: list[ActivationResult]
    info: BatchInfo
    stages: StageTimes


@dataclass(frozen=True)
class ActivationService:
    budget: MemoryBudget
    batcher: Batcher[PreparedActivations, ActivationResult]
    limits: RequestLimits

    @contextmanager
    def serve(
        self,
        loaded: LoadedModel,
        images: list[ImageInput],
        queries: Sequence[ActivationQuery],
        cancel: CancelToken,
    ) -> Iterator[Served]:
        """Runs the queries over the images; their memory stays reserved while the caller
        sends the results (the body of the block)."""
        checked = [check_query(loaded, query) for query in queries]
        sites = [site for _, query_sites in checked for site in query_sites]
        need = activations_bytes(
            loaded.adapter,
            loaded.site_shapes,
            images,
            [site.name for site in sites],
            self.limits.max_pixels,
        )
        stages = StageTimes()
        with self.budget.reserve(need, cancel):
            with self.batcher.arriving(loaded.spec.name) as arrival:
                pixels = prepare_batch(
                    loaded.adapter,
                    images,
                    self.limits.max_batch,
                    self.limits.max_pixels,
                    stages=stages,
                )
                items = [PreparedActivations(loaded, q, s, pixels) for q, s in checked]
                results, info = self.batcher.submit_all(
                    arrival, _shared_key(items), items, int(pixels.shape[0]), cancel
                )
            stages.add(Stage.QUEUE, info.waited)
            stages.update(results[0].stages)
            yield Served(results, info, stages)


def _shared_key(items: Sequence[PreparedActivations]) -> object:
    """The batch key of all the items together: theirs when they agree, else one of its own
    (they then run as a batch of their own, still in one forward)."""
    keys = {batch_key(item) for item in items}
    return keys.pop() if len(keys) == 1 else object()
