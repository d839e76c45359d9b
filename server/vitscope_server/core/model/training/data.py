"""Images and labels for classifier training: seeded stratified splits and ImageFolder trees.

Folder images go through timm's eval transform with the settings the served model records
(crop_pct 1.0, bilinear), so training sees the pixels the server feeds the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform

from vitscope_server.core.model.image_folders import IMAGE_SUFFIXES
from vitscope_server.core.runtime.errors import InvalidArgument, NotFound, Reason

# How the trained model's inputs are resized and cropped; its spec records the same values.
CROP_PCT = 1.0
INTERPOLATION = "bilinear"

Part = tuple[torch.Tensor, torch.Tensor]


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Splits indices per class with a seeded permutation: (kept, held_out), both sorted.

    Stratifying keeps every class represented in proportion even in small folders.
    """
    rng = np.random.default_rng(seed)
    held_out = []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        held_out.append(members[: round(len(members) * fraction)])
    held = np.sort(np.concatenate(held_out))
    kept = np.setdiff1d(np.arange(len(labels)), held)
    return kept, held


def eval_loader(size: int) -> Callable[[Path], torch.Tensor]:
    """A file -> RGB uint8 [3, size, size]: timm's eval transform (shorter side resized to
    `size`, then center-cropped), without its float conversion and normalization."""
    transform = create_transform(
        input_size=(3, size, size),
        interpolation=INTERPOLATION,
        crop_pct=CROP_PCT,
        is_training=False,
        use_prefetcher=True,  # ends with the uint8 tensor; the training loop normalizes
    )

    def load(path: Path) -> torch.Tensor:
        with Image.open(path) as image:
            tensor: torch.Tensor = transform(image.convert("RGB"))
        return tensor

    return load


@dataclass(frozen=True)
class Dataset:
    """uint8 images ([N, H, W] grayscale or [N, C, H, W]), int64 labels and the class names,
    split into the training part and the held-out test part."""

    train: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]
    class_names: list[str]
    source: str


def image_folder(root: Path, size: int, test_fraction: float, seed: int) -> Dataset:
    """An ImageFolder tree (ROOT/<class name>/<image>), classes in sorted order, with a seeded
    stratified test split."""
    if not root.is_dir():
        raise NotFound(
            Reason.DATA_NOT_FOUND, str(root), f"--data: {root} is not a folder", field="--data"
        )
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    if len(class_dirs) < 2:
        raise InvalidArgument(
            "--data", f"{root}: need two class subfolders, found {len(class_dirs)}"
        )
    load = eval_loader(size)
    images: list[torch.Tensor] = []
    labels: list[int] = []
    for index, class_dir in enumerate(class_dirs):
        files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise InvalidArgument("--data", f"{class_dir}: no images ({', '.join(IMAGE_SUFFIXES)})")
        images.extend(load(f) for f in files)
        labels.extend([index] * len(files))
    stacked, label_array = torch.stack(images).numpy(), np.asarray(labels, dtype=np.int64)
    train, test = stratified_split(label_array, test_fraction, seed)
    return Dataset(
        train=(stacked[train], label_array[train]),
        test=(stacked[test], label_array[test]),
        class_names=[d.name for d in class_dirs],
        source=str(root),
    )


@dataclass(frozen=True)
class Splits:
    """uint8 NCHW images and int64 labels of the fit, validation and test parts."""

    fit: Part
    val: Part
    test: Part
    class_names: list[str]
    source: str


def _part(images: np.ndarray, labels: np.ndarray) -> Part:
    tensor = torch.from_numpy(np.ascontiguousarray(images))
    nchw = tensor.unsqueeze(1) if tensor.ndim == 3 else tensor
    return nchw.contiguous(), torch.from_numpy(np.ascontiguousarray(labels))


def training_splits(data: Dataset, val_fraction: float, seed: int) -> Splits:
    """The test part as given; the training part split again (stratified, seeded) into the
    part trained on and a validation part that only monitors the run."""
    images, labels = data.train
    fit, val = stratified_split(labels, val_fraction, seed)
    return Splits(
        fit=_part(images[fit], labels[fit]),
        val=_part(images[val], labels[val]),
        test=_part(*data.test),
        class_names=data.class_names,
        source=data.source,
    )
