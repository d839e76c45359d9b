"""Command flags generated from settings models by pydantic-settings: `serve` from
ServerSettings, the SAE batch commands from theirs (commands/sae_settings.py).

Every field is a flag (--kebab-case) and a VITSCOPE_* variable; a flag given wins over the
variable, which wins over the default. Nothing here lists the fields, so none can be missed.
"""

from __future__ import annotations

import argparse
from typing import Any, TypeVar

from pydantic_settings import BaseSettings, CliSettingsSource

from vitscope_server.settings import ENV_PREFIX, ServerSettings

_CLI_OPTIONS: dict[str, Any] = {
    "cli_kebab_case": True,
    "cli_implicit_flags": True,
    "cli_hide_none_type": True,
    "cli_avoid_json": True,
}
Settings = TypeVar("Settings", bound=BaseSettings)


def add_model_flags(parser: argparse.ArgumentParser, settings: type[BaseSettings]) -> None:
    """Adds one flag per field of `settings` to `parser`."""
    CliSettingsSource(settings, root_parser=parser, **_CLI_OPTIONS)


def model_from_args(args: argparse.Namespace, settings: type[Settings]) -> Settings:
    """The settings from parsed flags, then VITSCOPE_* variables, then defaults."""
    source: CliSettingsSource[Settings] = CliSettingsSource(
        settings, root_parser=argparse.ArgumentParser(add_help=False), **_CLI_OPTIONS
    )
    return settings(_cli_settings_source=source(parsed_args=args))


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """Adds one flag per ServerSettings field to `parser`."""
    add_model_flags(parser, ServerSettings)


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    return model_from_args(args, ServerSettings)


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()
