"""`vitscope invert` and `vitscope inverters`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from PIL import Image

from vitscope.client import Client
from vitscope.overlay import grid


def add_commands(commands: Any) -> None:
    invert = commands.add_parser(
        "invert", help="reconstruct images from representations; writes a strip with PSNR"
    )
    invert.add_argument("images", nargs="+", type=Path)
    invert.add_argument("--model", default="")
    invert.add_argument(
        "--depths",
        type=int,
        nargs="+",
        required=True,
        help="0 = embed, k = blocks.{k-1}.out",
    )
    invert.add_argument("--method", default="learned", choices=["learned", "optimization"])
    invert.add_argument("--steps", type=int, help="optimization steps (default 200)")
    invert.add_argument("--tv-weight", type=float, help="optimization TV weight (default 0.01)")
    invert.add_argument("--seed", type=int, default=0)
    invert.add_argument("--out", type=Path, required=True, help="output PNG strip")

    inverters = commands.add_parser(
        "inverters",
        help="trained inverters per served model (stores are read when the server starts)",
    )
    inverters.add_argument("--model", default="")


def _invert(client: Client, args: argparse.Namespace) -> None:
    result = client.invert(
        args.images,
        args.depths,
        method=args.method,
        model=args.model,
        steps=args.steps,
        tv_weight=args.tv_weight,
        seed=args.seed,
    )
    tiles, captions = [], []
    for index, path in enumerate(args.images):
        row = [Image.open(path).convert("RGB")]
        caption = [path.name]
        for depth in args.depths:
            reconstruction = result[depth]
            row.append(reconstruction.images[index])
            score = f" {reconstruction.psnr[index]:.1f}dB" if reconstruction.psnr else ""
            caption.append(f"depth {depth}{score}")
        tiles.append(row)
        captions.append(caption)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    grid(tiles, captions).save(args.out)
    for depth in args.depths:
        psnr = result[depth].psnr
        scores = ", ".join(f"{p:.2f}" for p in psnr) if psnr else "-"
        print(f"depth {depth} ({result[depth].site}): PSNR dB {scores}")
    print(f"wrote {args.out}")


def run(client: Client, args: argparse.Namespace) -> bool:
    """Handles this module's commands; False for any other command."""
    if args.command == "invert":
        _invert(client, args)
    elif args.command == "inverters":
        for found in client.list_inverters(args.model):
            print(
                f"{found.model:24} depth 0..{found.max_depth} {found.store} "
                f"({found.weights_identity}) data: {found.data}"
            )
            for m in found.modules:
                print(
                    f"    {m.name:10} {m.kind:6} val_mse {m.best_val_mse:.6f} ({m.parameters} params)"
                )
    else:
        return False
    return True
