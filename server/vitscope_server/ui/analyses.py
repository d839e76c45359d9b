"""What each page section computes: one typed-client call (or two) and its result as JSON.

Every function takes the in-process client (`local_client`), so its numbers are exactly what
the RPC returns for the same request; the job reports progress and carries the cancel token.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from vitscope import Client
from vitscope import interventions as iv
from vitscope.explain import ExplainProgress
from vitscope.features import OptimizationProgress
from vitscope.inversion import InversionProgress
from vitscope.top_images import TopImage
from vitscope_server.transport.png import heatmap_png, png
from vitscope_server.ui.images import StoredImage
from vitscope_server.ui.jobs import Job

HISTOGRAM_BINS = 24
TOP_K = 5
PREDICTIONS = 5
_MLP_HIDDEN = re.compile(r"blocks\.(\d+)\.mlp\.hidden")


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def overlay_png(picture: Image.Image, patch_map: np.ndarray) -> bytes:
    """The patch map, bilinearly upsampled to the picture, drawn over it as the RPCs draw
    their heatmaps."""
    values = Image.fromarray(np.asarray(patch_map, dtype=np.float32), mode="F")
    upsampled = np.asarray(values.resize(picture.size, Image.Resampling.BILINEAR))
    return heatmap_png(np.asarray(picture), upsampled)


def grid_list(values: np.ndarray) -> list[list[float]]:
    return [[float(v) for v in row] for row in np.asarray(values, dtype=np.float64)]


def finite_grid(values: np.ndarray) -> list[list[float | None]]:
    """A grid as JSON allows it: NaN (an undefined normalized effect) becomes null."""
    return [[v if np.isfinite(v) else None for v in row] for row in grid_list(values)]


@dataclass(frozen=True)
class Unit:
    model: str
    site: str
    channel: int


def visualization(client: Client, job: Job, unit: Unit, steps: int) -> dict[str, Any]:
    """The unit's optimized image (OptimizeFeatures), with progress every few steps."""

    def on_progress(event: OptimizationProgress) -> None:
        job.progress(event.step, steps, f"step {event.step} of {steps}")

    result = client.optimize_features(
        [(unit.site, unit.channel)],
        model=unit.model,
        steps=steps,
        progress_every=max(steps // 16, 1),
        on_progress=on_progress,
    )
    feature = result.features[0]
    return {
        "png": data_url(feature.png),
        "objective": feature.objective,
        "parameters": result.parameters,
    }


def _top_image(found: TopImage, picture: Image.Image, name: str) -> dict[str, Any]:
    return {
        "index": found.index,
        "name": name,
        "score": found.score,
        "patch_map": grid_list(found.patch_map),
        "overlay": data_url(overlay_png(picture, found.patch_map)),
    }


def top_images(
    client: Client, unit: Unit, images: Sequence[StoredImage], folder: str, read_folder_image: Any
) -> dict[str, Any]:
    """The top images of the unit (TopActivatingImages) over the samples or a folder, each
    with its patch map drawn over it."""
    result = client.top_activating_images(
        unit.site,
        [unit.channel],
        images=[] if folder else [i.data for i in images],
        image_folder=folder,
        top_k=TOP_K,
        model=unit.model,
    )
    found = []
    for top in result.channels.get(unit.channel, []):
        if folder:
            name, picture = top.path, read_folder_image(folder, top.path)
        else:
            name, picture = images[top.index].id, images[top.index].picture()
        found.append(_top_image(top, picture, name))
    return {"scanned": result.scanned_image_count, "images": found}


def histogram(client: Client, unit: Unit, images: Sequence[StoredImage]) -> dict[str, Any]:
    """The unit's activation over every patch of the images (GetActivations, patch_map)."""
    result = client.activations(
        [i.data for i in images],
        [unit.site],
        model=unit.model,
        reduction="patch_map",
        channels=[unit.channel],
    )
    values = result[unit.site].astype(np.float64).ravel()
    counts, edges = np.histogram(values, bins=HISTOGRAM_BINS)
    return {
        "counts": counts.tolist(),
        "edges": edges.tolist(),
        "count": int(values.size),
        "mean": float(values.mean()),
        "min": float(values.min()),
        "max": float(values.max()),
    }


def class_effects(client: Client, unit: Unit) -> dict[str, Any]:
    """An MLP hidden unit's value vector in class space (ProjectMemories): its top classes."""
    match = _MLP_HIDDEN.fullmatch(unit.site)
    if match is None:
        return {"available": False, "why": "class effects are defined for blocks.{i}.mlp.hidden"}
    memories = client.project_memories(
        int(match.group(1)), model=unit.model, kinds=["mlp"], top_k=TOP_K
    )
    mlp = memories.memories["mlp"]
    if not 0 <= unit.channel < mlp.memory_count:
        return {"available": False, "why": f"the block has {mlp.memory_count} MLP memories"}
    classes = mlp.top_classes[unit.channel]
    scores = mlp.top_class_scores[unit.channel]
    return {
        "available": True,
        "classes": [
            {"index": int(c), "name": memories.class_names[int(c)], "score": float(s)}
            for c, s in zip(classes, scores, strict=True)
        ],
    }


def predictions(client: Client, model: str, image: StoredImage) -> dict[str, Any]:
    """The model's top predictions (GetActivations with top_predictions)."""
    result = client.activations(
        [image.data], ["final"], model=model, reduction="mean", top_predictions=PREDICTIONS
    )
    return {
        "predictions": [
            {"index": p.class_index, "name": p.class_name, "probability": p.probability}
            for p in result.predictions[0]
        ]
    }


def identifiability(client: Client, model: str, image: StoredImage) -> dict[str, Any]:
    """Per block: the share of patch tokens whose projection names the prediction, and the
    class token's rank (ProjectToClassSpace)."""
    result = client.project([image.data], model=model)
    projected = result.images[0]
    return {
        "target": projected.target_name,
        "blocks": [
            {
                "block": int(b.get("block", 0)),
                "identifiable_patch_percent": float(b.get("identifiable_patch_percent", 0.0)),
                "cls_rank": int(b.get("cls_rank", 0)),
            }
            for b in projected.blocks
        ],
    }


def explanations(
    client: Client, job: Job, model: str, image: StoredImage, methods: Sequence[str]
) -> dict[str, Any]:
    """Attribution maps with deletion and insertion curves (Explain with faithfulness)."""

    def on_progress(event: ExplainProgress) -> None:
        job.progress(event.completed, event.total, f"{event.method}: {event.completed}")

    result = client.explain(
        [image.data], list(methods), model=model, faithfulness=True, on_progress=on_progress
    )
    explained = result.images[0]
    maps = []
    for name, found in explained.maps.items():
        curves = found.faithfulness
        maps.append(
            {
                "method": name,
                "overlay": data_url(found.overlay_png),
                "deletion": curves.deletion.probabilities if curves else [],
                "deletion_auc": curves.deletion.auc if curves else None,
                "insertion": curves.insertion.probabilities if curves else [],
                "insertion_auc": curves.insertion.auc if curves else None,
            }
        )
    return {
        "target": explained.target_name,
        "target_probability": explained.target_probability,
        "patch_counts": result.patch_counts,
        "maps": maps,
    }


def inversion(client: Client, job: Job, model: str, image: StoredImage) -> dict[str, Any]:
    """The image rebuilt from every depth the model's learned inverter reaches (Invert)."""
    inverters = client.list_inverters(model)
    if not inverters:
        return {"available": False, "why": "no learned inverter is served for this model"}
    depths = list(range(inverters[0].max_depth + 1))

    def on_progress(event: InversionProgress) -> None:
        job.progress(event.step, event.total_steps, f"depth {event.depth}")

    result = client.invert([image.data], depths, model=model, on_progress=on_progress)
    strip = []
    for depth in sorted(result.reconstructions):
        rebuilt = result.reconstructions[depth]
        strip.append(
            {
                "depth": depth,
                "site": rebuilt.site,
                "png": data_url(png(np.asarray(rebuilt.images[0]))),
                "mse": rebuilt.mse[0] if rebuilt.mse else None,
                "psnr": rebuilt.psnr[0] if rebuilt.psnr else None,
            }
        )
    return {"available": True, "strip": strip}


@dataclass(frozen=True)
class Ablation:
    """What a click on the image page zeroes: one patch's token in the residual stream after
    block `block`, or one head of that block."""

    block: int
    row: int | None = None
    column: int | None = None
    head: int | None = None

    def what(self) -> str:
        if self.head is not None:
            return f"head {self.head} of block {self.block}"
        return f"patch ({self.row}, {self.column}) after block {self.block}"

    def edit(self) -> Any:
        if self.head is not None:
            return iv.edit(f"blocks.{self.block}.attn.heads", "zero", heads=[self.head])
        position = (self.row or 0, self.column or 0)
        return iv.edit(f"blocks.{self.block}.out", "zero", tokens="positions", positions=[position])


def _ranked(predictions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"index": p["class_index"], "name": p["class_name"], "probability": p["probability"]}
        for p in predictions
    ]


