"""Writes docs/configuration.md from ServerSettings: `python tools/settings_docs.py PATH`
(`make docs`).

A test compares the committed page with this output, so the page follows every new setting.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic.fields import FieldInfo

from vitscope_server.settings import ServerSettings
from vitscope_server.settings_flags import env_name, flag_name

HEADER = """# Configuration

`vitscope-server serve` reads every setting from a flag or from an environment variable;
a flag wins over the variable, which wins over the default. Run `vitscope-server serve --help`
for the same list. Boolean settings also have a `--no-` flag. List settings take the flag once
per item (`--models a=timm:x --models b=timm:y`); their variable holds a JSON list
(`VITSCOPE_MODELS='["a=timm:x"]'`).

This page is generated from the settings model (`make docs`); do not edit it by hand.

| Flag | Environment variable | Default | Meaning |
|---|---|---|---|
"""


def _default(field: FieldInfo) -> str:
    factory = field.default_factory
    value = factory() if factory is not None else field.default  # type: ignore[call-arg]
    if value is None:
        return "unset"
    if value == []:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    return f"`{value}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def configuration_markdown() -> str:
    """The page: one table row per setting, in the model's order."""
    rows = []
    for name, field in ServerSettings.model_fields.items():
        flag = flag_name(name)
        if field.annotation is bool:
            flag = f"{flag}, --no-{flag.removeprefix('--')}"
        rows.append(
            f"| `{flag}` | `{env_name(name)}` | {_default(field)} | "
            f"{_cell(field.description or '')} |"
        )
    return HEADER + "\n".join(rows) + "\n"


def main(argv: list[str]) -> None:
    Path(argv[0]).write_text(configuration_markdown())


if __name__ == "__main__":
    main(sys.argv[1:])
