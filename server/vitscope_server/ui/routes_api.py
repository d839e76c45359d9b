"""The explorer's JSON endpoints (OpenAPI at /openapi.json): quick reads answer at once; long
work starts a job, which the page polls (long polling) and may cancel."""

from __future__ import annotations

import asyncio
import dataclasses
from enum import Enum
from typing import Any

from fastapi import APIRouter, Query, Request, Response

from vitscope import Client
from vitscope_server.core.runtime import errors
from vitscope_server.ui import analyses
from vitscope_server.ui.analyses import Ablation, Unit
from vitscope_server.ui.explorer import Explorer
from vitscope_server.ui.jobs import Job, Work

LONG_POLL_SECONDS = 20.0
# A job's progress reaches a polling page at most this often; its end at once.
PROGRESS_SECONDS = 0.25
DEFAULT_STEPS = 128


class UnitAnalysis(str, Enum):
    visualization = "visualization"
    top_images = "top_images"
    histogram = "histogram"
    class_effects = "class_effects"
    ablation = "ablation"


class ImageAnalysis(str, Enum):
    predictions = "predictions"
    identifiability = "identifiability"
    explanations = "explanations"
    inversion = "inversion"
    ablation = "ablation"
    patching = "patching"


def _server(client: Client) -> dict[str, Any]:
    info = client.server_info()
    models = client.list_models()
    health = {m.name: client.health(m.name) for m in models}
    return {
        "server": dataclasses.asdict(info),
        "health": client.health(),
        "models": [{**dataclasses.asdict(m), "health": health[m.name]} for m in models],
    }


def _model(client: Client, model: str) -> dict[str, Any]:
    described = client.describe(model)
    inverters = client.list_inverters(described.info.name)
    return {
        **dataclasses.asdict(described),
        "inverters": [dataclasses.asdict(i) for i in inverters],
    }


def _unit_work(
    explorer: Explorer, unit: Unit, analysis: UnitAnalysis, steps: int, folder: str
) -> Work:
    samples = list(explorer.images.samples.values())

    def work(job: Job) -> dict[str, Any]:
        client = explorer.client(job.cancel)
        if analysis is UnitAnalysis.visualization:
            return analyses.visualization(client, job, unit, steps)
        if analysis is UnitAnalysis.top_images:
            return analyses.top_images(client, unit, samples, folder, explorer.read_folder_image)
        if analysis is UnitAnalysis.histogram:
            return analyses.histogram(client, unit, samples)
        if analysis is UnitAnalysis.ablation:
            return analyses.unit_ablation(client, unit, samples)
        return analyses.class_effects(client, unit)

    return work


@dataclasses.dataclass(frozen=True)
class ImageRequest:
    """An image job's parameters; each analysis reads its own (the rest stay at their
    defaults, so that they do not split the cache)."""

    methods: tuple[str, ...] = ()
    ablation: Ablation | None = None
    source: str = ""
    variants_per_forward: int | None = None


def _image_request(
    analysis: ImageAnalysis,
    methods: str,
    ablation: Ablation,
    source: str,
    variants_per_forward: int | None,
) -> ImageRequest:
    if analysis is ImageAnalysis.explanations:
        return ImageRequest(methods=tuple(m for m in methods.split(",") if m))
    if analysis is ImageAnalysis.ablation:
        if ablation.head is None and (ablation.row is None or ablation.column is None):
            raise errors.InvalidArgument(
                "head",
                "name a head, or a patch by row and column",
                reason=errors.Reason.FIELD_REQUIRED,
            )
        return ImageRequest(ablation=ablation)
    if analysis is ImageAnalysis.patching:
        if not source:
            raise errors.InvalidArgument(
                "source", "name the image to patch from", reason=errors.Reason.FIELD_REQUIRED
            )
        return ImageRequest(source=source, variants_per_forward=variants_per_forward)
    return ImageRequest()


def _image_work(
    explorer: Explorer, model: str, image_id: str, analysis: ImageAnalysis, request: ImageRequest
) -> Work:
    def work(job: Job) -> dict[str, Any]:
        client = explorer.client(job.cancel)
        image = explorer.images.get(image_id)
        if request.ablation is not None:
            return analyses.ablation(client, model, image, request.ablation)
        if analysis is ImageAnalysis.patching:
            source = explorer.images.get(request.source)
            return analyses.patching(
                client, job, model, image, source, request.variants_per_forward
            )
        if analysis is ImageAnalysis.predictions:
            return analyses.predictions(client, model, image)
        if analysis is ImageAnalysis.identifiability:
            return analyses.identifiability(client, model, image)
        if analysis is ImageAnalysis.explanations:
            return analyses.explanations(client, job, model, image, request.methods)
        return analyses.inversion(client, job, model, image)

    return work


