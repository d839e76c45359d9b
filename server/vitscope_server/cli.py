"""The `vitscope-server` command: run the server, and the batch jobs that share its models.

`serve` takes one flag per ServerSettings field (each also a VITSCOPE_* variable). The batch
commands run in-process, name models exactly as `serve` does, and need no server.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from vitscope_server import train_classifier
from vitscope_server.commands import sae, scan, train_inverter
from vitscope_server.settings_flags import add_settings_flags, settings_from_args

PROG = "vitscope-server"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Serve vision-transformer introspection over gRPC, and its batch jobs.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="run the gRPC server",
        description="Run the gRPC server. Every flag is also an environment variable "
        "VITSCOPE_<FLAG> (upper case, underscores); a flag wins over the variable.",
    )
    add_settings_flags(serve)
    scan.add_scan_arguments(
        commands.add_parser("scan", help="top activating images of one dataset shard")
    )
    scan.add_merge_arguments(
        commands.add_parser("scan-merge", help="merge scan parts into one top-k")
    )
    sae.add_extract_arguments(
        commands.add_parser("extract", help="write a site's token activations to dataset shards")
    )
    sae.add_train_arguments(
        commands.add_parser("train-sae", help="train a sparse autoencoder on an activation dataset")
    )
    sae.add_evaluate_arguments(
        commands.add_parser("evaluate-sae", help="measure an SAE's quality on a dataset")
    )
    train_inverter.add_arguments(
        commands.add_parser("train-inverter", help="train a model's inverse modules into a store")
    )
    train_classifier.add_arguments(
        commands.add_parser(
            "train-classifier", help="train a timm ViT classifier (the built-in digits model)"
        )
    )
    return parser


def _serve(args: argparse.Namespace) -> None:
    from vitscope_server.transport.app import serve

    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        raise SystemExit(f"{PROG} serve: {exc}") from None
    serve(settings)


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        _serve(args)
    elif args.command == "scan":
        scan.scan(args)
    elif args.command == "scan-merge":
        scan.merge(args)
    elif args.command == "extract":
        sae.extract(args)
    elif args.command == "train-sae":
        sae.train(args)
    elif args.command == "evaluate-sae":
        sae.evaluate(args)
    elif args.command == "train-inverter":
        train_inverter.run(args)
    else:
        train_classifier.run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
