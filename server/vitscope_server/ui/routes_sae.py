"""The SAE page's endpoints: its metrics and its latents, each a job like the unit's
sections (progress, cancellation, the finished job as the cache)."""

from __future__ import annotations

from enum import Enum
from typing import Any

from fastapi import APIRouter

from vitscope_server.ui import sae_analyses
from vitscope_server.ui.explorer import Explorer
from vitscope_server.ui.jobs import Job, Work


class SaeAnalysis(str, Enum):
    evaluation = "evaluation"
    latents = "latents"


def _sae_work(explorer: Explorer, model: str, sae: str, analysis: SaeAnalysis) -> Work:
    samples = list(explorer.images.samples.values())

    def work(job: Job) -> dict[str, Any]:
        client = explorer.client(job.cancel)
        if analysis is SaeAnalysis.evaluation:
            return sae_analyses.evaluation(client, job, model, sae, samples)
        return sae_analyses.latents(client, model, sae, samples)

    return work


def sae_router(explorer: Explorer) -> APIRouter:
    router = APIRouter(prefix="/api")

    @router.post("/models/{model}/saes/{sae}/{analysis}", summary="Start an SAE job")
    async def sae_job(model: str, sae: str, analysis: SaeAnalysis) -> dict[str, Any]:
        key = ("sae", model, sae, analysis)
        work = _sae_work(explorer, model, sae, analysis)
        return explorer.jobs.start(key, analysis.value, work).view()

    return router
