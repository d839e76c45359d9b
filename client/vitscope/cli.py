"""The `vitscope` command: calls a server (`vitscope-server` runs one)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from vitscope import cli_explain, cli_features, cli_interventions, cli_inversion, cli_projection
from vitscope.client import DEFAULT_TARGET, Client
from vitscope.demo import run_demo
from vitscope.errors import VitscopeError
from vitscope.handshake import describe as describe_server
from vitscope.overlay import grid, heatmap_overlay
from vitscope.tensors import TensorDecodeError


def _position(text: str) -> tuple[int, int]:
    row, _, col = text.partition(",")
    try:
        return int(row), int(col)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not ROW,COL") from None


# Each RPC family's subcommands: add_commands(subparsers) and run(client, args) -> handled.
FAMILY_COMMANDS = (cli_features, cli_projection, cli_inversion, cli_explain, cli_interventions)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vitscope", description="Look inside vision transformers over gRPC."
    )
    parser.add_argument(
        "--target",
        default=os.environ.get("VITSCOPE_TARGET", DEFAULT_TARGET),
        help="server host:port",
    )
    parser.add_argument(
        "--token", default=os.environ.get("VITSCOPE_TOKEN"), help="bearer token (or VITSCOPE_TOKEN)"
    )
    parser.add_argument("--tls", action="store_true")
    parser.add_argument("--ca-cert", type=Path)
    parser.add_argument("--client-cert", type=Path)
    parser.add_argument("--client-key", type=Path)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument(
        "--round-robin",
        action="store_true",
        help="balance over every address of the target (dns:///...)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("models", help="list served models and their state")
    commands.add_parser(
        "info", help="the server's protocol and versions, models, methods and limits"
    )
    commands.add_parser(
        "health", help="overall health, or one model's with --service"
    ).add_argument("--service", default="")
    describe = commands.add_parser("describe", help="a model's anatomy")
    describe.add_argument("model", nargs="?", default="")

    activations = commands.add_parser("activations", help="activations at sites, saved as .npz")
    activations.add_argument("images", nargs="+", type=Path)
    activations.add_argument("--model", default="")
    activations.add_argument("--site", dest="sites", action="append", required=True)
    activations.add_argument(
        "--tokens", choices=["all", "prefix", "patches", "indices", "positions"]
    )
    activations.add_argument("--indices", type=int, nargs="+", default=[])
    activations.add_argument(
        "--positions",
        type=_position,
        nargs="+",
        default=[],
        metavar="ROW,COL",
        help="patch positions",
    )
    activations.add_argument(
        "--reduction", default="none", choices=["none", "mean", "patch_map", "top_channels"]
    )
    activations.add_argument("--channels", type=int, nargs="+", default=[])
    activations.add_argument("--top-k", type=int, default=0)
    activations.add_argument(
        "--dtype", default="float32", choices=["float32", "float16", "bfloat16"]
    )
    activations.add_argument(
        "--predictions", type=int, default=0, help="include the model's top-k predictions"
    )
    activations.add_argument("--out", type=Path, required=True, help="output .npz")
    activations.add_argument(
        "--overlay",
        type=Path,
        help="also write a PNG of patch-map heatmaps of --channels over each image",
    )
    demo = commands.add_parser(
        "demo", help="call every RPC on the default model; write PNGs and index.html"
    )
    demo.add_argument("--out", type=Path, default=Path("demo-out"))
    demo.add_argument("--model", default="", help="model to show (default: the server's default)")
    for family in FAMILY_COMMANDS:
        family.add_commands(commands)
    return parser


def _client(args: argparse.Namespace) -> Client:
    return Client(
        args.target,
        token=args.token,
        tls=args.tls,
        ca_cert=args.ca_cert,
        client_cert=args.client_cert,
        client_key=args.client_key,
        timeout=args.timeout,
        load_balancing="round_robin" if args.round_robin else "pick_first",
    )


def _activations(client: Client, args: argparse.Namespace) -> None:
    result = client.activations(
        args.images,
        args.sites,
        model=args.model,
        tokens=args.tokens,
        indices=args.indices,
        positions=args.positions,
        reduction=args.reduction,
        channels=args.channels,
        top_k=args.top_k,
        dtype=args.dtype,
        top_predictions=args.predictions,
    )
    arrays: dict[str, np.ndarray] = {}
    for name, site in result.sites.items():
        arrays[name] = site.values
        if site.channel_indices is not None:
            arrays[f"{name}:channel_indices"] = site.channel_indices
        if site.token_indices:
            arrays[f"{name}:token_indices"] = np.asarray(site.token_indices)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.out, allow_pickle=False, **arrays)
    print(f"wrote {args.out}: " + ", ".join(f"{k} {list(v.shape)}" for k, v in arrays.items()))
    for path, top in zip(args.images, result.predictions, strict=False):
        print(f"{path}: " + ", ".join(f"{p.class_name} {p.probability:.3f}" for p in top))
    if args.overlay:
        if not args.channels:
            raise SystemExit("--overlay needs --channels")
        maps = client.activations(
            args.images,
            args.sites[:1],
            model=args.model,
            reduction="patch_map",
            channels=args.channels,
        )[args.sites[0]]
        tiles = []
        captions = []
        for index, path in enumerate(args.images):
            image = Image.open(path).convert("RGB")
            tiles.append(
                [image]
                + [heatmap_overlay(image, maps[index, c]) for c in range(len(args.channels))]
            )
            captions.append([path.name] + [f"{args.sites[0]} ch {ch}" for ch in args.channels])
        grid(tiles, captions).save(args.overlay)
        print(f"wrote {args.overlay}")


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        with _client(args) as client:
            if args.command == "models":
                for m in client.list_models():
                    mark = "*" if m.is_default else " "
                    print(
                        f"{mark} {m.name:28} {m.state:8} {m.family}:{m.architecture} {m.weights_identity} {m.error}"
                    )
            elif args.command == "info":
                print(describe_server(client.check_compatible()))
            elif args.command == "health":
                status = client.health(args.service)
                print(status)
                if status != "SERVING":
                    raise SystemExit(3)
            elif args.command == "describe":
                d = client.describe(args.model)
                print(json.dumps({**d.__dict__, "info": d.info.__dict__}, indent=2, default=str))
            elif args.command == "activations":
                _activations(client, args)
            elif args.command == "demo":
                print(f"wrote {run_demo(client, args.out, args.model)}")
            else:
                for family in FAMILY_COMMANDS:
                    if family.run(client, args):
                        break
    except VitscopeError as exc:
        print(f"vitscope: {exc.describe()}", file=sys.stderr)
        raise SystemExit(1) from None
    except TensorDecodeError as exc:
        print(f"vitscope: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
