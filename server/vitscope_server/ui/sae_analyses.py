"""What the SAE page computes: the SAE's metrics (EvaluateSae) and its latents' statistics
over the sample patches (GetActivations on the latent site), through the in-process client."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from vitscope import Client
from vitscope.sae import SaeEvaluationProgress
from vitscope_server.core.runtime import errors
from vitscope_server.ui.images import StoredImage
from vitscope_server.ui.jobs import Job


def latent_site(site: str, sae: str) -> str:
    """The site whose channels are the SAE's latents (docs/sae.md)."""
    return f"{site}@sae:{sae}"


def served_sae(client: Client, model: str, sae: str) -> dict[str, Any]:
    """The SAE as DescribeModel lists it; NOT_FOUND naming `sae` when the model serves none."""
    saes = client.describe(model).saes
    if sae not in saes:
        raise errors.NotFound(
            errors.Reason.SITE_NOT_FOUND,
            sae,
            f"sae: model {model} serves no SAE {errors.quote(sae)}; its SAEs: {sorted(saes)}",
            field="sae",
        )
    return saes[sae]


def evaluation(
    client: Client, job: Job, model: str, sae: str, images: Sequence[StoredImage]
) -> dict[str, Any]:
    """FVU, L0, dead and dense fractions, the frequency histogram and the splicing metrics."""

    def on_progress(event: SaeEvaluationProgress) -> None:
        done = f"{event.images_done} of {event.images_total} images"
        job.progress(event.images_done, event.images_total, done)

    result = client.evaluate_sae(
        [i.data for i in images], sae, model=model, on_progress=on_progress
    )
    return dataclasses.asdict(result)


def latents(client: Client, model: str, sae: str, images: Sequence[StoredImage]) -> dict[str, Any]:
    """Each latent's firing frequency, mean and max over every patch of the images."""
    info = served_sae(client, model, sae)
    site = latent_site(info["site"], sae)
    width = int(info["width"])
    result = client.activations(
        [i.data for i in images],
        [site],
        model=model,
        reduction="patch_map",
        channels=list(range(width)),
    )
    values = result[site].astype(np.float64)
    per_latent = np.moveaxis(values, 1, 0).reshape(width, -1)
    return {
        "site": site,
        "patches": int(per_latent.shape[1]),
        "frequency": (per_latent > 0).mean(axis=1).tolist(),
        "mean": per_latent.mean(axis=1).tolist(),
        "max": per_latent.max(axis=1).tolist(),
    }
