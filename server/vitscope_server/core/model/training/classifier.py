"""Reproducible CPU training of a timm ViT classifier, and the weights and metrics it writes.

The recipe is timm's and torchvision's parts put together: AdamW with weight decay on
matrices only (timm.optim), per-step linear warm-up then cosine decay (timm.scheduler), label
smoothing and a random affine augmentation per image (torchvision.transforms.v2). Everything is
seeded and runs deterministically on CPU; a JSON metrics file (test accuracy, split sizes,
recipe, versions) is written next to the weights.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from torchvision.transforms import v2

from vitscope_server.core.model.training.data import CROP_PCT, INTERPOLATION, Part, Splits
from vitscope_server.core.model.training.initialization import INIT, small_data_init
from vitscope_server.core.runtime.atomic_files import write_atomically, write_text_atomically
from vitscope_server.core.runtime.errors import InvalidArgument


@dataclass(frozen=True)
class Recipe:
    """The optimization settings; recorded in the metrics file so a run can be repeated."""

    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 2
    label_smoothing: float = 0.1
    max_rotate_deg: float = 15.0
    max_translate_px: float = 3.0
    max_scale_delta: float = 0.15


@dataclass(frozen=True)
class Classifier:
    """What to train: a timm architecture with its kwargs (num_classes comes from the data)
    and the normalization its inputs get, in training as in serving."""

    architecture: str
    kwargs: dict[str, object]
    mean: tuple[float, ...]
    std: tuple[float, ...]


def seed_everything(seed: int) -> None:
    """Seeds python, numpy and torch and forbids nondeterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """[0, 1] images with 1 or 3 channels -> normalized RGB, as the server feeds the model."""
    x = x.expand(-1, 3, -1, -1)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def affine_augmentation(recipe: Recipe, height: int, width: int) -> v2.RandomAffine:
    """A small random rotation, scale and (whole-pixel) translation, bilinear, zero padding.

    It draws from torch's global generator, which seed_everything seeds.
    """
    return v2.RandomAffine(
        degrees=recipe.max_rotate_deg,
        translate=(recipe.max_translate_px / width, recipe.max_translate_px / height),
        scale=(1 - recipe.max_scale_delta, 1 + recipe.max_scale_delta),
        interpolation=v2.InterpolationMode.BILINEAR,
        fill=0,
    )


def augment(x: torch.Tensor, affine: v2.RandomAffine) -> torch.Tensor:
    """Each image of the batch with its own draw (RandomAffine draws once per call)."""
    return torch.stack([affine(image) for image in x])


@torch.inference_mode()
def accuracy(
    model: torch.nn.Module, part: Part, classifier: Classifier, batch_size: int = 500
) -> float:
    """Top-1 accuracy of `model` on a part's uint8 NCHW images."""
    images, labels = part
    model.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        x = normalize(
            images[start : start + batch_size].float() / 255, classifier.mean, classifier.std
        )
        correct += int((model(x).argmax(1) == labels[start : start + batch_size]).sum())
    return correct / max(len(images), 1)


def _schedule(
    optimizer: torch.optim.Optimizer, recipe: Recipe, steps_per_epoch: int
) -> CosineLRScheduler:
    """Per step: linear warm-up from lr / warm-up steps to lr, then cosine decay to zero."""
    total, warmup = recipe.epochs * steps_per_epoch, recipe.warmup_epochs * steps_per_epoch
    return CosineLRScheduler(
        optimizer,
        t_initial=max(total - warmup, 1),
        lr_min=0.0,
        warmup_t=warmup,
        warmup_lr_init=recipe.lr / max(warmup, 1),
        warmup_prefix=True,
        t_in_epochs=False,
    )


