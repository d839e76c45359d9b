"""Plain-hook references for the seven families Ghiasi et al. visualize.

Nothing here uses the server's adapters: each family's block list is written out
by hand, sublayer outputs are read from the attention and MLP modules themselves
(times their LayerScale), MLP hidden tensors from the output projection's input, and
attention probabilities are recomputed from each block's own queries and keys
(with relative position bias, gating, windows and masks as the family has them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import timm
import torch
from torch import nn

from support.reference import spec as shared_spec

SMALL = {"img_size": 64, "num_classes": 5}
FAMILY_MODELS: list[dict[str, Any]] = [
    {**shared_spec("vit"), "name": "vit"},
    {**shared_spec("deit"), "name": "deit"},
    {**shared_spec("swin"), "name": "swin"},
    {
        "name": "convit",
        "family": "timm",
        "architecture": "convit_tiny",
        "seed": 11,
        "kwargs": {**SMALL, "img_size": 32, "depth": 3, "local_up_to_layer": 2, "embed_dim": 16},
    },
    {
        "name": "pit",
        "family": "timm",
        "architecture": "pit_ti_224",
        "seed": 12,
        "kwargs": {**SMALL, "depth": [1, 2, 1]},
    },
    {
        "name": "coat",
        "family": "timm",
        "architecture": "coat_lite_tiny",
        "seed": 13,
        "kwargs": {**SMALL, "embed_dims": [32] * 4, "serial_depths": [1] * 4, "num_heads": 8},
    },
    {
        "name": "twins",
        "family": "timm",
        "architecture": "twins_svt_small",
        "seed": 14,
        "kwargs": {
            **SMALL,
            "depths": [2, 2, 1, 1],
            "embed_dims": [32, 64, 96, 128],
            "num_heads": [1, 2, 3, 4],
        },
    },
]
FAMILIES = [m["name"] for m in FAMILY_MODELS]


def build(name: str) -> nn.Module:
    s = next(m for m in FAMILY_MODELS if m["name"] == name)
    torch.manual_seed(int(s["seed"]))
    kwargs = s.get("kwargs", {})
    return timm.create_model(str(s["architecture"]), pretrained=False, **kwargs).eval()


def block_list(name: str, model: Any) -> list[nn.Module]:
    if name in ("vit", "deit", "convit"):
        return list(model.blocks)
    if name == "pit":
        return [b for stage in model.transformers for b in stage.blocks]
    if name == "coat":
        return [b for i in range(1, 5) for b in getattr(model, f"serial_blocks{i}")]
    if name == "twins":
        return [b for stage in model.blocks for b in stage]
    return [b for stage in model.layers for b in stage.blocks]


def _softmax_probs(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    return (q * scale @ k.transpose(-2, -1)).softmax(dim=-1)


def _qkv_heads(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T, 3C] -> queries and keys [B, heads, T, d]."""
    b, t, _ = qkv.shape
    q, k, _ = qkv.reshape(b, t, 3, heads, -1).permute(2, 0, 3, 1, 4)
    return q, k


def _plain_probs(attn: Any, io: dict[str, Any]) -> torch.Tensor:
    q, k = _qkv_heads(io["qkv"], attn.num_heads)
    q_norm, k_norm = (getattr(attn, n, nn.Identity()) for n in ("q_norm", "k_norm"))
    return _softmax_probs(q_norm(q), k_norm(k), attn.scale)


