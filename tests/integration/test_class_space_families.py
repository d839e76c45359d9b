"""Class-space methods on every timm family with a classifier head, against references
written out by hand per family.

Each family is a small randomly initialized model served by a real server. The references
use plain forward hooks on the model's own modules: a block's output, its attention and MLP
modules' outputs scaled as the family adds them (a LayerScale module or gamma parameter, or a
post-norm), `head(fc_norm(norm(h)))` for projections (the block's pre-norm first on sublayer
outputs of models that pool by average), and the weight products of METHODS §3 for memories.
Nothing here uses the server's adapters, capabilities or projection code.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from support.reference_explain import relevancy
from torch import nn

from vitscope import Client, FailedPreconditionError, InvalidArgumentError
from vitscope_server.settings import ServerSettings
from vitscope_server.transport.app import create_server

SMALL = {"depth": 2, "embed_dim": 64, "num_heads": 2, "img_size": 64, "num_classes": 7}
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "beit": ("beit_base_patch16_224", SMALL),  # gamma LayerScale, relative position bias
    "eva02": ("eva02_tiny_patch14_224", SMALL),  # rotary, SwiGLU, average pooling
    "eva_post_norm": ("eva02_enormous_patch14_clip_224", SMALL),  # EvaBlockPostNorm
    "dinov3": ("vit_tiny_patch16_dinov3_qkvb", SMALL),  # register tokens, average pooling
    "pe_rope": ("vit_pe_spatial_tiny_patch16_512", SMALL),  # AttentionRope, pre-norm stem
    "convit": (
        "convit_tiny",
        {"img_size": 32, "embed_dim": 16, "depth": 3, "local_up_to_layer": 2, "num_classes": 7},
    ),
    "cait": ("cait_xxs24_224", SMALL),  # talking heads; class token in class-attention blocks
    "rpn": ("vit_base_patch16_rpn_224", SMALL),  # ResPostBlock, average pooling
    "relpos": ("test_vit_relpos", SMALL),
    "relpos_rpn": ("vit_relpos_small_patch16_rpn_224", SMALL),
    "swiglu": ("aimv2_large_patch14_224", SMALL),  # RmsNorm, no class token
    "glu": ("vit_giant_patch14_reg1_tipsv2", {**SMALL, "embed_dim": 96}),
    # Hierarchical: the classifier reads the last stage, whose blocks are projected.
    "swin": (
        "swin_tiny_patch4_window7_224",
        {
            "img_size": 64,
            "window_size": 4,
            "embed_dim": 16,
            "depths": [1, 2],
            "num_heads": [1, 2],
            "num_classes": 7,
        },
    ),
    "pit": ("pit_ti_224", {"img_size": 64, "depth": [1, 1, 2], "num_classes": 7}),
}
# The last stage's blocks of the hierarchical families.
LAST_STAGE = {"swin": lambda m: m.layers[-1].blocks, "pit": lambda m: m.transformers[-1].blocks}
POST_NORM = {"eva_post_norm", "rpn", "relpos_rpn"}
# Families whose probabilities rows are not softmax rows (talking heads) or whose class token
# enters late: relevancy is refused with the cause.
NO_RELEVANCY = {
    "cait": "not rows of probabilities",
    "convit": "class token enters at block 2",
    "swin": "windowed attention",
    "pit": "change token grid or width",
}


def build(name: str) -> nn.Module:
    architecture, kwargs = FAMILIES[name]
    torch.manual_seed(5)
    return timm.create_model(architecture, pretrained=False, **kwargs).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def fc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    folder = tmp_path_factory.mktemp("class_space_families")
    models = [
        {"name": name, "family": "timm", "architecture": arch, "seed": 5, "kwargs": kwargs}
        for name, (arch, kwargs) in FAMILIES.items()
    ]
    models.append({**models[0], "name": "headless", "kwargs": {**SMALL, "num_classes": 0}})
    models_file = folder / "models.yaml"
    models_file.write_text(yaml.safe_dump({"models": models}))
    settings = ServerSettings(
        host="127.0.0.1", port=0, metrics_port=-1, models_file=models_file, default_model="beit"
    )
    running = create_server(settings)
    assert running.registry.wait_until_settled(timeout=600)
    with Client(f"127.0.0.1:{running.port}", timeout=120) as client:
        yield client
    running.stop(0)


def pixels_for(client: Client, name: str, batch: int = 2) -> torch.Tensor:
    size = client.describe(name).input_size
    return torch.randn((batch, *size), generator=torch.Generator().manual_seed(3))


def blocks_of(name: str, model: nn.Module) -> list[nn.Module]:
    """Every block in forward order."""
    if name == "swin":
        return [b for stage in model.layers for b in stage.blocks]
    if name == "pit":
        return [b for stage in model.transformers for b in stage.blocks]
    return list(model.blocks)


def head_of(model: nn.Module) -> nn.Linear:
    return model.head if isinstance(model.head, nn.Linear) else model.head.fc


def as_tokens(tensor: torch.Tensor) -> torch.Tensor:
    """[B, H, W, C] maps (Swin) as [B, H * W, C] tokens."""
    return tensor.reshape(tensor.shape[0], -1, tensor.shape[-1])


def added(name: str, block: nn.Module, sublayer: int, output: torch.Tensor) -> torch.Tensor:
    """A sublayer module's output as the block adds it to the residual stream."""
    if name in POST_NORM:
        return getattr(block, f"norm{sublayer}")(output)
    gamma = getattr(block, f"gamma_{sublayer}", None)
    if gamma is not None:
        return gamma * output
    scale = getattr(block, f"ls{sublayer}", None)
    return output if scale is None else scale(output)


