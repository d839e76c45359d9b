"""Independent reference computations: plain forward hooks on freshly built models.

Nothing here uses the server's adapters or capture code; each family's module
paths and the attention softmax are written out by hand.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import open_clip
import timm
import torch
from torch import nn

from support.servers import TEST_MODELS


def spec(name: str) -> dict[str, Any]:
    return next(m for m in TEST_MODELS if m["name"] == name)


def build(name: str) -> nn.Module:
    s = spec(name)
    torch.manual_seed(int(s["seed"]))
    kwargs = dict(s.get("kwargs", {}))
    if s["family"] == "timm":
        return timm.create_model(str(s["architecture"]), pretrained=False, **kwargs).eval()
    return open_clip.create_model(str(s["architecture"]), pretrained=None, **kwargs).eval()


def _manual_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) for [B, heads, T, d] queries and keys."""
    return (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, T, D] -> [B, heads, T, D / heads]."""
    b, t, d = x.shape
    return x.reshape(b, t, heads, d // heads).transpose(1, 2)


def _record(store: dict[str, torch.Tensor], key: str, take: Any = None) -> Any:
    def hook(module: nn.Module, args: Any, output: Any) -> None:
        store[key] = take(args, output) if take else output

    return hook


def vit_sites(model: nn.Module, pixels: torch.Tensor) -> dict[str, np.ndarray]:
    """Every canonical site of a timm ViT/DeiT (ls1/ls2 are Identity in these models)."""
    store: dict[str, torch.Tensor] = {}
    handles = [
        model.blocks[0].register_forward_pre_hook(lambda m, a: store.__setitem__("embed", a[0]))
    ]
    for i, block in enumerate(model.blocks):
        handles += [
            block.register_forward_hook(_record(store, f"blocks.{i}.out")),
            block.attn.register_forward_hook(_record(store, f"blocks.{i}.attn.out")),
            block.mlp.act.register_forward_hook(_record(store, f"blocks.{i}.mlp.hidden")),
            block.mlp.register_forward_hook(_record(store, f"blocks.{i}.mlp.out")),
            block.attn.qkv.register_forward_hook(_record(store, f"qkv.{i}")),
        ]
    handles.append(model.norm.register_forward_hook(_record(store, "final")))
    with torch.inference_mode():
        logits = model(pixels)
    for h in handles:
        h.remove()
    for i, block in enumerate(model.blocks):
        qkv = store.pop(f"qkv.{i}")
        b, t, _ = qkv.shape
        heads = block.attn.num_heads
        q, k, _ = qkv.reshape(b, t, 3, heads, -1).permute(2, 0, 3, 1, 4)
        store[f"blocks.{i}.attn.probs"] = _manual_probs(q, k)
    store["logits"] = logits
    return {k: v.numpy() for k, v in store.items()}


def swin_sites(model: nn.Module, pixels: torch.Tensor) -> dict[str, np.ndarray]:
    """Swin blocks numbered globally; spatial [B, H, W, C] maps flattened to tokens."""
    store: dict[str, torch.Tensor] = {}
    blocks = [blk for stage in model.layers for blk in stage.blocks]
    handles = [blocks[0].register_forward_pre_hook(lambda m, a: store.__setitem__("embed", a[0]))]
    for i, block in enumerate(blocks):
        block.attn.fused_attn = False
        handles += [
            block.register_forward_pre_hook(lambda m, a, i=i: store.__setitem__(f"in.{i}", a[0])),
            block.register_forward_hook(_record(store, f"blocks.{i}.out")),
            block.mlp.act.register_forward_hook(_record(store, f"blocks.{i}.mlp.hidden")),
            block.mlp.register_forward_hook(_record(store, f"blocks.{i}.mlp.out")),
            block.attn.attn_drop.register_forward_hook(_record(store, f"blocks.{i}.attn.probs")),
        ]
    handles.append(model.norm.register_forward_hook(_record(store, "final")))
    with torch.inference_mode():
        logits = model(pixels)
        for i, block in enumerate(blocks):
            store[f"blocks.{i}.attn.out"] = block._attn(block.norm1(store.pop(f"in.{i}")))
    for h in handles:
        h.remove()
    batch = pixels.shape[0]
    out = {}
    for key, value in store.items():
        if key.endswith("attn.probs"):
            value = value.reshape(batch, -1, *value.shape[1:])
        elif value.dim() == 4:
            value = value.reshape(batch, -1, value.shape[-1])
        out[key] = value.numpy()
    out["logits"] = logits.numpy()
    return out


def clip_sites(model: nn.Module, pixels: torch.Tensor) -> dict[str, np.ndarray]:
    """open_clip visual tower: attention probabilities recomputed from in_proj weights."""
    visual = model.visual
    store: dict[str, torch.Tensor] = {}
    blocks = visual.transformer.resblocks
    handles = [blocks[0].register_forward_pre_hook(lambda m, a: store.__setitem__("embed", a[0]))]
    for i, block in enumerate(blocks):
        handles += [
            block.register_forward_pre_hook(lambda m, a, i=i: store.__setitem__(f"in.{i}", a[0])),
            block.register_forward_hook(_record(store, f"blocks.{i}.out")),
            block.attn.register_forward_hook(
                _record(store, f"blocks.{i}.attn.out", lambda a, o: o[0])
            ),
            block.mlp.gelu.register_forward_hook(_record(store, f"blocks.{i}.mlp.hidden")),
            block.mlp.register_forward_hook(_record(store, f"blocks.{i}.mlp.out")),
        ]
    handles.append(visual.ln_post.register_forward_hook(_record(store, "final")))
    with torch.inference_mode():
        visual(pixels)
        for i, block in enumerate(blocks):
            x = block.ln_1(store.pop(f"in.{i}"))
            q, k, _ = (x @ block.attn.in_proj_weight.T + block.attn.in_proj_bias).chunk(3, dim=-1)
            heads = block.attn.num_heads
            store[f"blocks.{i}.attn.probs"] = _manual_probs(_heads(q, heads), _heads(k, heads))
    for h in handles:
        h.remove()
    return {k: v.numpy() for k, v in store.items()}


REFERENCES = {"vit": vit_sites, "deit": vit_sites, "swin": swin_sites, "clip": clip_sites}


def reference_sites(name: str, pixels: torch.Tensor) -> dict[str, np.ndarray]:
    return REFERENCES[name](build(name), pixels)
