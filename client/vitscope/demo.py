"""`vitscope demo`: calls the server's RPCs on its default model and writes pictures plus an index.html.

Each inspection method adds its own figures here; the page lists them with one-line captions.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
from PIL import Image

from vitscope.client import Client
from vitscope.demo_explain import explanation_figures
from vitscope.demo_features import feature_visualizations
from vitscope.demo_interventions import intervention_figures
from vitscope.demo_inversion import inversion_figures
from vitscope.demo_projection import projection_figures
from vitscope.demo_sae import sae_figures
from vitscope.figures import Figure, sample_digits, strongest_channels
from vitscope.overlay import grid, heatmap_overlay


def activation_maps(
    client: Client, model: str, out: Path, digits: list[tuple[str, Image.Image]]
) -> list[Figure]:
    """Patch-wise activation maps of a few MLP hidden units, over a few digits, in an early and a late block."""
    described = client.describe(model)
    images = [image for _, image in digits]
    figures = []
    last = described.block_count - 1
    for block in sorted({min(1, last), max(0, last - 1)}):
        site = f"blocks.{block}.mlp.hidden"
        channels = strongest_channels(client, model, images, site, count=4)
        result = client.activations(
            images,
            [site],
            model=model,
            reduction="patch_map",
            channels=channels,
            top_predictions=1 if described.class_names else 0,
        )
        maps = result[site]
        tiles, captions = [], []
        for index, (name, image) in enumerate(digits):
            predicted = result.predictions[index][0].class_name if result.predictions else "?"
            tiles.append(
                [image] + [heatmap_overlay(image, maps[index, c]) for c in range(len(channels))]
            )
            captions.append([f"{name[:1]} -> {predicted}"] + [f"unit {c}" for c in channels])
        file = f"patch_maps_block{block}.png"
        grid(tiles, captions, tile=112).save(out / file)
        figures.append(
            Figure(
                file,
                f"Patch-wise activation maps of MLP hidden units {channels} in block {block} of {model} "
                f"(rows: digit -> prediction; brighter = stronger).",
            )
        )
    return figures


def write_index(out: Path, model: str, figures: list[Figure]) -> Path:
    items = "\n".join(
        f'<figure><img src="{html.escape(f.file)}" alt="{html.escape(f.caption)}">'
        f"<figcaption>{html.escape(f.caption)}</figcaption></figure>"
        for f in figures
    )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>vitscope demo</title>"
        "<style>body{font-family:sans-serif;margin:2em}img{max-width:100%;image-rendering:pixelated}"
        "figure{margin:0 0 2em 0}</style></head>"
        f"<body><h1>vitscope demo: {html.escape(model)}</h1>\n{items}\n</body></html>\n"
    )
    path = out / "index.html"
    path.write_text(page)
    return path


def run_demo(client: Client, out: Path, model: str = "", digits: int = 6) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    model = model or next(m.name for m in client.list_models() if m.is_default)
    chosen = sample_digits()[:digits]
    figures = activation_maps(client, model, out, chosen)
    figures += feature_visualizations(client, model, out)
    figures += projection_figures(client, model, out, chosen)
    figures += inversion_figures(client, model, out, chosen)
    figures += explanation_figures(client, model, out, chosen)
    figures += intervention_figures(client, model, out, chosen)
    figures += sae_figures(client, model, out)
    for figure in figures:
        if np.asarray(Image.open(out / figure.file)).std() == 0:
            raise RuntimeError(f"{figure.file} came out blank")
    return write_index(out, model, figures)
