"""`vitscope-server train-classifier`: a fixed digits split, ImageFolder training, and the
committed weights."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

from vitscope_server.builtin import (
    DIGITS_ARCHITECTURE,
    DIGITS_KWARGS,
    DIGITS_MEAN,
    DIGITS_STD,
    DIGITS_WEIGHTS,
)
from vitscope_server.builtin.digits_data import digits_split, digits_split_indices
from vitscope_server.cli import main
from vitscope_server.core.model.training.data import eval_loader


@pytest.fixture
def restore_torch_globals() -> Iterator[None]:
    """Training sets the thread count and deterministic mode; other tests share the process."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


def test_digits_split_is_fixed_and_holds_out_1000_digits() -> None:
    train_x, train_y, test_x, test_y = digits_split()
    assert train_x.shape == (4000, 28, 28) and test_x.shape == (1000, 28, 28)
    assert train_x.dtype == np.uint8 and test_x.dtype == np.uint8
    assert np.bincount(test_y).tolist() == [100] * 10
    again = digits_split()
    for first, second in zip((train_x, train_y, test_x, test_y), again, strict=True):
        np.testing.assert_array_equal(first, second)

    train_idx, test_idx = digits_split_indices()
    assert len(test_idx) == 1000 and not set(train_idx.tolist()) & set(test_idx.tolist())
    assert sorted([*train_idx.tolist(), *test_idx.tolist()]) == list(range(5000))
    assert not np.array_equal(digits_split_indices(seed=1)[1], test_idx)


def test_load_image_resizes_the_shorter_side_then_center_crops(tmp_path: Path) -> None:
    wide = np.zeros((16, 32), dtype=np.uint8)
    wide[:, 4:28] = 255  # black borders that a plain resize would keep, a crop drops
    Image.fromarray(wide).save(tmp_path / "wide.png")
    rgb = eval_loader(8)(tmp_path / "wide.png")
    assert rgb.shape == (3, 8, 8) and rgb.dtype == torch.uint8
    assert rgb.min() == 255


BARS = {  # class name -> where its bright bar lies, on a dim noisy background
    "horizontal": (slice(8, 12), slice(None)),
    "square": (slice(6, 14), slice(8, 16)),
    "vertical": (slice(None), slice(10, 14)),
}


def _write_folder(root: Path, per_class: int = 6) -> None:
    """Non-square grayscale PNGs and RGB JPEGs in ImageFolder layout."""
    rng = np.random.default_rng(0)
    for name, bar in BARS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, size=(20, 24), dtype=np.uint8)
            pixels[bar] = 255
            if i % 2:
                Image.fromarray(pixels).convert("RGB").save(root / name / f"{i}.jpg")
            else:
                Image.fromarray(pixels).save(root / name / f"{i}.png")


def test_image_folder_training_writes_loadable_deterministic_weights(
    tmp_path: Path, restore_torch_globals: None
) -> None:
    _write_folder(tmp_path / "data")
    common = ["--data", str(tmp_path / "data"), "--img-size", "16", "--epochs", "1"]
    common += ["--test-fraction", "0.34", "--val-fraction", "0.25", "--batch-size", "4"]
    common += ["--warmup-epochs", "1", "--threads", "1"]
    main(["train-classifier", *common, "--out", str(tmp_path / "a" / "model.safetensors")])
    main(["train-classifier", *common, "--out", str(tmp_path / "b.safetensors")])

    metrics = json.loads((tmp_path / "a" / "model.json").read_text())
    assert metrics["class_names"] == sorted(BARS)
    assert metrics["split"] == {"train": 9, "val": 3, "test": 6}
    assert metrics["threads"] == 1 and metrics["recipe"]["batch_size"] == 4
    assert (
        json.loads((tmp_path / "b.json").read_text())["test_accuracy"] == metrics["test_accuracy"]
    )
    state = load_file(tmp_path / "a" / "model.safetensors")
    model = timm.create_model(
        DIGITS_ARCHITECTURE, pretrained=False, **{**DIGITS_KWARGS, "img_size": 16, "num_classes": 3}
    )
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        k: tuple(v.shape) for k, v in model.state_dict().items()
    }
    model.load_state_dict(state, strict=True)
    again = load_file(tmp_path / "b.safetensors")
    assert all(torch.equal(state[k], again[k]) for k in state)


def test_committed_weights_reach_the_recorded_accuracy() -> None:
    metrics = json.loads(DIGITS_WEIGHTS.with_suffix(".json").read_text())
    model = timm.create_model(DIGITS_ARCHITECTURE, pretrained=False, **DIGITS_KWARGS)
    model.load_state_dict(load_file(DIGITS_WEIGHTS), strict=True)
    model.eval()

    _, _, images, labels = digits_split()
    rgb = np.stack([np.asarray(Image.fromarray(d).convert("RGB")) for d in images])
    x = torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(DIGITS_MEAN).view(1, 3, 1, 1)) / torch.tensor(DIGITS_STD).view(1, 3, 1, 1)
    with torch.inference_mode():
        predicted = model(x).argmax(1).numpy()
    accuracy = float((predicted == labels).mean())

    assert metrics["split"]["test"] == 1000
    assert accuracy >= 0.97
    assert accuracy == pytest.approx(metrics["test_accuracy"], abs=0.001)
