"""Training modular inverters: each inverse module independently, against the frozen model.

Module `embed` learns pixels ([0, 1] RGB, MSE) from the `embed` tokens; module `blocks.{i}`
learns a block's input tokens from its output tokens (MSE in token space). Every module
reads its pairs from the frozen model (eval mode, no gradients) through the same capture
hooks the server uses, so training and serving see identical tensors.

Each epoch ends with a validation MSE and a resume checkpoint (weights, optimizer, history),
written atomically; the best validation epoch is what the store keeps.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from vitscope_server.core.inversion.invert import representations
from vitscope_server.core.inversion.modules import (
    EMBED,
    LinearInverseEmbed,
    build_module,
    geometry_of,
    module_name,
)
from vitscope_server.core.inversion.store import save_module
from vitscope_server.core.model.image_folders import list_images
from vitscope_server.core.model.images import ALLOWED_FORMATS, ImageInput, prepare_batch
from vitscope_server.core.model.loading import LoadedModel
from vitscope_server.core.model.pixels import denormalize
from vitscope_server.core.model.provenance import library_versions
from vitscope_server.core.runtime.atomic_files import write_atomically
from vitscope_server.core.runtime.cancel import NEVER_CANCELLED
from vitscope_server.core.runtime.errors import InvalidArgument, VitscopeError

# Training reads the operator's own files: only PIL's decompression-bomb limit bounds them.
TRAINING_MAX_PIXELS = Image.MAX_IMAGE_PIXELS or sys.maxsize


@dataclass(frozen=True)
class TrainConfig:
    """The authors' optimizer settings (Adam, lr 1e-3, batch 64-128); epochs are the caller's."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    val_fraction: float = 0.1
    seed: int = 0
    embed_kind: str = "conv"


def folder_images(loaded: LoadedModel, folder: Path) -> torch.Tensor:
    """Model inputs [N, 3, H, W] of the images under `folder`, read as the server reads a scan
    folder (same file types, same decoding and format checks), through the model's transform."""
    files = list_images(folder)
    if not files:
        raise InvalidArgument("--data", f"{folder}: no images ({', '.join(ALLOWED_FORMATS)}) found")
    inputs = []
    for name, path in files:
        try:
            image = ImageInput(encoded=path.read_bytes())
            inputs.append(prepare_batch(loaded.adapter, [image], 1, TRAINING_MAX_PIXELS)[0])
        except VitscopeError as exc:
            raise InvalidArgument("--data", f"{folder}: {name}: {exc}") from None
    return torch.stack(inputs)


def array_images(loaded: LoadedModel, images: Sequence[np.ndarray] | np.ndarray) -> torch.Tensor:
    """Model inputs [N, 3, H, W] of decoded uint8 images, through the model's transform."""
    inputs = [ImageInput(pixels=image) for image in images]
    return prepare_batch(loaded.adapter, inputs, len(inputs), TRAINING_MAX_PIXELS)


