"""`vitscope-server serve` flags generated from ServerSettings by pydantic-settings.

Every field is a flag (--kebab-case) and a VITSCOPE_* variable; a flag given wins over the
variable, which wins over the default. Nothing here lists the fields, so none can be missed.
"""

from __future__ import annotations

import argparse
from typing import Any

from pydantic_settings import CliSettingsSource

from vitscope_server.settings import ENV_PREFIX, ServerSettings

_CLI_OPTIONS: dict[str, Any] = {
    "cli_kebab_case": True,
    "cli_implicit_flags": True,
    "cli_hide_none_type": True,
    "cli_avoid_json": True,
}


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """Adds one flag per ServerSettings field to `parser`."""
    CliSettingsSource(ServerSettings, root_parser=parser, **_CLI_OPTIONS)


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    """The settings from parsed flags, then VITSCOPE_* variables, then defaults."""
    source: CliSettingsSource[ServerSettings] = CliSettingsSource(
        ServerSettings, root_parser=argparse.ArgumentParser(add_help=False), **_CLI_OPTIONS
    )
    return ServerSettings(_cli_settings_source=source(parsed_args=args))  # type: ignore[call-arg]


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()
