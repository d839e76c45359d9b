"""`vitscope explain`: attribution maps of images, side by side with their faithfulness curves."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from PIL import Image

from vitscope.client import Client
from vitscope.explain import ALIASES, BASELINES, HEAD_FUSIONS, METHODS, MethodOptions, Prompt
from vitscope.plot_explain import plot_image_explanation


def add_commands(commands: Any) -> None:
    explain = commands.add_parser(
        "explain",
        help="attribution maps (rollout, relevancy, integrated gradients, ...) with "
        "deletion and insertion curves",
    )
    explain.add_argument("images", nargs="+", type=Path)
    explain.add_argument("--model", default="")
    explain.add_argument(
        "--method",
        dest="methods",
        nargs="+",
        default=["rollout", "relevancy", "ig"],
        choices=[*METHODS, *ALIASES],
    )
    explain.add_argument(
        "--target", dest="class_target", help="class index or name (default: the prediction)"
    )
    explain.add_argument("--prompt", help="open_clip towers: a free-text target")
    explain.add_argument(
        "--class-names", nargs="+", help="open_clip towers: the label set (default ImageNet)"
    )
    explain.add_argument("--steps", type=int, help="integrated gradients' steps (default 50)")
    explain.add_argument("--baseline", choices=list(BASELINES))
    explain.add_argument("--head-fusion", choices=list(HEAD_FUSIONS))
    explain.add_argument("--seed", type=int, default=0, help="seeds the random order")
    explain.add_argument(
        "--no-curves", action="store_true", help="skip the deletion and insertion curves"
    )
    explain.add_argument("--out", type=Path, required=True, help="folder for the figures")


def _target(args: argparse.Namespace) -> int | str | Prompt | None:
    if args.prompt:
        return Prompt(args.prompt)
    text = args.class_target
    if text is None:
        return None
    return int(text) if text.lstrip("-").isdigit() else text


def run(client: Client, args: argparse.Namespace) -> bool:
    if args.command != "explain":
        return False
    args.out.mkdir(parents=True, exist_ok=True)
    options = {
        "rollout": MethodOptions(head_fusion=args.head_fusion),
        "integrated_gradients": MethodOptions(steps=args.steps, baseline=args.baseline),
    }
    target = _target(args)
    result = client.explain(
        args.images,
        args.methods,
        model=args.model,
        targets=[target] * len(args.images) if target is not None else [],
        options=options,
        class_names=args.class_names,
        faithfulness=not args.no_curves,
        seed=args.seed,
        on_progress=lambda p: print(f"\r{p.method}: {p.completed}/{p.total}", end="", flush=True),
    )
    print()
    for path, image in zip(args.images, result.images, strict=True):
        aucs = [
            f"{name}: deletion {m.faithfulness.deletion.auc:.3f} insertion "
            f"{m.faithfulness.insertion.auc:.3f}"
            for name, m in image.maps.items()
            if m.faithfulness is not None
        ]
        if image.random_order is not None:
            aucs.append(
                f"random: deletion {image.random_order.deletion.auc:.3f} insertion "
                f"{image.random_order.insertion.auc:.3f}"
            )
        print(f"{path.name}: target {image.target_name}; " + "; ".join(aucs))
        figure = args.out / f"{path.stem}-explained.png"
        original = Image.open(path).convert("RGB")
        plot_image_explanation(image, original, result.patch_counts, figure)
        print(f"wrote {figure}")
    return True