def training_pairs(
    loaded: LoadedModel, name: str, inputs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(what the inverse module reads, what it must produce) for a batch of model inputs."""
    adapter = loaded.adapter
    with torch.no_grad():
        if name == EMBED:
            tokens = representations(adapter, inputs, [0], NEVER_CANCELLED)[0]
            return tokens, denormalize(inputs, adapter.data_config)
        block = int(name.removeprefix("blocks."))
        reps = representations(adapter, inputs, [block, block + 1], NEVER_CANCELLED)
        return reps[block + 1], reps[block]


# Pairs of one module are kept in memory up to this size instead of recomputed every epoch.
PAIR_CACHE_BYTES = 2 << 30


class Pairs:
    """A module's training pairs for a set of model inputs.

    The frozen model is deterministic and there is no augmentation, so every epoch would
    recompute the same tensors: they are computed once when they fit in PAIR_CACHE_BYTES,
    else per batch.
    """

    def __init__(self, loaded: LoadedModel, name: str, inputs: torch.Tensor, batch: int) -> None:
        self.loaded, self.name, self.inputs = loaded, name, inputs
        self.cached: tuple[torch.Tensor, torch.Tensor] | None = None
        source, target = training_pairs(loaded, name, inputs[:1])
        if (source.numel() + target.numel()) * 4 * len(inputs) <= PAIR_CACHE_BYTES:
            parts = [
                training_pairs(loaded, name, inputs[start : start + batch])
                for start in range(0, len(inputs), batch)
            ]
            self.cached = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))

    def __len__(self) -> int:
        return len(self.inputs)

    def take(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cached is not None:
            return self.cached[0][indices], self.cached[1][indices]
        return training_pairs(self.loaded, self.name, self.inputs[indices])


def fit_linear_embed(loaded: LoadedModel, module: LinearInverseEmbed) -> None:
    """The pseudo-inverse of the patch projection, after subtracting bias + position embedding.

    Needs an affine embedding: a timm ViT whose patch and pre-block norms are identities.
    """
    root = loaded.adapter.root
    patch_embed = getattr(root, "patch_embed", None)
    affine = (
        loaded.spec.family == "timm"
        and patch_embed is not None
        and isinstance(getattr(patch_embed, "norm", None), torch.nn.Identity)
        and isinstance(getattr(root, "norm_pre", torch.nn.Identity()), torch.nn.Identity)
    )
    if not affine:
        raise InvalidArgument(
            "--embed-kind",
            f"linear: {loaded.spec.name} has no affine patch embedding "
            "(it needs a timm ViT without patch or pre-block norms); use conv",
        )
    weight = patch_embed.proj.weight.detach().cpu()  # type: ignore[union-attr]
    projection = weight.reshape(weight.shape[0], -1)
    if projection.shape[1] > projection.shape[0]:
        raise InvalidArgument(
            "--embed-kind",
            f"linear: 3*P*P = {projection.shape[1]} exceeds width "
            f"{projection.shape[0]}; the projection has no exact inverse; use conv",
        )
    blank = torch.zeros((1, *loaded.adapter.data_config.input_size), device=loaded.device)
    tokens = representations(loaded.adapter, blank, [0], NEVER_CANCELLED)[0]
    module.fit(projection, tokens[0, loaded.adapter.num_prefix_tokens :].detach().cpu())


def _split(count: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    held = max(1, round(count * fraction))
    return order[held:], order[:held]


def _evaluate(module: torch.nn.Module, pairs: Pairs, batch: int) -> float:
    module.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(pairs), batch):
            source, target = pairs.take(torch.arange(start, min(start + batch, len(pairs))))
            total += float(((module(source) - target) ** 2).sum())
            count += target.numel()
    return total / max(count, 1)


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    write_atomically(path, lambda temp: torch.save(state, temp))


@dataclass
class _Progress:
    """Where a module's training stands: restored from a checkpoint or fresh."""

    module: torch.nn.Module
    optimizer: torch.optim.Optimizer | None
    history: list[float] = field(default_factory=list)
    best_val: float = math.inf
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)
    first_epoch: int = 1

    def checkpoint(self, epoch: int) -> dict[str, Any]:
        assert self.optimizer is not None
        return {
            "epoch": epoch,
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "history": self.history,
            "best_val": self.best_val,
            "best_epoch": self.best_epoch,
            "best_module": self.best_state,
        }


def _start(
    loaded: LoadedModel,
    module: torch.nn.Module,
    kind: str,
    config: TrainConfig,
    checkpoint: Path | None,
    val_pairs: Pairs,
) -> _Progress:
    """A linear embed inverse is solved outright; others start fresh or from `checkpoint`."""
    if kind == "linear":
        assert isinstance(module, LinearInverseEmbed)
        fit_linear_embed(loaded, module)
        val = _evaluate(module, val_pairs, config.batch_size)
        return _Progress(module, None, [val], val, 0, module.state_dict(), config.epochs + 1)
    progress = _Progress(module, torch.optim.Adam(module.parameters(), lr=config.lr))
    progress.best_state = copy.deepcopy(module.state_dict())
    if checkpoint is not None:
        state = torch.load(checkpoint, weights_only=True)
        module.load_state_dict(state["module"])
        progress.optimizer.load_state_dict(state["optimizer"])  # type: ignore[union-attr]
        progress.history, progress.best_val = state["history"], state["best_val"]
        progress.best_epoch, progress.best_state = state["best_epoch"], state["best_module"]
        progress.first_epoch = int(state["epoch"]) + 1
    return progress


