"""`vitscope visualize`: optimized feature images with their top activating images."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from PIL import Image

from vitscope.client import Client
from vitscope.features import (
    OPTIMIZERS,
    PARAMETERIZATIONS,
    SCHEDULES,
    OptimizationProgress,
)
from vitscope.overlay import grid, heatmap_overlay
from vitscope.top_images import TopImages

DEFAULT_STEPS = 400
SAMPLES = "samples"


def add_commands(commands: Any) -> None:
    visualize = commands.add_parser(
        "visualize", help="optimize images for features (Ghiasi et al.), with their top images"
    )
    visualize.add_argument("--model", default="")
    visualize.add_argument("--site", required=True, help="e.g. blocks.3.mlp.hidden")
    visualize.add_argument("--channel", type=int, nargs="+", required=True)
    visualize.add_argument("--out", type=Path, required=True, help="output folder")
    visualize.add_argument("--steps", type=int, help="default 400")
    visualize.add_argument("--lr", type=float, help="default 0.1 (timm) or 1.0 (open_clip)")
    visualize.add_argument(
        "--tv-weight", type=float, help="total-variation weight (default 0.0005, the paper's)"
    )
    visualize.add_argument("--copies", type=int, help="augmented copies (default 8)")
    visualize.add_argument("--seed", type=int, default=0)
    visualize.add_argument("--size", type=int, help="image size (default: the model's)")
    visualize.add_argument(
        "--parameterization",
        choices=list(PARAMETERIZATIONS),
        help="pixel (default, the paper's) or fourier (decorrelated-color spectrum)",
    )
    visualize.add_argument(
        "--schedule", choices=list(SCHEDULES), help="learning rate: cosine (default) or constant"
    )
    visualize.add_argument("--optimizer", choices=list(OPTIMIZERS), help="adam (default) or adamax")
    visualize.add_argument(
        "--dataset", help=f"folder of images, or {SAMPLES!r} (digits shipped with the client)"
    )
    visualize.add_argument("--top-k", type=int, default=4)


def run(client: Client, args: argparse.Namespace) -> bool:
    """Handles this module's commands; False for anyone else's."""
    if args.command == "visualize":
        _visualize(client, args)
    else:
        return False
    return True


def dataset_images(dataset: str) -> list[tuple[str, Image.Image]]:
    if dataset == SAMPLES:
        from vitscope.figures import sample_digits

        return sample_digits()
    files = sorted(
        p
        for p in Path(dataset).rglob("*")
        if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp"}
    )
    return [(p.name, Image.open(p).convert("RGB")) for p in files]


def feature_grid(
    images: list[Image.Image],
    maps: list[Any],
    labels: list[str],
    tops: TopImages | None,
    dataset: list[tuple[str, Image.Image]],
) -> Image.Image:
    """One row per feature: its optimized image, that image's patch map, then its top images."""
    tiles, captions = [], []
    for row, (image, patch_map, label) in enumerate(zip(images, maps, labels, strict=True)):
        tile_row = [image] + ([heatmap_overlay(image, patch_map)] if patch_map is not None else [])
        caption_row = [label] + (["patch map"] if patch_map is not None else [])
        if tops is not None:
            for hit in list(tops.channels.values())[row]:
                name, picture = dataset[hit.index]
                tile_row.append(heatmap_overlay(picture, hit.patch_map))
                caption_row.append(f"{name[:10]} {hit.score:.2f}")
        tiles.append(tile_row)
        captions.append(caption_row)
    return grid(tiles, captions, tile=112)


def _visualize(client: Client, args: argparse.Namespace) -> None:
    from tqdm import tqdm

    steps = args.steps or DEFAULT_STEPS
    with tqdm(total=steps, unit="step", desc="optimizing") as bar:

        def on_progress(progress: OptimizationProgress) -> None:
            bar.update(progress.step - bar.n)
            bar.set_postfix(loss=f"{progress.loss:.3f}")

        result = client.optimize_features(
            [(args.site, c) for c in args.channel],
            model=args.model,
            steps=args.steps,
            learning_rate=args.lr,
            tv_weight=args.tv_weight,
            copies=args.copies,
            image_size=args.size,
            parameterization=args.parameterization,
            schedule=args.schedule,
            optimizer=args.optimizer,
            seed=args.seed,
            progress_every=max(1, steps // 100),
            on_progress=on_progress,
        )
    args.out.mkdir(parents=True, exist_ok=True)
    for feature in result.features:
        path = args.out / f"{feature.site}-ch{feature.channel}.png"
        path.write_bytes(feature.png)
        print(f"wrote {path} (objective {feature.objective:.4f})")
    dataset = dataset_images(args.dataset) if args.dataset else []
    tops = (
        client.top_activating_images(
            args.site,
            args.channel,
            images=[image for _, image in dataset],
            top_k=args.top_k,
            model=args.model,
        )
        if dataset
        else None
    )
    labels = [f"ch {f.channel} {f.objective:.2f}" for f in result.features]
    figure = feature_grid(
        [f.image for f in result.features],
        [f.patch_map for f in result.features],
        labels,
        tops,
        dataset,
    )
    figure.save(args.out / "grid.png")
    (args.out / "parameters.json").write_text(
        json.dumps({"parameters": result.parameters, "provenance": result.provenance}, indent=2)
    )
    print(f"wrote {args.out / 'grid.png'}")
