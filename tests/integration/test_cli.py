"""The vitscope command against a real server; it stays a torch-free client."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata
from support.probes import fresh_python

from vitscope import Client
from vitscope.cli import build_parser, main
from vitscope_server.transport.app import RunningServer


@pytest.fixture()
def photo(tmp_path: Path) -> Path:
    path = tmp_path / "coffee.png"
    Image.fromarray(skdata.coffee()).save(path)
    return path


def test_models_and_describe(server: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    target = ["--target", f"127.0.0.1:{server.port}"]
    main([*target, "models"])
    listing = capsys.readouterr().out
    assert "* vit" in listing and "ready" in listing and "swin" in listing
    main([*target, "describe", "deit"])
    described = json.loads(capsys.readouterr().out)
    assert described["prefix_token_count"] == 2 and described["block_count"] == 2
    main([*target, "health"])
    assert capsys.readouterr().out.strip() == "SERVING"


def test_activations_to_npz_with_overlay(
    server: RunningServer,
    client: Client,
    photo: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "acts.npz"
    overlay = tmp_path / "overlay.png"
    main(
        [
            "--target",
            f"127.0.0.1:{server.port}",
            "activations",
            str(photo),
            "--model",
            "deit",
            "--site",
            "blocks.1.mlp.hidden",
            "--site",
            "blocks.0.attn.probs",
            "--channels",
            "3",
            "9",
            "--predictions",
            "2",
            "--out",
            str(out),
            "--overlay",
            str(overlay),
        ]
    )
    saved = np.load(out)
    direct = client.activations(
        [photo], ["blocks.1.mlp.hidden", "blocks.0.attn.probs"], model="deit"
    )
    np.testing.assert_array_equal(saved["blocks.1.mlp.hidden"], direct["blocks.1.mlp.hidden"])
    np.testing.assert_array_equal(saved["blocks.0.attn.probs"], direct["blocks.0.attn.probs"])
    printed = capsys.readouterr().out
    assert "coffee.png:" in printed
    picture = np.asarray(Image.open(overlay))
    assert picture.shape[1] == 3 * 128 and picture.std() > 10


def test_errors_exit_nonzero_with_the_message(
    server: RunningServer, photo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(
            [
                "--target",
                f"127.0.0.1:{server.port}",
                "activations",
                str(photo),
                "--model",
                "vit",
                "--site",
                "blocks.42.out",
                "--out",
                str(tmp_path / "x.npz"),
            ]
        )
    assert exited.value.code == 1
    assert "NOT_FOUND" in capsys.readouterr().err


# Imported by none of the client's modules: the client runs where none of them is installed.
SERVER_ONLY = ("torch", "timm", "open_clip", "pydantic", "pydantic_settings", "vitscope_server")
PROBE = f"""
import importlib, pkgutil, sys
for name in {SERVER_ONLY!r}:
    sys.modules[name] = None
import vitscope
for module in pkgutil.walk_packages(vitscope.__path__, "vitscope."):
    importlib.import_module(module.name)
import vitscope.cli
vitscope.cli.build_parser().parse_args(["models"])
"""


def test_client_imports_without_the_server_side() -> None:
    result = fresh_python(PROBE)
    assert result.returncode == 0, result.stderr


def test_client_cli_has_no_server_commands() -> None:
    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert not set(commands) & {"serve", "scan", "scan-merge", "train-inverter", "train-classifier"}
