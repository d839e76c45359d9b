"""ViT variants whose blocks differ in detail: LayerScale as a module (DeiT III) or as a
parameter (BEiT, EVA), post-norm residual blocks, relative position bias, rotary position
embeddings, SwiGLU MLPs. Sites keep their meaning; class-space methods work or refuse
with FAILED_PRECONDITION naming the model and the reason."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import timm
import torch
import yaml

from vitscope import Client, FailedPreconditionError
from vitscope_server.settings import ServerSettings
from vitscope_server.transport.app import create_server

TINY = {"img_size": 32, "depth": 2, "num_classes": 5}
VARIANTS: list[dict[str, Any]] = [
    {
        "name": "layerscale-module",
        "architecture": "deit3_small_patch16_224",
        "kwargs": {**TINY, "embed_dim": 32, "num_heads": 2},
    },
    {
        "name": "post-norm",
        "architecture": "vit_base_patch16_rpn_224",
        "kwargs": {**TINY, "embed_dim": 32, "num_heads": 2},
    },
    {
        "name": "layerscale-parameter",
        "architecture": "beit_base_patch16_224",
        "kwargs": {**TINY, "embed_dim": 32, "num_heads": 2},
    },
    {
        "name": "rotary-swiglu",
        "architecture": "eva02_tiny_patch14_224",
        "kwargs": {**TINY, "img_size": 28},
    },
]
NAMES = [v["name"] for v in VARIANTS]


@pytest.fixture(scope="module")
def variant_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    models_file = tmp_path_factory.mktemp("variants") / "models.yaml"
    models = [{**v, "family": "timm", "seed": 21} for v in VARIANTS]
    models_file.write_text(yaml.safe_dump({"models": models}))
    settings = ServerSettings(
        host="127.0.0.1", port=0, metrics_port=-1, models_file=models_file, default_model=NAMES[0]
    )
    running = create_server(settings)
    assert running.registry.wait_until_settled(timeout=300)
    with Client(f"127.0.0.1:{running.port}", timeout=120) as client:
        yield client
    running.stop(0)


def _build(name: str) -> Any:
    variant = next(v for v in VARIANTS if v["name"] == name)
    torch.manual_seed(21)
    return timm.create_model(variant["architecture"], pretrained=False, **variant["kwargs"]).eval()


def _pixels(client: Client, name: str) -> torch.Tensor:
    size = client.describe(name).input_size
    return torch.randn((2, *size), generator=torch.Generator().manual_seed(5))


def _mlp_reference(model: Any, pixels: torch.Tensor) -> dict[int, np.ndarray]:
    """The MLP hidden layer recomputed from the MLP's input, then the MLP's own norm:
    act(fc1) for a plain MLP, the gated product for a GLU (split or packed)."""
    inputs: dict[int, torch.Tensor] = {}
    handles = [
        block.mlp.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0]))
        for i, block in enumerate(model.blocks)
    ]
    with torch.inference_mode():
        model(pixels)
        hidden = {}
        for i, block in enumerate(model.blocks):
            mlp, x = block.mlp, inputs[i]
            if hasattr(mlp, "fc1_g"):
                h = mlp.act(mlp.fc1_g(x)) * mlp.fc1_x(x)
            elif hasattr(mlp, "gate_last"):  # packed GLU: one fc1, halves gated
                first, second = mlp.fc1(x).chunk(2, dim=-1)
                h = first * mlp.act(second) if mlp.gate_last else mlp.act(first) * second
            else:
                h = mlp.act(mlp.fc1(x))
            hidden[i] = mlp.norm(h).numpy()
    for handle in handles:
        handle.remove()
    return hidden


@pytest.mark.parametrize("name", NAMES)
def test_sites_keep_their_meaning(variant_client: Client, name: str) -> None:
    description = variant_client.describe(name)
    # A post-norm block's attn.out is normed after the heads add up: no per-head split of it.
    heads_refused = {
        f"blocks.{i}.attn.heads": "the heads' contributions do not add up to attn.out (a norm "
        "or gate between them)"
        for i in range(description.block_count)
    }
    assert description.unavailable_sites == (heads_refused if name == "post-norm" else {})
    pixels = _pixels(variant_client, name)
    result = variant_client.activations(list(pixels.numpy()), list(description.sites), model=name)
    previous = result["embed"]
    hidden = _mlp_reference(_build(name), pixels)
    for i in range(description.block_count):
        total = previous + result[f"blocks.{i}.attn.out"] + result[f"blocks.{i}.mlp.out"]
        np.testing.assert_allclose(result[f"blocks.{i}.out"], total, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(result[f"blocks.{i}.mlp.hidden"], hidden[i], atol=2e-5)
        probs = result[f"blocks.{i}.attn.probs"]
        np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
        previous = result[f"blocks.{i}.out"]


@pytest.mark.parametrize(
    "name", ["layerscale-module", "post-norm", "layerscale-parameter", "rotary-swiglu"]
)
def test_variants_are_served_by_class_space_methods(variant_client: Client, name: str) -> None:
    """Their numbers are checked per family in test_class_space_families.py; importance maps
    need a class token."""
    pixels = list(_pixels(variant_client, name).numpy())
    has_class_token = variant_client.describe(name).prefix_token_count > 0
    projection = variant_client.project(
        pixels, model=name, importance_maps=has_class_token, top_k=2
    )
    assert len(projection.images) == len(pixels)
    memories = variant_client.project_memories(1, model=name, images=pixels, top_k=2)
    assert set(memories.memories) == {"mlp", "attention"}
    if not has_class_token:
        with pytest.raises(FailedPreconditionError, match="it has no class token"):
            variant_client.project(pixels, model=name, importance_maps=True)
