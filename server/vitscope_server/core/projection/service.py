"""ProjectToClassSpace takes one path: every check that needs no image but their number, the
memory estimate and admission, one decode, one submission (one forward, shared with
concurrent callers), and the result."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from vitscope_server.core.model.images import ImageInput
from vitscope_server.core.model.loading import LoadedModel
from vitscope_server.core.projection.estimate import projection_bytes
from vitscope_server.core.projection.project import (
    PreparedProjection,
    ProjectionLimits,
    ProjectionQuery,
    ProjectionResult,
    check_projection,
    prepare_projection,
    projection_batch_key,
)
from vitscope_server.core.runtime.batching import Batcher, BatchInfo
from vitscope_server.core.runtime.budget import MemoryBudget
from vitscope_server.core.runtime.cancel import CancelToken


@dataclass(frozen=True)
class ProjectionService:
    budget: MemoryBudget
    batcher: Batcher[PreparedProjection, ProjectionResult]
    limits: ProjectionLimits

    @contextmanager
    def serve(
        self,
        loaded: LoadedModel,
        images: list[ImageInput],
        query: ProjectionQuery,
        cancel: CancelToken,
    ) -> Iterator[tuple[ProjectionResult, BatchInfo]]:
        """The projection and its batch; its memory stays reserved while the caller sends it
        (the body of the block)."""
        checked = check_projection(loaded, query, len(images), self.limits)
        need = projection_bytes(loaded.adapter, images, query, self.limits.max_pixels)
        with self.budget.reserve(need, cancel):
            with self.batcher.arriving(loaded.spec.name) as arrival:
                prepared = prepare_projection(loaded, images, checked, self.limits)
                key = projection_batch_key(prepared)
                result, info = self.batcher.submit(
                    arrival, key, prepared, int(prepared.pixels.shape[0]), cancel
                )
            yield result, info
