"""Identifiability against depth, drawn with matplotlib (imported only when a plot is drawn)."""

from __future__ import annotations

from pathlib import Path

from vitscope.projection import ClassProjection


def identifiability_curves(result: ClassProjection) -> tuple[list[int], list[float], list[float]]:
    """Blocks, % identifiable patch tokens (mean over images) and the class token's mean r (%)."""
    blocks = [int(b["block"]) for b in result.dataset]
    patches = [float(b["mean_identifiable_patch_percent"]) for b in result.dataset]
    classes = len(result.class_names)
    cls = []
    for index in range(len(blocks)):
        ranks = [image.blocks[index]["cls_rank"] for image in result.images]
        cls.append(
            100.0 * sum(1.0 - r / classes for r in ranks) / len(ranks)
            if ranks[0] >= 0
            else float("nan")
        )
    return blocks, patches, cls


def plot_identifiability(results: dict[str, ClassProjection], path: Path, title: str = "") -> Path:
    """One line per model for patch tokens (solid) and the class token (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4), dpi=100)
    for (name, result), color in zip(
        results.items(), ("tab:blue", "tab:orange", "tab:green"), strict=False
    ):
        blocks, patches, cls = identifiability_curves(result)
        axis.plot(blocks, patches, "o-", color=color, label=f"{name}: % identifiable patch tokens")
        axis.plot(blocks, cls, "s--", color=color, label=f"{name}: class token r x 100")
    chance = 100.0 / max(1, len(next(iter(results.values())).class_names))
    axis.axhline(chance, color="grey", linewidth=0.8, linestyle=":", label="top-1 by chance")
    axis.set_xlabel("block")
    axis.set_ylabel("%")
    axis.set_ylim(-2, 102)
    axis.set_title(title or "Class identifiability by depth")
    axis.legend(fontsize=7, loc="best")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