def train(
    model: torch.nn.Module, splits: Splits, recipe: Recipe, classifier: Classifier, seed: int
) -> float:
    """Trains on the fit part; returns the final val accuracy.

    The final weights are kept: a 200-digit validation slice moves in 0.5% steps, so picking
    the "best" epoch by it would select noise. It is reported per epoch to watch the run.
    """
    generator = torch.Generator().manual_seed(seed)
    train_x, train_y = splits.fit
    affine = affine_augmentation(recipe, *train_x.shape[-2:])
    # AdamW, weight decay on matrices and embeddings, none on biases and norms.
    optimizer = torch.optim.AdamW(
        param_groups_weight_decay(model, recipe.weight_decay), lr=recipe.lr
    )
    scheduler = _schedule(optimizer, recipe, math.ceil(len(train_x) / recipe.batch_size))
    steps = 0
    for epoch in range(1, recipe.epochs + 1):
        model.train()
        started, loss_sum = time.perf_counter(), 0.0
        order = torch.randperm(len(train_x), generator=generator)
        for start in range(0, len(order), recipe.batch_size):
            batch = order[start : start + recipe.batch_size]
            x = augment(train_x[batch].float() / 255, affine)
            loss = F.cross_entropy(
                model(normalize(x, classifier.mean, classifier.std)),
                train_y[batch],
                label_smoothing=recipe.label_smoothing,
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            scheduler.step_update(steps)
            loss_sum += loss.item() * len(batch)
        val_acc = accuracy(model, splits.val, classifier)
        print(
            f"epoch {epoch:3d}/{recipe.epochs}  loss {loss_sum / len(train_x):.4f}  "
            f"val_acc {val_acc:.4f}  lr {optimizer.param_groups[0]['lr']:.2e}  "
            f"{time.perf_counter() - started:.1f}s",
            flush=True,
        )
    return val_acc


def save(model: torch.nn.Module, out: Path, arch: str, metrics: dict[str, object]) -> None:
    """The state dict as safetensors and the metrics beside it, each written atomically."""
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    write_atomically(out, lambda temp: save_file(state, str(temp), metadata={"architecture": arch}))
    write_text_atomically(out.with_suffix(".json"), json.dumps(metrics, indent=2) + "\n")
    print(f"wrote {out} and {out.with_suffix('.json')}", flush=True)


def build_model(classifier: Classifier, num_classes: int) -> VisionTransformer:
    """The timm ViT, re-initialized for small data."""
    kwargs: dict[str, Any] = {**classifier.kwargs, "num_classes": num_classes}
    model = timm.create_model(classifier.architecture, pretrained=False, **kwargs)
    if not isinstance(model, VisionTransformer):
        raise InvalidArgument(
            "--arch", f"{classifier.architecture} is not a timm VisionTransformer"
        )
    small_data_init(model)
    return model


def train_classifier(
    splits: Splits, classifier: Classifier, recipe: Recipe, seed: int, out: Path
) -> dict[str, object]:
    """Trains, evaluates on the held-out test part, writes weights + metrics; returns metrics."""
    seed_everything(seed)
    started = time.perf_counter()
    print(
        f"data {splits.source}: {len(splits.fit[0])} train, {len(splits.val[0])} val, "
        f"{len(splits.test[0])} test, {len(splits.class_names)} classes",
        flush=True,
    )
    model = build_model(classifier, len(splits.class_names))
    val_acc = train(model, splits, recipe, classifier, seed)
    test_acc = accuracy(model, splits.test, classifier)
    seconds = time.perf_counter() - started
    print(
        f"final val_acc {val_acc:.4f}  test_acc {test_acc:.4f}  "
        f"({len(splits.test[0])} held-out images)  {seconds:.0f}s",
        flush=True,
    )
    metrics: dict[str, object] = {
        "data": splits.source,
        "class_names": splits.class_names,
        "architecture": classifier.architecture,
        "kwargs": {**classifier.kwargs, "num_classes": len(splits.class_names)},
        "mean": list(classifier.mean),
        "std": list(classifier.std),
        "crop_pct": CROP_PCT,
        "interpolation": INTERPOLATION,
        "seed": seed,
        "split": {
            "train": len(splits.fit[0]),
            "val": len(splits.val[0]),
            "test": len(splits.test[0]),
        },
        "init": INIT,
        "recipe": asdict(recipe),
        "val_accuracy": val_acc,
        "test_accuracy": test_acc,
        "train_seconds": round(seconds, 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "torchvision": torchvision.__version__,
    }
    save(model, out, classifier.architecture, metrics)
    return metrics
