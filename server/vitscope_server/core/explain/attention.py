"""Attention-based attribution: rollout (Abnar & Zuidema 2020) and gradient-weighted
relevancy (Chefer, Gur, Wolf 2021), both over every block's full attention matrix.

Both read the row of the token the model predicts from: the class token, or for a model
without prefix tokens (average pooling) the mean of all rows. Prefix columns are dropped.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from enum import Enum
from typing import Any

import torch
from torch import nn

from vitscope_server.core.model.adapters import ModelAdapter
from vitscope_server.core.model.adapters.capabilities import Missing, require
from vitscope_server.core.model.capture import capture_sites
from vitscope_server.core.runtime.cancel import CancelToken


class HeadFusion(Enum):
    MEAN = "mean"
    MAX = "max"
    MIN = "min"


def attention_cause(adapter: ModelAdapter) -> str | None:
    """Why rollout cannot run on this model: no probabilities over one token sequence."""
    found = adapter.attention_probs()
    return found.cause if isinstance(found, Missing) else None


def relevancy_cause(adapter: ModelAdapter) -> str | None:
    """Why relevancy cannot run on this model, or None when it can: it also recomputes each
    block's attention output from its probabilities, to differentiate them."""
    math = adapter.attention_math()
    return attention_cause(adapter) or (math.cause if isinstance(math, Missing) else None)


def _reading_row(matrix: torch.Tensor, prefix: int, grid: tuple[int, int]) -> torch.Tensor:
    """[B, T, T] -> [B, H, W]: the class token's row, or the mean row without prefix tokens."""
    rows = matrix[:, 0] if prefix else matrix.mean(dim=1)
    return rows[:, prefix:].reshape(matrix.shape[0], *grid)


def _probs_sites(adapter: ModelAdapter) -> list[Any]:
    return require(adapter.attention_probs(), "rollout").sites


def attention_forward(
    adapter: ModelAdapter,
    pixels: torch.Tensor,
    cancel: CancelToken,
    differentiable: bool,
    requests: Sequence[slice],
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The model's forward output (its head on each request's rows) and every block's
    attention probabilities [B, heads, T, T].

    Differentiable: the graph from the output to every block's probabilities is kept, with
    each attention output recomputed from them (see _recomputing_hook)."""
    blocks = range(len(adapter.blocks))
    probs_sites = _probs_sites(adapter)
    if not differentiable:
        with torch.no_grad(), capture_sites(adapter, probs_sites, pixels.shape[0], cancel) as got:
            output = adapter.forward_by_request(pixels, requests)
        return output, [got[site.name] for site in probs_sites]
    sites = [adapter.block_input_site(b) for b in blocks]
    owner = threading.get_ident()
    with ExitStack() as stack, torch.enable_grad():
        captured = stack.enter_context(
            capture_sites(adapter, sites + probs_sites, pixels.shape[0], cancel)
        )
        for b in blocks:
            module = adapter.root.get_submodule(adapter.blocks[b].taps["attn.out"].module_path)
            hook = _recomputing_hook(adapter, b, captured, owner)
            stack.callback(module.register_forward_hook(hook).remove)
        # The input carries a gradient only so that the graph to every probability is built.
        output = adapter.forward_by_request(pixels.detach().requires_grad_(True), requests)
    return output, [captured[site.name] for site in probs_sites]


def rollout(probs: list[torch.Tensor], fusion: HeadFusion, adapter: ModelAdapter) -> torch.Tensor:
    """Per block: heads fused, 0.5 A + 0.5 I, rows renormalized; the product of the blocks'
    matrices from the first block to the last (later blocks multiply on the left)."""
    fuse: Callable[[torch.Tensor], torch.Tensor] = {
        HeadFusion.MEAN: lambda a: a.mean(dim=1),
        HeadFusion.MAX: lambda a: a.amax(dim=1),
        HeadFusion.MIN: lambda a: a.amin(dim=1),
    }[fusion]
    with torch.no_grad():
        joint: torch.Tensor | None = None
        for attention in probs:
            fused = fuse(attention.float())
            eye = torch.eye(fused.shape[-1], device=fused.device)
            mixed = 0.5 * fused + 0.5 * eye
            mixed = mixed / mixed.sum(dim=-1, keepdim=True)
            joint = mixed if joint is None else mixed @ joint
        assert joint is not None
        return _reading_row(joint, adapter.num_prefix_tokens, adapter.grid)


def _recomputing_hook(
    adapter: ModelAdapter, block: int, captured: dict[str, torch.Tensor], owner: int
) -> Callable[[nn.Module, Any, Any], Any]:
    """Replaces the attention sublayer's output by the same output recomputed from the
    captured probabilities, so the target's gradient flows to them whatever kernel ran."""
    input_site = adapter.block_input_site(block).name
    math = require(adapter.attention_math(), "relevancy")
    # The recomputation calls the hooked module itself (e.g. a LayerScale): not again.
    inside: list[bool] = []

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        if threading.get_ident() != owner or inside:
            return None
        probs = captured[f"blocks.{block}.attn.probs"]
        inside.append(True)
        try:
            values = math.values(block, captured[input_site])
            replaced = math.output(block, probs, values)
        finally:
            inside.clear()
        if not isinstance(output, torch.Tensor) or replaced.shape != output.shape:
            cause = f"block {block}'s attention output cannot be recomputed in its own layout"
            raise adapter.missing(cause).refusal("relevancy")
        return replaced

    return hook


def relevancy(
    score: torch.Tensor, probs: list[torch.Tensor], adapter: ModelAdapter
) -> torch.Tensor:
    """R = I; per block R <- R + mean over heads of (dS/dA * A)+ @ R, S the summed targets'
    scores of a differentiable attention_forward."""
    grads = torch.autograd.grad(score, probs)
    with torch.no_grad():
        batch, tokens = probs[0].shape[0], probs[0].shape[-1]
        joint = torch.eye(tokens, device=score.device).expand(batch, -1, -1)
        for attention, grad in zip(probs, grads, strict=True):
            weighted = (grad * attention).clamp(min=0).mean(dim=1).float()
            joint = joint + weighted @ joint
        return _reading_row(joint, adapter.num_prefix_tokens, adapter.grid)
