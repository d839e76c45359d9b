"""`vitscope invert`, `vitscope inverters` and `vitscope train-inverter`."""

from __future__ import annotations

import argparse
import json
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

    train = commands.add_parser(
        "train-inverter",
        help="train a model's inverse modules into a store (runs here, needs the [server] extra)",
    )
    train.add_argument("--model", required=True, help="name of the model to invert")
    train.add_argument("--models-file", type=Path, help="YAML models file, as for serve")
    train.add_argument(
        "--model-spec",
        action="append",
        default=[],
        help="model NAME=FAMILY:ARCH[@WEIGHTS], as serve's --model; repeatable",
    )
    train.add_argument(
        "--data", required=True, help='"builtin" (digits training split) or an image folder'
    )
    train.add_argument("--out", type=Path, required=True, help="store folder")
    train.add_argument(
        "--module",
        dest="modules",
        nargs="+",
        default=[],
        help="modules to train: embed, blocks.N (default: all)",
    )
    train.add_argument(
        "--module-index",
        type=int,
        help="train one module: 0 = embed, i = blocks.{i-1} (for indexed parallel jobs)",
    )
    train.add_argument("--embed-kind", default="conv", choices=["conv", "linear"])
    train.add_argument("--epochs", type=int, default=10)
    train.add_argument("--batch-size", type=int, default=128)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--val-fraction", type=float, default=0.1)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--resume", action="store_true", help="continue from checkpoints")
    train.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    train.add_argument("--threads", type=int, help="torch CPU threads")


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


def _train(args: argparse.Namespace) -> None:
    import torch

    from vitscope_server.core.errors import VitscopeError
    from vitscope_server.core.inversion_store import read_manifest
    from vitscope_server.core.inversion_train import TrainConfig, train_inverter
    from vitscope_server.core.loading import load_model
    from vitscope_server.model_selection import resolve_device, select_spec

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        spec = select_spec(args.model, args.models_file, args.model_spec)
        loaded = load_model(spec, resolve_device(args.device))
        count = len(loaded.adapter.blocks) + 1
        if args.module_index is not None:
            if not 0 <= args.module_index < count:
                raise SystemExit(
                    f"--module-index {args.module_index}: allowed 0..{count - 1} "
                    "(0 = the patch embedding, i = block i-1)"
                )
            indices = [args.module_index]
        elif args.modules:
            names = ["embed", *(f"blocks.{i}" for i in range(count - 1))]
            unknown = [m for m in args.modules if m not in names]
            if unknown:
                raise SystemExit(f"--module {unknown}: allowed {names}")
            indices = [names.index(m) for m in args.modules]
        else:
            indices = list(range(count))
        config = TrainConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            val_fraction=args.val_fraction,
            seed=args.seed,
            embed_kind=args.embed_kind,
        )
        train_inverter(loaded, args.data, args.out, indices, config, args.resume)
        manifest = read_manifest(args.out)
    except VitscopeError as exc:
        raise SystemExit(f"vitscope train-inverter: {exc}") from None
    if manifest is not None:
        summary = {n: r.best_val_mse for n, r in sorted(manifest.modules.items())}
        print(
            json.dumps(
                {"store": str(args.out), "max_depth": manifest.max_depth, "best_val_mse": summary}
            )
        )


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
    elif args.command == "train-inverter":
        _train(args)
    else:
        return False
    return True
