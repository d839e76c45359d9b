"""The `vitscope-server` command: run the server, and the batch jobs that share its models.

Each sub-command's flags are generated from its settings model (settings.py). `serve` takes
one flag per ServerSettings field, each also a VITSCOPE_* variable. The batch jobs run
in-process, name models exactly as `serve` does, and need no server; their logic lives in the
core, their commands (settings and a run function) in `commands/`.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from pydantic_settings import BaseSettings

from vitscope_server.commands import sae, scan, train_classifier, train_inverter
from vitscope_server.commands.sae_settings import (
    EvaluateSaeSettings,
    ExtractSettings,
    TrainSaeSettings,
)
from vitscope_server.settings import ServerSettings
from vitscope_server.settings_flags import add_settings_flags, settings_from_args

PROG = "vitscope-server"


def _serve(settings: ServerSettings) -> None:
    from vitscope_server.transport.app import serve

    serve(settings)


@dataclass(frozen=True)
class Command:
    settings: type[BaseSettings]
    run: Callable[[Any], None]
    summary: str
    description: str


COMMANDS = {
    "serve": Command(
        ServerSettings,
        _serve,
        "run the gRPC server",
        "Run the gRPC server. Every flag is also an environment variable VITSCOPE_<FLAG> "
        "(upper case, underscores); a flag wins over the variable.",
    ),
    **{
        name: Command(settings, run, *(inspect.getdoc(settings) or "").partition("\n")[::2])
        for name, settings, run in (
            ("scan", scan.ScanSettings, scan.scan),
            ("scan-merge", scan.ScanMergeSettings, scan.merge),
            ("extract", ExtractSettings, sae.extract),
            ("train-sae", TrainSaeSettings, sae.train),
            ("evaluate-sae", EvaluateSaeSettings, sae.evaluate),
            ("train-inverter", train_inverter.TrainInverterSettings, train_inverter.run),
            (
                "train-classifier",
                train_classifier.TrainClassifierSettings,
                train_classifier.run,
            ),
        )
    },
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Serve vision-transformer introspection over gRPC, and its batch jobs.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        summary = command.summary.rstrip(".")
        sub = commands.add_parser(
            name,
            help=summary[:1].lower() + summary[1:],
            description=f"{command.summary}\n{command.description}".strip(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        add_settings_flags(sub, command.settings)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    command = COMMANDS[args.command]
    try:
        settings = settings_from_args(args, command.settings)
    except ValidationError as exc:
        raise SystemExit(f"{PROG} {args.command}: {exc}") from None
    command.run(settings)


if __name__ == "__main__":
    main(sys.argv[1:])