def _watch_pairs(watch: str) -> list[tuple[str, int]]:
    pairs = []
    for part in filter(None, watch.split(",")):
        job, _, seen = part.partition(":")
        if not seen.lstrip("-").isdigit():
            raise errors.InvalidArgument("watch", f"{errors.quote(part)} is not ID:VERSION")
        pairs.append((job, int(seen)))
    if not pairs:
        raise errors.InvalidArgument(
            "watch", "name at least one ID:VERSION", reason=errors.Reason.FIELD_REQUIRED
        )
    return pairs


def _add_job_starts(router: APIRouter, explorer: Explorer) -> None:
    """The endpoints that start (or find, cached) a unit's or an image's job."""

    @router.post("/models/{model}/units/{site}/{channel}/{analysis}", summary="Start a unit job")
    async def unit_job(
        model: str,
        site: str,
        channel: int,
        analysis: UnitAnalysis,
        steps: int = Query(DEFAULT_STEPS, ge=1, le=4096),
        folder: str = "",
    ) -> dict[str, Any]:
        unit = Unit(model, site, channel)
        key = (
            "unit",
            unit,
            analysis,
            steps if analysis is UnitAnalysis.visualization else 0,
            folder if analysis is UnitAnalysis.top_images else "",
        )
        work = _unit_work(explorer, unit, analysis, steps, folder)
        return explorer.jobs.start(key, analysis.value, work).view()

    @router.post("/models/{model}/images/{image}/{analysis}", summary="Start an image job")
    async def image_job(
        model: str,
        image: str,
        analysis: ImageAnalysis,
        methods: str = "rollout,relevancy",
        block: int = 0,
        row: int | None = None,
        column: int | None = None,
        head: int | None = None,
        source: str = "",
        variants_per_forward: int | None = Query(None, ge=1, le=4096),
    ) -> dict[str, Any]:
        """ablation: `block` with `head`, or with `row` and `column` (a patch); patching:
        `source` (a sample or an upload) and optionally `variants_per_forward`."""
        explorer.images.get(image)
        ablation = Ablation(block, row, column, head)
        request = _image_request(analysis, methods, ablation, source, variants_per_forward)
        if request.source:
            explorer.images.get(request.source)
        key = ("image", model, image, analysis, request)
        work = _image_work(explorer, model, image, analysis, request)
        return explorer.jobs.start(key, analysis.value, work).view()


def api_router(explorer: Explorer) -> APIRouter:
    router = APIRouter(prefix="/api")

    @router.get("/server", summary="Versions, limits, models and their health")
    async def server() -> dict[str, Any]:
        return await explorer.call(_server)

    @router.get("/models/{model}", summary="A model's anatomy and its inverters")
    async def model(model: str) -> dict[str, Any]:
        return await explorer.call(lambda client: _model(client, model))

    @router.get("/images", summary="The built-in sample images")
    async def samples() -> dict[str, Any]:
        return {"samples": list(explorer.images.samples)}

    @router.post("/images", summary="Upload an image (the request body is the file)")
    async def upload(request: Request) -> dict[str, Any]:
        stored = explorer.images.add(await request.body())
        return {"id": stored.id}

    @router.get("/images/{image}", summary="An image's bytes as stored")
    async def image_bytes(image: str) -> Response:
        stored = explorer.images.get(image)
        return Response(stored.data, media_type=stored.media_type)

    _add_job_starts(router, explorer)

    @router.get("/jobs", summary="Several jobs' states; waits until one moves past its `seen`")
    async def jobs_state(watch: str) -> dict[str, Any]:
        """watch: ID:SEEN pairs, comma-separated (one request for every job of a page)."""
        watched = [(explorer.jobs.get(job), seen) for job, seen in _watch_pairs(watch)]
        waits = [
            asyncio.ensure_future(job.changed_after(seen, LONG_POLL_SECONDS, PROGRESS_SECONDS))
            for job, seen in watched
        ]
        _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for wait in pending:
            wait.cancel()
        return {"jobs": [job.view() for job, _ in watched]}

    @router.get("/jobs/{job}", summary="A job's state; waits for a change past `seen`")
    async def job_state(job: str, seen: int = -1) -> dict[str, Any]:
        found = explorer.jobs.get(job)
        await found.changed_after(seen, LONG_POLL_SECONDS, PROGRESS_SECONDS)
        return found.view()

    @router.delete("/jobs/{job}", summary="Cancel a job: the server's work stops")
    async def job_cancel(job: str) -> dict[str, Any]:
        found = explorer.jobs.get(job)
        found.cancel.cancel()
        return found.view()

    return router