def _base_and_ablated(
    client: Client, model: str, images: Sequence[bytes], edit: Any, top_k: int
) -> iv.Intervention:
    """The plain forward (an empty variant) and the edited one, with the probability of the
    plain forward's prediction (Intervene's default target without a source)."""
    return client.intervene(
        images,
        [iv.variant([], "base"), iv.variant([edit], "ablated")],
        model=model,
        metric="target_probability",
        top_k=top_k,
    )


def ablation(client: Client, model: str, image: StoredImage, ablated: Ablation) -> dict[str, Any]:
    """The top predictions and the target's probability with and without the ablation."""
    result = _base_and_ablated(client, model, [image.data], ablated.edit(), PREDICTIONS)
    base, edited = result.variants
    assert base.metric is not None and edited.metric is not None
    return {
        "site": ablated.edit().site,
        "what": ablated.what(),
        "target": result.class_names[result.target_classes[0]],
        "base_probability": float(base.metric[0]),
        "ablated_probability": float(edited.metric[0]),
        "base": _ranked(base.predictions[0]),
        "ablated": _ranked(edited.predictions[0]),
    }


def unit_ablation(client: Client, unit: Unit, images: Sequence[StoredImage]) -> dict[str, Any]:
    """The unit's channel zeroed at its site on every sample: each one's prediction and the
    probability of its plain prediction, before and after."""
    edit = iv.edit(unit.site, "zero", channels=[unit.channel])
    result = _base_and_ablated(client, unit.model, [i.data for i in images], edit, 1)
    base, edited = result.variants
    assert base.metric is not None and edited.metric is not None
    rows: list[dict[str, Any]] = [
        {
            "image": stored.id,
            "base": _ranked(base.predictions[n])[0],
            "ablated": _ranked(edited.predictions[n])[0],
            "base_probability": float(base.metric[n]),
            "ablated_probability": float(edited.metric[n]),
        }
        for n, stored in enumerate(images)
    ]
    return {
        "images": rows,
        "changed": sum(r["base"]["index"] != r["ablated"]["index"] for r in rows),
        "mean_change": float(np.mean(edited.metric.astype(np.float64) - base.metric)),
    }


def patching(
    client: Client,
    job: Job,
    model: str,
    image: StoredImage,
    source: StoredImage,
    variants_per_forward: int | None,
) -> dict[str, Any]:
    """The residual stream patched from `source` into the image at every block and patch
    position (a patching sweep): the normalized effect per block over the grid."""

    def on_progress(event: iv.Progress) -> None:
        job.progress(event.completed, event.total, f"{event.completed} of {event.total} patches")

    result = client.patching_sweep(
        [image.data],
        [source.data],
        model=model,
        variants_per_forward=variants_per_forward,
        on_progress=on_progress,
    )
    assert result.normalized is not None and result.values is not None
    assert result.base_metric is not None and result.source_metric is not None
    blocks = result.sweep_blocks or tuple(range(result.normalized.shape[1]))
    return {
        "source": source.id,
        "metric": result.metric,
        "target": result.class_names[result.target_classes[0]],
        "other": result.class_names[result.other_classes[0]],
        "base_metric": float(result.base_metric[0]),
        "source_metric": float(result.source_metric[0]),
        "blocks": [
            {"block": block, "normalized": finite_grid(result.normalized[0, n])}
            for n, block in enumerate(blocks)
        ],
    }
