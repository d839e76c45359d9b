"""Independent class-space references: plain hooks, direct head(norm(h)), hand-written autograd.

Nothing here uses the server's adapters, capture or projection code.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from torch import nn


def timm_parts(model: nn.Module, pixels: torch.Tensor) -> dict[str, Any]:
    """Block inputs, outputs, attention and MLP outputs (before any LayerScale) of a timm ViT,
    fc1's outputs and the attention's output-projection inputs."""
    store: dict[str, torch.Tensor] = {}
    handles = []
    for i, block in enumerate(model.blocks):
        handles += [
            block.register_forward_pre_hook(lambda m, a, i=i: store.__setitem__(f"in.{i}", a[0])),
            block.register_forward_hook(lambda m, a, o, i=i: store.__setitem__(f"out.{i}", o)),
            block.attn.register_forward_hook(
                lambda m, a, o, i=i: store.__setitem__(f"attn.{i}", o)
            ),
            block.mlp.register_forward_hook(lambda m, a, o, i=i: store.__setitem__(f"mlp.{i}", o)),
            block.mlp.fc1.register_forward_hook(
                lambda m, a, o, i=i: store.__setitem__(f"fc1.{i}", o)
            ),
            block.attn.proj.register_forward_pre_hook(
                lambda m, a, i=i: store.__setitem__(f"proj_in.{i}", a[0])
            ),
        ]
    with torch.no_grad():
        store["logits"] = model(pixels)
    for handle in handles:
        handle.remove()
    return store


def timm_scores(model: nn.Module, parts: dict[str, Any], kind: str, block: int) -> np.ndarray:
    """head(fc_norm(norm(h))); for average-pooled models sublayer outputs get the block's pre-norm."""
    h = parts[f"{kind}.{block}"]
    pooled_by_average = model.global_pool == "avg"
    with torch.no_grad():
        if pooled_by_average and kind == "attn":
            h = model.blocks[block].norm1(h)
        if pooled_by_average and kind == "mlp":
            h = model.blocks[block].norm2(h)
        return model.head(model.fc_norm(model.norm(h))).numpy()


def clip_parts(model: nn.Module, pixels: torch.Tensor) -> dict[str, Any]:
    visual = model.visual
    store: dict[str, torch.Tensor] = {}
    handles = []
    for i, block in enumerate(visual.transformer.resblocks):
        handles += [
            block.register_forward_pre_hook(lambda m, a, i=i: store.__setitem__(f"in.{i}", a[0])),
            block.register_forward_hook(lambda m, a, o, i=i: store.__setitem__(f"out.{i}", o)),
            block.attn.register_forward_hook(
                lambda m, a, o, i=i: store.__setitem__(f"attn.{i}", o[0])
            ),
            block.mlp.register_forward_hook(lambda m, a, o, i=i: store.__setitem__(f"mlp.{i}", o)),
        ]
    with torch.no_grad():
        store["embedding"] = visual(pixels)
    for handle in handles:
        handle.remove()
    return store


def clip_text(
    model: nn.Module, architecture: str, names: list[str], templates: list[str]
) -> torch.Tensor:
    tokenizer = open_clip.get_tokenizer(architecture, context_length=model.context_length)
    rows = []
    with torch.no_grad():
        for name in names:
            e = F.normalize(
                model.encode_text(tokenizer([t.format(name) for t in templates])), dim=-1
            )
            rows.append(F.normalize(e.mean(0), dim=-1))
    return torch.stack(rows)


def clip_scores(model: nn.Module, text: torch.Tensor, h: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return (F.normalize(model.visual.ln_post(h) @ model.visual.proj, dim=-1) @ text.T).numpy()


def ranks_by_sorting(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Position of each image's target in its descending sort; scores [B, T, C], targets [B]."""
    order = np.argsort(-scores, axis=-1, kind="stable")
    return np.argmax(order == targets[:, None, None], axis=-1)


def timm_importance(model: nn.Module, pixels: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    """[B, blocks, heads, patches]: a grad-enabled forward whose attention probabilities are
    replaced by leaves; per block, minus d CE(head(norm(cls attention output))) / d probs."""
    leaves: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}
    handles = []
    for i, block in enumerate(model.blocks):
        block.attn.fused_attn = False

        def swap(m: nn.Module, a: Any, o: torch.Tensor, i: int = i) -> torch.Tensor:
            leaves[i] = o.detach().requires_grad_(True)
            return leaves[i]

        handles += [
            block.attn.attn_drop.register_forward_hook(swap),
            block.attn.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o)),
        ]
    with torch.enable_grad():
        model(pixels)
        maps = []
        for i in range(len(model.blocks)):
            logits = model.head(model.fc_norm(model.norm(outputs[i][:, 0])))
            loss = F.cross_entropy(logits, targets, reduction="sum")
            (grad,) = torch.autograd.grad(loss, leaves[i], retain_graph=True)
            maps.append(-grad[:, :, 0, model.num_prefix_tokens :])
    for handle in handles:
        handle.remove()
    for block in model.blocks:
        block.attn.fused_attn = True
    return torch.stack(maps, dim=1).numpy()


def clip_importance(
    model: nn.Module, pixels: torch.Tensor, targets: torch.Tensor, text: torch.Tensor
) -> np.ndarray:
    """[B, blocks, heads, patches] for an open_clip tower: attention recomputed by hand from each
    block's input (ls_1 is Identity here), probabilities as leaves, scores scaled by logit_scale."""
    visual = model.visual
    parts = clip_parts(model, pixels)
    maps = []
    with torch.enable_grad():
        for i, block in enumerate(visual.transformer.resblocks):
            x = block.ln_1(parts[f"in.{i}"])
            batch, tokens, _ = x.shape
            q, k, v = (
                t.reshape(batch, tokens, block.attn.num_heads, -1).transpose(1, 2)
                for t in F.linear(x, block.attn.in_proj_weight, block.attn.in_proj_bias).chunk(
                    3, -1
                )
            )
            probs = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1).detach()
            probs.requires_grad_(True)
            out = block.attn.out_proj((probs @ v).transpose(1, 2).reshape(batch, tokens, -1))
            embedded = F.normalize(visual.ln_post(out[:, 0]) @ visual.proj, dim=-1)
            scores = embedded @ text.T * model.logit_scale.exp()
            loss = F.cross_entropy(scores, targets, reduction="sum")
            (grad,) = torch.autograd.grad(loss, probs)
            maps.append(-grad[:, :, 0, 1:])
    return torch.stack(maps, dim=1).detach().numpy()
