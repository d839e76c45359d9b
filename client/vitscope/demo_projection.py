"""Demo figures for class-embedding projection: identifiability by depth and importance maps."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from vitscope.client import Client
from vitscope.figures import Figure
from vitscope.overlay import grid
from vitscope.plot_projection import plot_identifiability

RANDOM_TWIN_SUFFIX = "-random"
# The built-in average-pooled sibling of a model, when served (vitscope-digits-gap).
POOLED_SIBLING_SUFFIX = "-gap"


def projection_figures(
    client: Client, model: str, out: Path, digits: list[tuple[str, Image.Image]]
) -> list[Figure]:
    """The model (and its random twin, when served) projected on held-out digits, true labels as targets."""
    images = [image for _, image in digits]
    targets = [int(name[0]) for name, _ in digits]
    served = {m.name for m in client.list_models()}
    twin = model + RANDOM_TWIN_SUFFIX
    results = {
        name: client.project(images, model=name, targets=targets, importance_maps=name == model)
        for name in ([model, twin] if twin in served else [model])
    }
    curve = "projection_identifiability.png"
    plot_identifiability(
        results, out / curve, title=f"Class identifiability by depth ({len(images)} digits)"
    )
    tiles, captions = [], []
    for (name, image), projected in zip(digits, results[model].images, strict=True):
        assert projected.importance is not None
        overlay = Image.open(io.BytesIO(projected.importance.overlay_png))
        tiles.append([image, overlay])
        captions.append([name[:1], f"-> {projected.prediction.get('class_name', '?')}"])
    maps = "projection_importance.png"
    grid(tiles, captions, tile=112).save(out / maps)
    compared = f" and its random twin {twin} (orange)" if twin in served else ""
    figures = [
        Figure(
            curve,
            f"Tokens of {model}{compared} projected to class space after each block: % of patch "
            "tokens whose top class is the true digit, and the class token's identifiability.",
        ),
        Figure(
            maps,
            f"Which patches matter for the true digit in {model}: attention-gradient importance "
            "maps summed over heads and blocks (brighter = more important).",
        ),
    ]
    pooled = model + POOLED_SIBLING_SUFFIX
    if pooled in served:
        pooled_twin = pooled + RANDOM_TWIN_SUFFIX
        pooled_results = {
            name: client.project(images, model=name, targets=targets)
            for name in ([pooled, pooled_twin] if pooled_twin in served else [pooled])
        }
        pooled_curve = "projection_identifiability_gap.png"
        plot_identifiability(
            pooled_results,
            out / pooled_curve,
            title=f"Average-pooled: class identifiability by depth ({len(images)} digits)",
        )
        figures.append(
            Figure(
                pooled_curve,
                f"The same network pooled by global average ({pooled}, no class token) against "
                "its random twin: every patch token feeds the classifier, and as in the paper "
                "their identifiability rises with depth.",
            )
        )
    return figures
