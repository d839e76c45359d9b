"""Demo page for feature visualization: optimized images of a few MLP hidden units of the
model beside the sample digits that excite them most (Ghiasi et al. 2022)."""

from __future__ import annotations

from pathlib import Path

from vitscope.cli_features import feature_grid
from vitscope.client import Client
from vitscope.figures import Figure, sample_digits

FEATURES = 4
TOP_K = 3


def feature_visualizations(client: Client, model: str, out: Path) -> list[Figure]:
    """The paper's recipe at its defaults (400 steps), all features in one request."""
    digits = sample_digits()
    images = [image for _, image in digits]
    described = client.describe(model)
    block = described.block_count // 2
    site = f"blocks.{block}.mlp.hidden"
    # Evenly spaced units: picking those the digits excite most would favor the digits.
    width = int(described.sites[site]["shape"][-1])
    channels = [i * width // FEATURES for i in range(FEATURES)]
    result = client.optimize_features(
        [(site, c) for c in channels], model=model, seed=0, timeout=600
    )
    tops = client.top_activating_images(site, channels, images=images, top_k=TOP_K, model=model)
    figure = feature_grid(
        [f.image for f in result.features],
        [f.patch_map for f in result.features],
        [f"unit {f.channel} {f.objective:.2f}" for f in result.features],
        tops,
        digits,
    )
    file = f"features_block{block}.png"
    figure.save(out / file)
    steps = result.parameters["steps"]
    return [
        Figure(
            file,
            f"Feature visualizations of evenly spaced MLP hidden units {channels} in block {block} "
            f"of {model} "
            f"({steps} steps, seed 0, paper defaults), each with its patch map and its "
            f"{TOP_K} most exciting sample digits (patch maps over them; numbers are mean "
            "activations over patch tokens).",
        )
    ]