def hooked(name: str, model: nn.Module, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per block: output, attention and MLP outputs as added, fc1 / fc2-input / proj-input."""
    store: dict[str, torch.Tensor] = {}
    handles = []

    def keep(key: str) -> Any:
        return lambda m, a, o: store.__setitem__(key, o)

    for i, block in enumerate(blocks_of(name, model)):
        mlp = block.mlp
        handles += [
            block.register_forward_pre_hook(lambda m, a, i=i: store.__setitem__(f"in.{i}", a[0])),
            block.register_forward_hook(keep(f"out.{i}")),
            block.attn.register_forward_hook(keep(f"attn.{i}")),
            mlp.register_forward_hook(keep(f"mlp.{i}")),
            mlp.fc2.register_forward_pre_hook(lambda m, a, i=i: store.__setitem__(f"h.{i}", a[0])),
            block.attn.proj.register_forward_pre_hook(
                lambda m, a, i=i: store.__setitem__(f"proj.{i}", a[0])
            ),
        ]
        if isinstance(getattr(mlp, "fc1", None), nn.Linear):
            handles.append(mlp.fc1.register_forward_hook(keep(f"fc1.{i}")))
    with torch.no_grad():
        store["logits"] = model(pixels)
        for i, block in enumerate(blocks_of(name, model)):
            store[f"mlp.{i}"] = added(name, block, 2, store[f"mlp.{i}"])
            # Swin's attention runs on shifted windows: what it adds is the block's residual
            # update less the MLP's.
            residual = as_tokens(store[f"out.{i}"]) - as_tokens(store[f"in.{i}"])
            attention = residual - as_tokens(store[f"mlp.{i}"])
            if name != "swin":
                attention = added(name, block, 1, store[f"attn.{i}"])
            store[f"attn.{i}"] = attention
    for handle in handles:
        handle.remove()
    return {key: as_tokens(value) if value.dim() == 4 else value for key, value in store.items()}


def scores(name: str, model: nn.Module, h: torch.Tensor, block: int, part: str) -> np.ndarray:
    """head(fc_norm(norm(h))); sublayer outputs of average-pooled pre-norm models first go
    through the block's own pre-norm."""
    average = model.global_pool == "avg"
    with torch.no_grad():
        if average and name not in POST_NORM and part != "out":
            h = getattr(blocks_of(name, model)[block], "norm1" if part == "attn" else "norm2")(h)
        h = model.norm(h)
        fc_norm = getattr(model, "fc_norm", None)
        return head_of(model)(h if fc_norm is None else fc_norm(h)).numpy()


def served_blocks(model: nn.Module, name: str) -> list[int]:
    """ConViT's projection starts where its class token has joined, a hierarchical model's
    at its last stage."""
    count = len(blocks_of(name, model))
    start = model.local_up_to_layer if name == "convit" else 0
    if name in LAST_STAGE:
        start = count - len(LAST_STAGE[name](model))
    return list(range(start, count))


def check_projection(got: Any, expected: np.ndarray, target: int) -> None:
    """One image's top-k scores and target ranks [blocks, T, ...] against the reference
    scores [blocks, T, C]; a rank may differ only by classes scored within rounding."""
    k = got.top_scores.shape[-1]
    top = -np.sort(-expected, axis=-1)[..., :k]
    np.testing.assert_allclose(got.top_scores, top, rtol=1e-4, atol=1e-4)
    own = expected[..., target : target + 1]
    ranks = (expected > own + 1e-4).sum(-1)
    ties = (np.abs(expected - own) <= 1e-4).sum(-1) - 1
    assert np.all((got.target_ranks >= ranks) & (got.target_ranks <= ranks + ties))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_projection_is_head_of_norm_with_the_models_own_modules(fc: Client, name: str) -> None:
    model = build(name)
    pixels = pixels_for(fc, name)
    store = hooked(name, model, pixels)
    result = fc.project(list(pixels.numpy()), model=name, targets=[3, None])
    targets = np.array([3, int(store["logits"][1].argmax())])
    blocks = served_blocks(model, name)
    assert result.parameters["blocks"] == blocks
    for representation, part in (("residual", "out"), ("attention", "attn"), ("mlp", "mlp")):
        expected = np.stack(
            [scores(name, model, store[f"{part}.{b}"], b, part) for b in blocks], axis=1
        )  # [B, blocks, T, C]
        for i, image in enumerate(result.images):
            got = image.representations[representation]
            check_projection(got, expected[i], int(targets[i]))


def value_matrix(name: str, block: nn.Module, weight: torch.Tensor, sublayer: int) -> torch.Tensor:
    """METHODS §3: an output projection's columns as they reach the residual stream; through a
    post-norm's affine and centring (its per-token division is shared by all memories)."""
    if name in POST_NORM:
        norm = getattr(block, f"norm{sublayer}")
        return norm.weight[:, None] * (weight - weight.mean(dim=0, keepdim=True))
    gamma = getattr(block, f"gamma_{sublayer}", None)
    scale = getattr(getattr(block, f"ls{sublayer}", None), "gamma", None)
    gamma = gamma if gamma is not None else scale
    return weight if gamma is None else gamma[:, None] * weight


@pytest.mark.parametrize("name", list(FAMILIES))
def test_memories_are_the_weight_products(fc: Client, name: str) -> None:
    model = build(name)
    pixels = pixels_for(fc, name)
    store = hooked(name, model, pixels)
    blocks = blocks_of(name, model)
    b = len(blocks) - 1
    block = blocks[b]
    result = fc.project_memories(b, model=name, images=list(pixels.numpy()), top_k=4)
    values = {"mlp": value_matrix(name, block, block.mlp.fc2.weight.detach(), 2)}
    # Windowed attention multiplies its output projection in window order, not token order.
    if name != "swin":
        values["attention"] = value_matrix(name, block, block.attn.proj.weight.detach(), 1)
    assert set(result.memories) == set(values)
    fc1 = getattr(block.mlp, "fc1", None)
    plain = isinstance(fc1, nn.Linear) and fc1.out_features == block.mlp.fc2.in_features
    coefficients = {
        "mlp": store[f"fc1.{b}" if plain else f"h.{b}"],
        "attention": store[f"proj.{b}"],
    }
    for kind, value in values.items():
        matrix = (head_of(model).weight.detach() @ value).numpy()
        got = result.memories[kind]
        assert got.memory_count == value.shape[1]
        np.testing.assert_allclose(
            got.top_memory_scores, -np.sort(-matrix, -1)[:, :4], rtol=1e-4, atol=1e-5
        )
        np.testing.assert_allclose(
            got.top_class_scores, -np.sort(-matrix.T, -1)[:, :4], rtol=1e-4, atol=1e-5
        )
        for i, image in enumerate(got.images):
            c = coefficients[kind][i].numpy()
            np.testing.assert_allclose(
                image.top_coefficients, -np.sort(-c, -1)[:, :4], rtol=1e-4, atol=1e-5
            )


@pytest.mark.parametrize("name", sorted(set(FAMILIES) - set(NO_RELEVANCY)))
def test_relevancy_equals_autograd_on_hooked_attention(fc: Client, name: str) -> None:
    model = build(name)
    pixels = pixels_for(fc, name, batch=1)
    described = fc.describe(name)
    result = fc.explain(list(pixels.numpy()), ["relevancy"], model=name, targets=[2])
    expected = relevancy(model, pixels, 2, described.prefix_token_count, described.grid)
    got = result.images[0].maps["relevancy"].grid_map
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("name", sorted(NO_RELEVANCY))
def test_relevancy_is_refused_with_the_cause(fc: Client, name: str) -> None:
    pixels = pixels_for(fc, name, batch=1)
    with pytest.raises(FailedPreconditionError) as refused:
        fc.explain(list(pixels.numpy()), ["relevancy"], model=name)
    message = str(refused.value)
    assert f"relevancy does not apply to model {name}" in message
    assert NO_RELEVANCY[name] in message


@pytest.mark.parametrize("name", ["beit", "eva_post_norm", "dinov3", "convit", "pit"])
def test_importance_maps_follow_the_class_tokens_projected_attention(fc: Client, name: str) -> None:
    """Per block, minus the gradient of CE(head(norm(class token's attention output))) with
    respect to that block's probabilities (class-token row, prefix columns dropped)."""
    model = build(name)
    pixels = pixels_for(fc, name, batch=1)
    result = fc.project(list(pixels.numpy()), model=name, importance_maps=True, targets=[1])
    blocks = served_blocks(model, name)
    leaves: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}
    handles = []
    every = blocks_of(name, model)
    for i in blocks:
        attention = every[i].attn
        attention.fused_attn = False

        def swap(m: nn.Module, a: Any, o: torch.Tensor, i: int = i) -> torch.Tensor:
            leaves[i] = o.detach().requires_grad_(True)
            return leaves[i]

        handles += [
            attention.attn_drop.register_forward_hook(swap),
            attention.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o)),
        ]
    with torch.enable_grad():
        model(pixels)
        maps = []
        for i in blocks:
            h = added(name, every[i], 1, outputs[i])
            if model.global_pool == "avg" and name not in POST_NORM:
                h = every[i].norm1(h)
            logits = model.head(getattr(model, "fc_norm", nn.Identity())(model.norm(h))[:, 0])
            loss = F.cross_entropy(logits, torch.tensor([1]), reduction="sum")
            (grad,) = torch.autograd.grad(loss, leaves[i], retain_graph=True)
            prefix = getattr(model, "num_prefix_tokens", 1)
            maps.append(-grad[0, :, 0, prefix:])
    for handle in handles:
        handle.remove()
    expected = torch.stack(maps).numpy()
    got = result.images[0].importance.per_head
    np.testing.assert_allclose(
        got.reshape(expected.shape), expected, rtol=1e-3, atol=1e-5 * np.abs(expected).max()
    )


def test_refusals_name_the_model_the_method_and_the_cause(fc: Client) -> None:
    pixels = list(pixels_for(fc, "swin", batch=1).numpy())
    with pytest.raises(InvalidArgumentError) as early:
        fc.project(pixels, model="swin", blocks=[0])
    assert "allowed 1..2" in str(early.value)
    with pytest.raises(FailedPreconditionError) as windowed:
        fc.project_memories(2, model="swin", kinds=["attention"])
    assert "ProjectMemories does not apply to model swin: block 2 attends within windows" in str(
        windowed.value
    )
    with pytest.raises(FailedPreconditionError) as headless:
        fc.project_memories(0, model="headless")
    assert "ProjectMemories does not apply to model headless: it has no classifier head" in str(
        headless.value
    )
    with pytest.raises(InvalidArgumentError) as early:
        fc.project(list(pixels_for(fc, "convit", batch=1).numpy()), model="convit", blocks=[0])
    assert [v.field for v in early.value.field_violations] == ["blocks"]
    assert "at block 2); allowed 2..2" in str(early.value)
