"""Servers the tests start: small real models on the test device, and how to start one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

from vitscope_server.settings import ServerSettings
from vitscope_server.transport.app import RunningServer, create_server

# The device every test server computes on: VITSCOPE_TEST_DEVICE=cuda runs them on a GPU.
DEVICE = os.environ.get("VITSCOPE_TEST_DEVICE", "cpu")


# Small real architectures: a ViT, a distilled DeiT (two prefix tokens), a Swin and an open_clip tower.
TEST_MODELS: list[dict[str, object]] = [
    {"name": "vit", "family": "timm", "architecture": "test_vit", "seed": 1},
    {
        "name": "deit",
        "family": "timm",
        "architecture": "deit_tiny_distilled_patch16_224",
        "seed": 2,
        "kwargs": {"img_size": 64, "depth": 2, "embed_dim": 48, "num_heads": 3, "num_classes": 7},
    },
    {
        "name": "swin",
        "family": "timm",
        "architecture": "swin_tiny_patch4_window7_224",
        "seed": 3,
        "kwargs": {
            "img_size": 64,
            "window_size": 4,
            "embed_dim": 32,
            "depths": [2, 2],
            "num_heads": [2, 4],
            "num_classes": 5,
        },
    },
    {
        "name": "clip",
        "family": "open_clip",
        "architecture": "ViT-B-32",
        "seed": 4,
        "kwargs": {
            "embed_dim": 32,
            "vision_cfg": {
                "image_size": 64,
                "layers": 2,
                "width": 64,
                "patch_size": 16,
                "head_width": 32,
            },
            "text_cfg": {
                "context_length": 16,
                "vocab_size": 1000,
                "width": 64,
                "heads": 2,
                "layers": 1,
            },
        },
    },
]

# An open_clip tower whose final norm runs after pooling: its 'final' site is one vector per image.
TEST_MODELS.append(
    {
        "name": "clip-pooled",
        "family": "open_clip",
        "architecture": "ViT-B-32",
        "seed": 5,
        "kwargs": {
            "embed_dim": 32,
            "vision_cfg": {
                "image_size": 32,
                "layers": 1,
                "width": 32,
                "patch_size": 16,
                "head_width": 16,
                "final_ln_after_pool": True,
            },
            "text_cfg": {
                "context_length": 8,
                "vocab_size": 100,
                "width": 32,
                "heads": 2,
                "layers": 1,
            },
        },
    }
)


def start(
    tmp_dir: Path, models: list[dict[str, object]] | None = None, **overrides: object
) -> RunningServer:
    """A server on the test device with `models` (default TEST_MODELS) and the built-ins."""
    if DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.skip("VITSCOPE_TEST_DEVICE=cuda but torch finds no CUDA device")
    models_file = tmp_dir / "models.yaml"
    models_file.write_text(yaml.safe_dump({"models": TEST_MODELS if models is None else models}))
    settings = ServerSettings(
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        models_file=models_file,
        **{"device": DEVICE, **overrides},  # type: ignore[arg-type]
    )
    running = create_server(settings)
    assert running.registry.wait_until_settled(timeout=120)
    return running


# An open_clip tower with a text tower whose vocabulary is open_clip's own tokenizer's, so
# that class names and prompts embed (class projection, Explain).
CLIP_WITH_TEXT: dict[str, object] = {
    "name": "clip",
    "family": "open_clip",
    "architecture": "ViT-B-32",
    "seed": 4,
    "kwargs": {
        "embed_dim": 16,
        "vision_cfg": {
            "image_size": 32,
            "layers": 2,
            "width": 32,
            "patch_size": 8,
            "head_width": 16,
        },
        "text_cfg": {
            "context_length": 24,
            "vocab_size": 49408,
            "width": 32,
            "heads": 2,
            "layers": 1,
        },
    },
}
