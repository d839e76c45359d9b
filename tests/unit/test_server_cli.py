"""`vitscope-server`: every command's flags come from its settings model; serve's also from
VITSCOPE_* variables, the jobs' from flags only."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from support.image_env import console_script

from vitscope_server.cli import COMMANDS, build_parser
from vitscope_server.commands.scan import ScanMergeSettings, ScanSettings
from vitscope_server.commands.train_inverter import TrainInverterSettings
from vitscope_server.settings import JobSettings, ServerSettings
from vitscope_server.settings_flags import env_name, flag_name, settings_from_args


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
    settings = settings_from_args(args, ServerSettings)
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
    assert set(COMMANDS) == set(commands)


@pytest.mark.parametrize("command", sorted(set(COMMANDS) - {"serve"}))
def test_each_job_help_says_what_it_does_and_lists_every_setting(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from vitscope_server.cli import main

    with pytest.raises(SystemExit):
        main([command, "--help"])
    shown = capsys.readouterr().out
    settings = COMMANDS[command].settings
    assert (settings.__doc__ or "").split("\n")[0] in " ".join(shown.split())
    for name, field in settings.model_fields.items():
        assert field.description and field.description.endswith("."), f"{command} {name}"
        flag = "PARTS" if name == "parts" else flag_name(field.alias or name)
        assert flag in shown, f"{command}: {name} has no flag"


def test_job_flags_keep_their_forms_and_ignore_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """List flags take several values after one flag (--channel 0 1) or a repeated flag
    (--model-spec); scan-merge's parts are positional; no VITSCOPE_* variable reaches a job."""
    monkeypatch.setenv(env_name("device"), "cuda")
    monkeypatch.setenv(env_name("batch"), "3")
    parser = build_parser()
    scan_argv = ["scan", "--model=m", "--data=d", "--site=s", "--channel", "0", "7", "--top-k=2"]
    scan_argv += ["--model-spec", "a=timm:x", "--model-spec=b=timm:y", "--out", "p.json"]
    scan = settings_from_args(parser.parse_args(scan_argv), ScanSettings)
    assert scan.channel == [0, 7] and scan.model_spec == ["a=timm:x", "b=timm:y"]
    assert (scan.device, scan.batch, scan.shard, scan.out) == ("auto", 64, "0/1", Path("p.json"))
    merge_argv = ["scan-merge", "a.json", "b.json", "--out=m.json", "--partial"]
    merge = settings_from_args(parser.parse_args(merge_argv), ScanMergeSettings)
    assert merge.parts == [Path("a.json"), Path("b.json")] and merge.partial
    inverter_argv = ["train-inverter", "--model=m", "--data=builtin", "--out=s"]
    inverter_argv += ["--module", "embed", "blocks.1", "--resume", "--embed-kind=linear"]
    inverter = settings_from_args(parser.parse_args(inverter_argv), TrainInverterSettings)
    assert inverter.modules == ["embed", "blocks.1"] and inverter.resume
    assert inverter.embed_kind == "linear" and inverter.module_index is None
    assert all(issubclass(c.settings, JobSettings) for n, c in COMMANDS.items() if n != "serve")


def test_jobs_refuse_missing_and_bad_values_naming_the_flag(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from vitscope_server.cli import main

    with pytest.raises(SystemExit):
        main(["scan", "--model=m", "--data=d", "--site=s", "--top-k=2", "--out=p.json"])
    assert "--channel" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["train-classifier", "--epochs=0"])
    assert "epochs" in str(exited.value) and "greater than or equal to 1" in str(exited.value)
