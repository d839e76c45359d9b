"""`vitscope-server train-inverter` end to end on a tiny ViT: one epoch, parallel module processes
writing one store, resume after a kill, the exact linear embedding inverse, and serving the
result (a store for other weights is not offered)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from skimage import data as skdata
from support.servers import TEST_MODELS
from support.waiting import wait_until

from vitscope import Client, NotFoundError
from vitscope_server.builtin.digits_data import digits_split
from vitscope_server.cli import main as cli
from vitscope_server.core.inversion.store import read_manifest
from vitscope_server.settings import ServerSettings
from vitscope_server.transport.app import create_server

# 3 * 4 * 4 == 48: the patch projection is square, so the linear inverse is exact.
TINY = {
    "name": "tiny",
    "family": "timm",
    "architecture": "vit_tiny_patch16_224",
    "seed": 5,
    "kwargs": {
        "img_size": 16,
        "patch_size": 4,
        "embed_dim": 48,
        "depth": 2,
        "num_heads": 2,
        "num_classes": 3,
    },
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(models file, image folder of 24 training digits)."""
    root = tmp_path_factory.mktemp("tiny")
    models = root / "models.yaml"
    models.write_text(yaml.safe_dump({"models": [TINY]}))
    folder = root / "images"
    folder.mkdir()
    for index, digit in enumerate(digits_split()[0][:24]):
        Image.fromarray(digit).save(folder / f"{index:03d}.png")
    return models, folder


def train_args(setup: tuple[Path, Path], store: Path, *extra: str) -> list[str]:
    models, folder = setup
    return [
        "train-inverter",
        "--model",
        "tiny",
        "--models-file",
        str(models),
        "--data",
        str(folder),
        "--out",
        str(store),
        "--batch-size",
        "8",
        *extra,
    ]