def _gpsa_probs(attn: Any, io: dict[str, Any]) -> torch.Tensor:
    """ConViT's gated positional attention: a learned mix of content and position softmaxes."""
    b, t, _ = io["qk"].shape
    q, k = io["qk"].reshape(b, t, 2, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    content = _softmax_probs(q, k, attn.scale)
    position = attn.pos_proj(attn.rel_indices.expand(b, -1, -1, -1)).permute(0, 3, 1, 2)
    gate = torch.sigmoid(attn.gating_param.view(1, -1, 1, 1))
    mixed = (1 - gate) * content + gate * position.softmax(dim=-1)
    return mixed / mixed.sum(dim=-1, keepdim=True)


def _window_probs(attn: Any, io: dict[str, Any]) -> torch.Tensor:
    """Twins' locally grouped attention: [B, windows, heads, N, N] within padded windows."""
    qkv = io["qkv"]
    b, windows = qkv.shape[0], qkv.shape[1] * qkv.shape[2]
    parts = qkv.reshape(b, windows, attn.ws * attn.ws, 3, attn.num_heads, -1)
    q, k, _ = parts.permute(3, 0, 1, 4, 2, 5)
    return _softmax_probs(q, k, attn.scale)


def _subsampled_probs(attn: Any, io: dict[str, Any]) -> torch.Tensor:
    """Twins' global sub-sampled attention: every query over the spatially reduced keys."""
    b, t, c = io["q"].shape
    q = io["q"].reshape(b, t, attn.num_heads, -1).transpose(1, 2)
    k = io["kv"].reshape(b, -1, 2, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)[0]
    return _softmax_probs(q, k, attn.scale)


def _swin_probs(attn: Any, io: dict[str, Any], block: Any, batch: int) -> torch.Tensor:
    """Swin: windows of the (shifted) map, relative position bias, and the shift mask."""
    q, k = _qkv_heads(io["qkv"], attn.num_heads)
    logits = q * attn.scale @ k.transpose(-2, -1) + attn._get_rel_pos_bias()
    n = logits.shape[-1]
    logits = logits.view(batch, -1, attn.num_heads, n, n)
    if block.attn_mask is not None:
        logits = logits + block.attn_mask[None, :, None]
    return logits.softmax(dim=-1)


PROBS: dict[str, Callable[[Any, dict[str, Any]], torch.Tensor]] = {
    "Attention": _plain_probs,
    "MHSA": _plain_probs,
    "GPSA": _gpsa_probs,
    "LocallyGroupedAttn": _window_probs,
    "GlobalSubSampleAttn": _subsampled_probs,
}
_PROJECTIONS = ("qkv", "qk", "q", "kv")


def _tokens(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1, t.shape[-1]) if t.dim() == 4 else t


def _hooks(block: Any, i: int, store: dict[str, Any]) -> list[Any]:
    attention = getattr(block, "attn", None) or block.factoratt_crpe
    scale1 = getattr(block, "ls1", nn.Identity())
    scale2 = getattr(block, "ls2", nn.Identity())
    io: dict[str, Any] = {}
    store[f"io.{i}"] = io

    def put(key: str, value: Any) -> None:
        store[key] = value

    handles = [
        block.register_forward_pre_hook(lambda m, a: put(f"in.{i}", a[0])),
        block.register_forward_hook(lambda m, a, o: put(f"blocks.{i}.out", o)),
        block.norm1.register_forward_pre_hook(lambda m, a: put(f"residual.{i}", a[0])),
        block.mlp.fc2.register_forward_pre_hook(lambda m, a: put(f"blocks.{i}.mlp.hidden", a[0])),
        block.mlp.register_forward_hook(lambda m, a, o: put(f"blocks.{i}.mlp.out", scale2(o))),
    ]
    if not hasattr(block, "_attn"):  # Swin's attention runs on windows: recomputed below
        handles.append(
            attention.register_forward_hook(lambda m, a, o: put(f"blocks.{i}.attn.out", scale1(o)))
        )
    projection = getattr(attention, "proj", None)
    if isinstance(projection, nn.Linear) and isinstance(getattr(attention, "num_heads", None), int):

        def heads(m: Any, a: Any) -> None:
            """Each head's context slice through its columns of proj, times LayerScale."""
            context = a[0].reshape(*a[0].shape[:-1], attention.num_heads, -1)
            weight = m.weight.reshape(m.weight.shape[0], attention.num_heads, -1)
            per_head = torch.einsum("...hk,dhk->...hd", context, weight)
            put(f"blocks.{i}.attn.heads", per_head * getattr(scale1, "gamma", 1.0))

        handles.append(projection.register_forward_pre_hook(heads))
    for name in _PROJECTIONS:
        module = getattr(attention, name, None)
        if isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(lambda m, a, o, n=name: io.update({n: o})))
    return handles


def family_sites(name: str, model: Any, pixels: torch.Tensor) -> dict[str, np.ndarray]:
    """Every canonical site the family serves, plus `residual.{i}` (the stream entering
    block i's attention sublayer) for the sum identity."""
    store: dict[str, Any] = {}
    blocks = block_list(name, model)
    handles = [h for i, block in enumerate(blocks) for h in _hooks(block, i, store)]
    final = model.norm if hasattr(model, "norm") else model.norm4
    handles.append(final.register_forward_hook(lambda m, a, o: store.__setitem__("final", o)))
    for block in blocks:
        attention = getattr(block, "attn", None)
        if hasattr(attention, "fused_attn"):
            attention.fused_attn = False
    with torch.inference_mode():
        model(pixels)
        for i, block in enumerate(blocks):
            io = store.pop(f"io.{i}")
            if hasattr(block, "_attn"):
                store[f"blocks.{i}.attn.out"] = block._attn(block.norm1(store[f"in.{i}"]))
                store[f"blocks.{i}.attn.probs"] = _swin_probs(block.attn, io, block, len(pixels))
            elif type(getattr(block, "attn", None)).__name__ in PROBS:
                store[f"blocks.{i}.attn.probs"] = PROBS[type(block.attn).__name__](block.attn, io)
    for h in handles:
        h.remove()
    store["embed"] = store["in.0"]
    out = {}
    for key, value in store.items():
        kept = key.endswith(("attn.probs", "attn.heads"))
        out[key] = (value if kept else _tokens(value)).numpy()
    return out
