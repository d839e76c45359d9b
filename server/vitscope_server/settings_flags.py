"""`vitscope-server` flags generated from a command's settings model by pydantic-settings.

Every field is a flag (--kebab-case). For serve, each is also a VITSCOPE_* variable: a flag
given wins over the variable, which wins over the default; a job's settings read flags and
defaults only (settings.JobSettings). Nothing here lists fields, so none can be missed.
"""

from __future__ import annotations

import argparse
import re
from typing import Any, TypeVar

from pydantic_settings import BaseSettings, CliSettingsSource

from vitscope_server.settings import ENV_PREFIX

Settings = TypeVar("Settings", bound=BaseSettings)

_CLI_OPTIONS: dict[str, Any] = {
    "cli_kebab_case": True,
    "cli_implicit_flags": True,
    "cli_hide_none_type": True,
    "cli_avoid_json": True,
    "cli_enforce_required": True,
}
# A list flag takes its items one by one (repeated, or several after the flag): name the item.
_LIST_METAVAR = re.compile(r"list\[(.+)\]")


def add_settings_flags(parser: argparse.ArgumentParser, settings_class: type[BaseSettings]) -> None:
    """Adds one flag per field of `settings_class` to `parser`."""
    CliSettingsSource(settings_class, root_parser=parser, **_CLI_OPTIONS)
    for action in parser._actions:
        if isinstance(action.metavar, str) and (item := _LIST_METAVAR.fullmatch(action.metavar)):
            action.metavar = item[1]


def settings_from_args(args: argparse.Namespace, settings_class: type[Settings]) -> Settings:
    """The settings from parsed flags, then (serve only) VITSCOPE_* variables, then defaults."""
    source: CliSettingsSource[Settings] = CliSettingsSource(
        settings_class, root_parser=argparse.ArgumentParser(add_help=False), **_CLI_OPTIONS
    )
    return settings_class(_cli_settings_source=source(parsed_args=args))


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()
