"""A timm model's classifier read from its own modules: `fc(fc_norm(pool(norm(x))))`.

`norm` is the model's final norm (the `final` site's module), `fc` its linear `head` or the
`fc` of a timm classifier-head module (ClassifierHead, NormMlpClassifierHead: pooling, an
optional norm acting as `fc_norm`, dropout and the linear layer), `pool` the model's
`global_pool` (or the head's). It is trusted only when it reproduces the model's logits
from the tokens entering the final norm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vitscope_server.core.model.adapters.base import ModelAdapter

POOLS = ("token", "avg", "max", "avgmax")
# The children a timm classifier-head module may have besides `fc` for the head to be the
# linear layer over pooled, normed tokens.
_HEAD_PARTS = {"global_pool", "norm", "flatten", "pre_logits", "drop", "fc"}


@dataclass(frozen=True)
class Classifier:
    norm: nn.Module
    fc_norm: nn.Module
    fc: nn.Linear
    pool: str
    # Where average or max pooling starts (after the class, distillation, register tokens).
    prefix: int
    # A distilled DeiT averages `fc` on the class token with this on the next token.
    head_dist: nn.Linear | None = None

    def normed(self, tokens: torch.Tensor) -> torch.Tensor:
        normed: torch.Tensor = self.fc_norm(self.norm(tokens))
        return normed

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """The model's logits from the tokens [B, T, D] entering its final norm."""
        if self.head_dist is not None:
            normed = self.normed(tokens)
            return 0.5 * (self.fc(normed[:, 0]) + self.head_dist(normed[:, 1]))
        pooled: torch.Tensor = self.fc(
            self.fc_norm(_pool(self.norm(tokens), self.pool, self.prefix))
        )
        return pooled


def _pool(tokens: torch.Tensor, pool: str, prefix: int) -> torch.Tensor:
    if pool == "token":
        return tokens[:, 0]
    patches = tokens[:, prefix:]
    if pool == "avg":
        return patches.mean(dim=1)
    if pool == "max":
        return patches.amax(dim=1)
    return 0.5 * (patches.mean(dim=1) + patches.amax(dim=1))


def _module(root: nn.Module, name: str) -> nn.Module:
    module = getattr(root, name, None)
    return module if isinstance(module, nn.Module) else nn.Identity()


def find_classifier(adapter: ModelAdapter) -> Classifier | str:
    """The classifier from the model's modules, or why it has none of this form."""
    model: Any = adapter.root
    if getattr(model, "attn_pool", None) is not None or getattr(model, "global_pool", "") == "map":
        return (
            "it pools its tokens with attention (attn_pool) before the classifier, so a "
            "single token has no class scores of its own"
        )
    head: Any = getattr(model, "head", None)
    fc_norm, pool = _module(model, "fc_norm"), getattr(model, "global_pool", "")
    if not isinstance(head, nn.Linear):
        parts = (
            {name for name, _ in head.named_children()} if isinstance(head, nn.Module) else set()
        )
        pre_logits = getattr(head, "pre_logits", None)
        if (
            not isinstance(getattr(head, "fc", None), nn.Linear)
            or parts - _HEAD_PARTS
            or not (pre_logits is None or isinstance(pre_logits, nn.Identity))
        ):
            kind = type(head).__name__
            return f"its head is a {kind}, not one linear classifier over its pooled tokens"
        fc_norm = _module(head, "norm") if isinstance(fc_norm, nn.Identity) else fc_norm
        pool = getattr(getattr(head, "global_pool", None), "pool_type", None) or getattr(
            head, "pool_type", pool
        )
        head = head.fc
    if pool not in POOLS:
        return f"its pooling {pool!r} is not one of {POOLS} over its tokens"
    path = adapter.final_norm_path
    norm = nn.Identity() if path is None else adapter.root.get_submodule(path)
    head_dist = getattr(model, "head_dist", None)
    return Classifier(
        norm,
        fc_norm,
        head,
        str(pool),
        int(getattr(model, "num_prefix_tokens", 0) or 0),
        head_dist if isinstance(head_dist, nn.Linear) else None,
    )


def as_tokens(tensor: torch.Tensor, width: int) -> torch.Tensor | None:
    """[B, T, C], or a [B, H, W, C] / [B, C, H, W] map as tokens, else None."""
    if tensor.dim() == 3 and tensor.shape[-1] == width:
        return tensor
    if tensor.dim() == 4 and tensor.shape[-1] == width:
        return tensor.reshape(tensor.shape[0], -1, width)
    if tensor.dim() == 4 and tensor.shape[1] == width:
        return tensor.flatten(2).transpose(1, 2)
    return None