def _train_epoch(
    progress: _Progress, pairs: Pairs, order: torch.Tensor, desc: str, batch: int
) -> None:
    """One pass over `pairs` in `order`, with a progress bar on stderr."""
    module, optimizer = progress.module, progress.optimizer
    assert optimizer is not None
    module.train()
    bar = tqdm(range(0, len(order), batch), desc=desc, file=sys.stderr, leave=False)
    for start in bar:
        source, target = pairs.take(order[start : start + batch])
        loss = ((module(source) - target) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(mse=f"{loss.item():.5f}")


def _run_epochs(
    progress: _Progress,
    name: str,
    index: int,
    pairs: tuple[Pairs, Pairs],
    config: TrainConfig,
    checkpoint: Path,
    log: Callable[[str], None],
) -> None:
    """Epochs from progress.first_epoch on, each seeded, validated and checkpointed."""
    train_pairs, val_pairs = pairs
    generator = torch.Generator()
    for epoch in range(progress.first_epoch, config.epochs + 1):
        generator.manual_seed(config.seed + index * 1000 + epoch)
        order = torch.randperm(len(train_pairs), generator=generator)
        desc = f"{name} {epoch}/{config.epochs}"
        _train_epoch(progress, train_pairs, order, desc, config.batch_size)
        val = _evaluate(progress.module, val_pairs, config.batch_size)
        progress.history.append(val)
        if val < progress.best_val:
            progress.best_val, progress.best_epoch = val, epoch
            progress.best_state = copy.deepcopy(progress.module.state_dict())
        log(
            f"{name}: epoch {epoch}/{config.epochs} val_mse {val:.6f} (best {progress.best_val:.6f})"
        )
        _save_checkpoint(checkpoint, progress.checkpoint(epoch))


def _metadata(
    loaded: LoadedModel,
    name: str,
    kind: str,
    data_label: str,
    pairs: tuple[Pairs, Pairs],
    config: TrainConfig,
    progress: _Progress,
    seconds: float,
) -> dict[str, Any]:
    """What the store records beside a module's weights."""
    return {
        "module": name,
        "kind": kind,
        "model": loaded.spec.name,
        "architecture": loaded.spec.architecture,
        "weights_identity": loaded.weights_identity,
        "geometry": geometry_of(loaded).as_json(),
        "data": data_label,
        "train_images": len(pairs[0]),
        "val_images": len(pairs[1]),
        "recipe": asdict(config),
        "val_mse_history": progress.history,
        "best_val_mse": progress.best_val,
        "best_epoch": progress.best_epoch,
        "parameters": sum(p.numel() for p in progress.module.parameters()),
        "seconds": round(seconds, 1),
        "libraries": library_versions(),
    }


def train_module(
    loaded: LoadedModel,
    index: int,
    inputs: torch.Tensor,
    data_label: str,
    store: Path,
    config: TrainConfig,
    resume: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Trains module `index` (0 = embed, i = blocks.{i-1}) into `store`; returns its metadata."""
    name = module_name(index)
    if not 0 <= index <= len(loaded.adapter.blocks):
        raise InvalidArgument(
            "--module-index",
            f"{index} not allowed; allowed 0..{len(loaded.adapter.blocks)} "
            "(0 = embed, i = blocks.{i-1})",
        )
    checkpoint = store / f"{name}.ckpt"
    finished = store / f"{name}.json"
    if resume and finished.exists() and not checkpoint.exists():
        log(f"{name}: already trained in {store}; kept")
        meta: dict[str, Any] = json.loads(finished.read_text())
        return meta
    kind = config.embed_kind if name == EMBED else "block"
    torch.manual_seed(config.seed + index)
    module = build_module(name, kind, geometry_of(loaded)).to(loaded.device)
    fit_idx, val_idx = _split(len(inputs), config.val_fraction, config.seed)
    pairs = (
        Pairs(loaded, name, inputs[fit_idx], config.batch_size),
        Pairs(loaded, name, inputs[val_idx], config.batch_size),
    )
    started = time.perf_counter()
    restore = checkpoint if resume and checkpoint.exists() else None
    progress = _start(loaded, module, kind, config, restore, pairs[1])
    if restore is not None and kind != "linear":
        log(f"{name}: resuming after epoch {progress.first_epoch - 1}")
    _run_epochs(progress, name, index, pairs, config, checkpoint, log)
    module.load_state_dict(progress.best_state)
    seconds = time.perf_counter() - started
    meta = _metadata(loaded, name, kind, data_label, pairs, config, progress, seconds)
    save_module(store, name, module, meta)
    checkpoint.unlink(missing_ok=True)
    return meta


def train_inverter(
    loaded: LoadedModel,
    inputs: torch.Tensor,
    data_label: str,
    store: Path,
    indices: list[int],
    config: TrainConfig,
    resume: bool = False,
) -> list[dict[str, Any]]:
    """Trains the given modules one after another (each process of a parallel job gets one)."""
    print(f"{loaded.spec.name}: {len(inputs)} training images from {data_label}", flush=True)
    return [train_module(loaded, i, inputs, data_label, store, config, resume) for i in indices]