def _cli_process(args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "vitscope_server.cli", *args],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def test_one_epoch_writes_a_complete_store(
    setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "stores" / "tiny"
    cli(train_args(setup, store, "--epochs", "1"))
    files = sorted(p.name for p in store.iterdir())
    modules = ["blocks.0", "blocks.1", "embed"]
    assert files == sorted([f"{m}.json" for m in modules] + [f"{m}.safetensors" for m in modules])
    for module in modules:
        meta = json.loads((store / f"{module}.json").read_text())
        assert meta["model"] == "tiny"
        assert meta["architecture"] == "vit_tiny_patch16_224"
        assert meta["weights_identity"] == "random:seed=5"
        assert meta["data"] == str(setup[1])
        assert meta["train_images"] + meta["val_images"] == 24
        assert len(meta["val_mse_history"]) == 1
        assert meta["best_val_mse"] == meta["val_mse_history"][0]
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["max_depth"] == 2

    # Served beside a copy claiming other weights, which must not be offered.
    impostor = tmp_path / "stores" / "impostor"
    impostor.mkdir()
    for file in store.iterdir():
        text = file.read_bytes()
        if file.suffix == ".json":
            text = text.replace(b"random:seed=5", b"random:seed=6")
        (impostor / file.name).write_bytes(text)
    models, folder = setup
    running = create_server(
        ServerSettings(
            host="127.0.0.1",
            port=0,
            metrics_port=-1,
            models_file=models,
            builtin_models=False,
            inverters_dir=tmp_path / "stores",
        )
    )
    try:
        assert running.registry.wait_until_settled(60)
        with Client(f"127.0.0.1:{running.port}") as client:
            listed = client.list_inverters()
            assert [(i.store, i.max_depth) for i in listed] == [("tiny", 2)]
            picture = Image.open(next(folder.iterdir()))
            result = client.invert([picture], [0, 2], model="tiny")
            assert result[2].psnr is not None and result[2].images[0].size == (16, 16)
    finally:
        running.stop(0)

    # The same name, architecture and seed built at another image size: same weights
    # identity, other geometry, so the store is stale for it.
    resized = tmp_path / "resized.yaml"
    resized.write_text(
        yaml.safe_dump({"models": [{**TINY, "kwargs": {**TINY["kwargs"], "img_size": 32}}]})
    )
    running = create_server(
        ServerSettings(
            host="127.0.0.1",
            port=0,
            metrics_port=-1,
            models_file=resized,
            builtin_models=False,
            inverters_dir=tmp_path / "stores",
        )
    )
    try:
        assert running.registry.wait_until_settled(60)
        with Client(f"127.0.0.1:{running.port}") as client:
            assert client.list_inverters() == []
            with pytest.raises(NotFoundError, match="'tiny' has no trained inverter"):
                client.invert([picture], [0], model="tiny")
            again = client.invert([picture], [0], model="tiny", method="optimization", steps=1)
            assert again[0].images[0].size == (32, 32)
    finally:
        running.stop(0)


def test_training_folders_are_read_as_the_server_reads_images(
    setup: tuple[Path, Path], tmp_path: Path
) -> None:
    models, _ = setup
    digit = Image.fromarray(digits_split()[0][0])
    only_bitmaps = tmp_path / "bitmaps"
    only_bitmaps.mkdir()
    digit.save(only_bitmaps / "digit.bmp")
    disguised = tmp_path / "disguised"
    disguised.mkdir()
    digit.save(disguised / "a.png")
    digit.save(disguised / "b.png", format="BMP")
    store = tmp_path / "store"
    with pytest.raises(SystemExit, match=re.escape("no images (PNG, JPEG, WEBP) found")):
        cli(train_args((models, only_bitmaps), store, "--epochs", "1"))
    with pytest.raises(SystemExit, match=r"b\.png: .*format BMP not allowed"):
        cli(train_args((models, disguised), store, "--epochs", "1"))
    assert not store.exists()


def test_parallel_module_processes_share_one_store(
    setup: tuple[Path, Path], tmp_path: Path
) -> None:
    store = tmp_path / "store"
    processes = [
        _cli_process(train_args(setup, store, "--epochs", "1", "--module-index", str(i)))
        for i in range(3)
    ]
    for process in processes:
        output = process.communicate(timeout=240)[0].decode()
        assert process.returncode == 0, output
    manifest = read_manifest(store)
    assert manifest is not None
    assert sorted(manifest.modules) == ["blocks.0", "blocks.1", "embed"]
    assert manifest.max_depth == 2
    assert manifest.weights_identity == "random:seed=5"
    assert not [p for p in store.iterdir() if p.name.startswith(".")]


def test_resume_continues_after_a_kill(setup: tuple[Path, Path], tmp_path: Path) -> None:
    store = tmp_path / "store"
    checkpoint = store / "blocks.0.ckpt"
    process = _cli_process(train_args(setup, store, "--epochs", "100000", "--module", "blocks.0"))

    def saved_an_epoch() -> bool:
        assert process.poll() is None, "training ended before its first checkpoint"
        return checkpoint.exists()

    wait_until(saved_an_epoch, "the first epoch's checkpoint")
    process.kill()
    process.wait()
    saved = torch.load(checkpoint, weights_only=True)
    done = int(saved["epoch"])
    cli(train_args(setup, store, "--epochs", str(done + 1), "--module", "blocks.0", "--resume"))
    meta = json.loads((store / "blocks.0.json").read_text())
    assert meta["val_mse_history"][:done] == saved["history"]
    assert len(meta["val_mse_history"]) == done + 1
    assert not checkpoint.exists()


def test_linear_embedding_inverse_is_exact(setup: tuple[Path, Path], tmp_path: Path) -> None:
    store = tmp_path / "linear"
    cli(train_args(setup, store, "--module", "embed", "--embed-kind", "linear"))
    meta = json.loads((store / "embed.json").read_text())
    assert meta["kind"] == "linear"
    # Pixels come back exactly, up to float32 rounding and the transform's clamp to [0, 1].
    assert meta["best_val_mse"] < 1e-10
    assert np.isfinite(meta["best_val_mse"])


def test_open_clip_towers_train_and_swin_is_refused(tmp_path: Path) -> None:
    models = tmp_path / "models.yaml"
    models.write_text(yaml.safe_dump({"models": TEST_MODELS}))
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("astronaut", "coffee", "chelsea", "rocket", "camera"):
        Image.fromarray(getattr(skdata, name)()).convert("RGB").resize((64, 64)).save(
            folder / f"{name}.png"
        )
    common = ["--models-file", str(models), "--data", str(folder), "--epochs", "1"]
    store = tmp_path / "clip"
    cli(["train-inverter", "--model", "clip", "--out", str(store), "--batch-size", "4", *common])
    manifest = read_manifest(store)
    assert manifest is not None and manifest.max_depth == 2
    assert manifest.geometry.grid == (4, 4) and manifest.geometry.image_size == (64, 64)
    with pytest.raises(SystemExit, match="Swin-like"):
        cli(["train-inverter", "--model", "swin", "--out", str(tmp_path / "swin"), *common])
