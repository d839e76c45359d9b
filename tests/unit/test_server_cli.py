"""`vitscope-server`: serve's flags come from ServerSettings, and the page that lists them is
current."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from support.image_env import console_script

from vitscope_server.cli import build_parser
from vitscope_server.settings import ServerSettings
from vitscope_server.settings_docs import configuration_markdown
from vitscope_server.settings_flags import env_name, flag_name, settings_from_args

ROOT = Path(__file__).resolve().parents[2]


def test_serve_help_lists_every_setting() -> None:
    result = subprocess.run(
        [*console_script("vitscope-server"), "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    listed = {word.strip(",[]") for word in result.stdout.split() if word.startswith(("--", "[--"))}
    for name, field in ServerSettings.model_fields.items():
        assert flag_name(name) in listed, f"{name} has no flag"
        if field.annotation is bool:
            assert f"--no-{flag_name(name).removeprefix('--')}" in listed


def test_every_setting_says_what_it_means() -> None:
    for name, field in ServerSettings.model_fields.items():
        assert field.description and field.description.endswith("."), f"{name}: no description"


def test_flags_win_over_environment_which_wins_over_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(env_name("max_queue"), "5")
    monkeypatch.setenv(env_name("port"), "7000")
    monkeypatch.setenv(env_name("image_roots"), '["/from/env"]')
    args = build_parser().parse_args(
        [
            "serve",
            "--port=9000",
            "--models",
            "a=timm:test_vit",
            "--models=b=timm:test_vit",
            "--no-builtin-models",
            "--log-level=DEBUG",
        ]
    )
    settings = settings_from_args(args)
    assert settings.port == 9000
    assert settings.max_queue == 5
    assert settings.image_roots == [Path("/from/env")]
    assert settings.models == ["a=timm:test_vit", "b=timm:test_vit"]
    assert settings.builtin_models is False
    assert settings.log_level == "DEBUG"
    assert settings.max_running == ServerSettings.model_fields["max_running"].default


def test_serve_refuses_a_bad_value_naming_the_setting() -> None:
    from vitscope_server.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["serve", "--port=70000"])
    assert "port" in str(exited.value) and "65535" in str(exited.value)


def test_configuration_page_is_current() -> None:
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert page == configuration_markdown(), "stale docs/configuration.md: run `make docs`"
    for name in ServerSettings.model_fields:
        assert f"`{env_name(name)}`" in page


def test_batch_commands_are_server_commands() -> None:
    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert set(commands) == {
        "serve",
        "scan",
        "scan-merge",
        "train-inverter",
        "train-classifier",
        "extract",
        "train-sae",
        "evaluate-sae",
    }
