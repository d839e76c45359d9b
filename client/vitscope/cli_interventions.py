"""`vitscope patch`: activation patching of every block and patch position, drawn as a
heatmap per block."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from vitscope.client import Client
from vitscope.interventions import METRICS, PARTS
from vitscope.plot_interventions import patching_maps, plot_patching


def _class(text: str | None) -> int | str | None:
    if text is None:
        return None
    return int(text) if text.lstrip("-").isdigit() else text


def add_commands(commands: Any) -> None:
    patch = commands.add_parser(
        "patch",
        help="patch a site from SOURCE into BASE at every block and patch position; "
        "a heatmap per block",
    )
    patch.add_argument("base", type=Path)
    patch.add_argument("source", type=Path)
    patch.add_argument("--model", default="")
    patch.add_argument("--site", default="residual", choices=sorted(PARTS))
    patch.add_argument("--blocks", type=int, nargs="+", default=[])
    patch.add_argument("--metric", choices=[m for m in METRICS if m], default=None)
    patch.add_argument(
        "--target",
        dest="class_target",
        help="class index or name (default: the source's prediction)",
    )
    patch.add_argument("--other", help="class index or name (default: the base's prediction)")
    patch.add_argument("--out", type=Path, required=True, help="folder for the figure and values")


def run(client: Client, args: argparse.Namespace) -> bool:
    if args.command != "patch":
        return False
    args.out.mkdir(parents=True, exist_ok=True)
    result = client.patching_sweep(
        [args.base],
        [args.source],
        part=PARTS[args.site],
        blocks=args.blocks,
        model=args.model,
        metric=args.metric,
        target=_class(args.class_target),
        other=_class(args.other),
        on_progress=lambda p: print(f"\rvariants: {p.completed}/{p.total}", end="", flush=True),
    )
    print()
    stem = f"{args.base.stem}-from-{args.source.stem}-{args.site}"
    values = args.out / f"{stem}.npz"
    arrays: dict[str, np.ndarray] = {"blocks": np.array(result.sweep_blocks)}
    for key, array in (("values", result.values), ("normalized", result.normalized)):
        if array is not None:
            arrays[key] = array
    np.savez(values, **arrays)  # type: ignore[arg-type]
    figure = plot_patching(
        result, args.out / f"{stem}.png", f"{args.site} patched from {args.source.name}"
    )
    strongest = np.unravel_index(np.nanargmax(np.abs(patching_maps(result))), result.sweep_shape)
    print(
        f"metric {result.metric}; strongest at block, row, col {tuple(int(i) for i in strongest)}"
    )
    print(f"wrote {figure} and {values}")
    return True
