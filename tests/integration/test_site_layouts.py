"""Site layouts that once came out wrong, each checked on a real server against plain hooks:
CoaT's aggregating head on a batch, ConViT's blocks before its class token joins, and Swin's
stages whose one window covers the whole map."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import timm
import torch
import yaml

from vitscope import Client
from vitscope_server.settings import ServerSettings
from vitscope_server.transport.app import create_server

MODELS: list[dict[str, Any]] = [
    # coat_tiny's head aggregates the class tokens of its last three stages.
    {"name": "coat", "architecture": "coat_tiny", "kwargs": {"img_size": 64, "num_classes": 5}},
    # 56 px in patches of 4: a 14 x 14 grid, whose 196 tokens also factor as 1 + 13 x 15.
    {
        "name": "convit",
        "architecture": "convit_tiny",
        "kwargs": {
            "img_size": 56,
            "patch_size": 4,
            "embed_dim": 16,
            "depth": 3,
            "local_up_to_layer": 2,
            "num_classes": 5,
        },
    },
    # Maps of 16, 8 and 4 tokens a side in windows of 4: the last stage is one window.
    {
        "name": "swin",
        "architecture": "swin_tiny_patch4_window7_224",
        "kwargs": {
            "img_size": 64,
            "window_size": 4,
            "embed_dim": 16,
            "depths": [1, 1, 1],
            "num_heads": [1, 2, 2],
            "num_classes": 5,
        },
    },
]


def build(name: str) -> torch.nn.Module:
    spec = next(m for m in MODELS if m["name"] == name)
    torch.manual_seed(4)
    return timm.create_model(spec["architecture"], pretrained=False, **spec["kwargs"]).eval()


@pytest.fixture(scope="module")
def lc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    folder = tmp_path_factory.mktemp("site_layouts")
    models_file = folder / "models.yaml"
    models = [{**m, "family": "timm", "seed": 4} for m in MODELS]
    models_file.write_text(yaml.safe_dump({"models": models}))
    settings = ServerSettings(
        host="127.0.0.1", port=0, metrics_port=-1, models_file=models_file, default_model="coat"
    )
    running = create_server(settings)
    assert running.registry.wait_until_settled(timeout=300)
    with Client(f"127.0.0.1:{running.port}", timeout=120) as client:
        yield client
    running.stop(0)


def pixels_for(client: Client, name: str, batch: int = 3) -> torch.Tensor:
    size = client.describe(name).input_size
    return torch.randn((batch, *size), generator=torch.Generator().manual_seed(2))


def test_coat_predictions_on_a_batch_run_its_aggregating_head(lc: Client) -> None:
    pixels = pixels_for(lc, "coat", batch=2)
    result = lc.activations(list(pixels.numpy()), [], model="coat", top_predictions=2)
    with torch.no_grad():
        probabilities = build("coat")(pixels).softmax(dim=-1)
    for image, expected in zip(result.predictions, probabilities, strict=True):
        top = expected.topk(2)
        assert [p.class_index for p in image] == top.indices.tolist()
        np.testing.assert_allclose(
            [p.probability for p in image], top.values.numpy(), rtol=1e-4, atol=1e-6
        )


def test_convit_blocks_before_the_class_token_have_no_prefix_on_the_whole_grid(
    lc: Client,
) -> None:
    sites = lc.describe("convit").sites
    for block, prefix in ((0, 0), (1, 0), (2, 1)):
        site = sites[f"blocks.{block}.out"]
        layout = [site.get(key, 0) for key in ("prefix_token_count", "grid_height", "grid_width")]
        assert layout == [prefix, 14, 14]
    model = build("convit")
    pixels = pixels_for(lc, "convit", batch=2)
    hidden: dict[int, torch.Tensor] = {}
    handles = [
        model.blocks[i].mlp.fc2.register_forward_pre_hook(
            lambda m, a, i=i: hidden.__setitem__(i, a[0])
        )
        for i in (0, 2)
    ]
    with torch.no_grad():
        model(pixels)
    for handle in handles:
        handle.remove()
    result = lc.activations(
        list(pixels.numpy()),
        ["blocks.0.mlp.hidden", "blocks.2.mlp.hidden"],
        model="convit",
        reduction="mean",
    )
    # The mean over patch tokens: all 196 tokens before the class token joins, 196 of 197 after.
    np.testing.assert_allclose(
        result["blocks.0.mlp.hidden"], hidden[0].mean(dim=1).numpy(), rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(
        result["blocks.2.mlp.hidden"], hidden[2][:, 1:].mean(dim=1).numpy(), rtol=1e-4, atol=1e-5
    )


def test_swin_one_window_stage_keeps_the_windowed_layout(lc: Client) -> None:
    model = build("swin")
    blocks = [b for stage in model.layers for b in stage.blocks]
    probs: dict[int, torch.Tensor] = {}
    for i, block in enumerate(blocks):
        block.attn.fused_attn = False
        block.attn.attn_drop.register_forward_hook(lambda m, a, o, i=i: probs.__setitem__(i, o))
    pixels = pixels_for(lc, "swin", batch=2)
    with torch.no_grad():
        model(pixels)
    sites = lc.describe("swin").sites
    names = [f"blocks.{i}.attn.probs" for i in range(len(blocks))]
    result = lc.activations(list(pixels.numpy()), names, model="swin")
    for i, name in enumerate(names):
        windows = probs[i].shape[0] // 2
        assert sites[name]["layout"] == sites[names[0]]["layout"]
        assert [int(n) for n in sites[name]["shape"]] == [1, windows, *probs[i].shape[1:]]
        expected = probs[i].reshape(2, windows, *probs[i].shape[1:]).numpy()
        np.testing.assert_allclose(result[name], expected, rtol=1e-4, atol=1e-6)
    assert probs[len(blocks) - 1].shape[0] == 2, "the last stage is one window per image"
