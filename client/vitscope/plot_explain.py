"""Explanation figures: overlays side by side with deletion and insertion curves, drawn with
matplotlib (imported only when a figure is drawn)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vitscope.explain import Explanation, Faithfulness, ImageExplanation

_KINDS = (("deletion", "lower is better"), ("insertion", "higher is better"))


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fractions(patch_counts: list[int]) -> np.ndarray:
    return np.asarray(patch_counts, dtype=float) / max(1, patch_counts[-1])


def _draw_curves(
    axes: Any, patch_counts: list[int], series: dict[str, list[Faithfulness | None]]
) -> None:
    """One axis per kind; per series the mean curve over its images, AUC in the legend."""
    x = _fractions(patch_counts)
    for axis, (kind, hint) in zip(axes, _KINDS, strict=True):
        for label, pairs in series.items():
            present = [getattr(p, kind) for p in pairs if p is not None]
            if not present:
                continue
            mean = np.mean([c.probabilities for c in present], axis=0)
            auc = float(np.mean([c.auc for c in present]))
            style = ":" if label == "random" else "-"
            axis.plot(x, mean, style, label=f"{label} (AUC {auc:.3f})")
        axis.set_xlabel(f"fraction of patches {'removed' if kind == 'deletion' else 'added'}")
        axis.set_ylabel("target probability")
        axis.set_ylim(-0.02, 1.02)
        axis.set_title(f"{kind} ({hint})", fontsize=9)
        axis.legend(fontsize=7, loc="best")


def _series(images: list[ImageExplanation]) -> dict[str, list[Faithfulness | None]]:
    methods = list(images[0].maps)
    series: dict[str, list[Faithfulness | None]] = {
        m: [image.maps[m].faithfulness for image in images] for m in methods
    }
    series["random"] = [image.random_order for image in images]
    return series


def plot_image_explanation(
    image: ImageExplanation, original: Image.Image, patch_counts: list[int], path: Path
) -> Path:
    """The input and each method's overlay on the top row; deletion and insertion curves
    (when measured) below."""
    plt = _pyplot()
    methods = list(image.maps)
    curves = bool(patch_counts)
    columns = max(len(methods) + 1, 2)
    figure = plt.figure(figsize=(2.2 * columns, 5.4 if curves else 2.6), dpi=100)
    grid = figure.add_gridspec(
        2 if curves else 1, columns, height_ratios=[1, 1.3] if curves else [1]
    )
    tiles = [("input", original)] + [
        (m, Image.open(io.BytesIO(image.maps[m].overlay_png))) for m in methods
    ]
    for column, (label, picture) in enumerate(tiles):
        axis = figure.add_subplot(grid[0, column])
        axis.imshow(np.asarray(picture.convert("RGB")), interpolation="nearest")
        axis.set_title(label, fontsize=9)
        axis.axis("off")
    if curves:
        half = columns // 2
        axes = [figure.add_subplot(grid[1, :half]), figure.add_subplot(grid[1, half:])]
        _draw_curves(axes, patch_counts, _series([image]))
    prediction = image.prediction.get("class_name", "?")
    figure.suptitle(f"target {image.target_name} (prediction {prediction})", fontsize=10)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def plot_mean_curves(result: Explanation, path: Path, title: str) -> Path:
    """Deletion and insertion curves averaged over every image, per method and at random."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    _draw_curves(axes, result.patch_counts, _series(result.images))
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
