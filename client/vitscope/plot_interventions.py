"""Patching heatmaps drawn with matplotlib (imported only when a plot is drawn)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from vitscope.interventions import Intervention


def patching_maps(result: Intervention, normalized: bool = True) -> np.ndarray:
    """The sweep's metric averaged over images, [blocks, grid_h, grid_w]: the normalized
    effect where the source differs from the base, else the raw metric."""
    values = result.mean_normalized if normalized and result.normalized is not None else None
    if values is None or np.isnan(values).all():
        values = result.mean_values
    if values is None:
        raise ValueError("the result holds no sweep")
    return np.asarray(values)


def plot_patching(result: Intervention, path: Path, title: str = "") -> Path:
    """One heatmap per block on the patch grid, on one shared color scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    maps = patching_maps(result)
    blocks = result.sweep_blocks or tuple(range(maps.shape[0]))
    columns = min(6, len(blocks))
    rows = math.ceil(len(blocks) / columns)
    limit = float(np.nanmax(np.abs(maps))) or 1.0
    figure, axes = plt.subplots(
        rows, columns, figsize=(2.2 * columns, 2.2 * rows + 0.6), dpi=100, squeeze=False
    )
    image = None
    for axis, block, values in zip(axes.flat, blocks, maps, strict=False):
        image = axis.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit)
        axis.set_title(f"block {block}", fontsize=8)
        axis.set_xticks([])
        axis.set_yticks([])
    for axis in list(axes.flat)[len(blocks) :]:
        axis.axis("off")
    if image is not None:
        figure.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8)
    figure.suptitle(title or "Activation patching: normalized effect per patch position")
    figure.savefig(path)
    plt.close(figure)
    return path
