"""How one timm block's sublayers reach the residual stream, read from the block's modules.

A pre-norm block adds `scale(sublayer(norm(x)))`, its layer scale a module (`ls1`, `ls2`:
LayerScale or Identity) or a parameter (`gamma_1`, `gamma_2`: BEiT, EVA, CaiT); a post-norm
block adds `norm(sublayer(x))` (timm's `ResPostBlock`, EVA's `EvaBlockPostNorm`). Which of
the two a block is comes from a forward (timm_capabilities.py), not from its class name.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Sublayer 1 is attention, 2 the MLP, as timm numbers their norms and scales.
ATTENTION, MLP = 1, 2


def layer_scale(block: nn.Module, sublayer: int) -> torch.Tensor | None:
    """The per-channel gamma the block multiplies a sublayer's output by, if any."""
    module = getattr(block, f"ls{sublayer}", None)
    gamma = getattr(module, "gamma", None) if isinstance(module, nn.Module) else None
    if gamma is None:
        gamma = getattr(block, f"gamma_{sublayer}", None)
    return gamma if isinstance(gamma, torch.Tensor) else None


def block_norm(block: nn.Module, sublayer: int) -> nn.Module | None:
    norm = getattr(block, f"norm{sublayer}", None)
    return norm if isinstance(norm, nn.Module) else None


def finish(block: nn.Module, sublayer: int, output: torch.Tensor, pre_norm: bool) -> torch.Tensor:
    """A sublayer's output as the block adds it to the residual stream."""
    norm = block_norm(block, sublayer)
    if not pre_norm and norm is not None:
        output = norm(output)
    gamma = layer_scale(block, sublayer)
    return output if gamma is None else output * gamma


def reaching_residual(
    block: nn.Module, sublayer: int, weight: torch.Tensor, pre_norm: bool
) -> torch.Tensor | None:
    """An output projection's weight [D, n] as its columns reach the residual stream: times
    the layer scale; for a post-norm block through the norm's affine and, for a LayerNorm,
    its centring (each token is divided by its own deviation as well, one positive factor
    shared by all of the token's memories). None when the post-norm is of another kind."""
    if not pre_norm:
        norm: Any = block_norm(block, sublayer)
        if isinstance(norm, nn.LayerNorm):
            weight = weight - weight.mean(dim=0, keepdim=True)
        elif norm is None or "rms" not in type(norm).__name__.lower():
            return None
        if getattr(norm, "weight", None) is not None:
            weight = norm.weight[:, None] * weight
    gamma = layer_scale(block, sublayer)
    return weight if gamma is None else gamma[:, None] * weight


def value_projection(attention: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The weight and bias that make the attention's value vectors from its input: the last
    third of a fused `qkv` (bias from `v_bias` where the model keeps it apart, as BEiT and
    EVA do), or a separate `v` / `v_proj`."""
    qkv = getattr(attention, "qkv", None)
    if isinstance(qkv, nn.Linear):
        width = qkv.out_features // 3
        v_bias = getattr(attention, "v_bias", None)
        if isinstance(v_bias, torch.Tensor):
            return qkv.weight[2 * width :], v_bias
        bias = None if qkv.bias is None else qkv.bias[2 * width :]
        return qkv.weight[2 * width :], bias
    for name in ("v", "v_proj"):
        linear = getattr(attention, name, None)
        if isinstance(linear, nn.Linear):
            return linear.weight, linear.bias
    return None


def attention_values(
    block: nn.Module, attention: nn.Module, block_input: torch.Tensor, pre_norm: bool
) -> torch.Tensor:
    """[B, heads, T, head_dim]; the caller checked value_projection."""
    projection = value_projection(attention)
    assert projection is not None
    norm = block_norm(block, ATTENTION)
    x = norm(block_input) if pre_norm and norm is not None else block_input
    values = F.linear(x, *projection)
    batch, tokens, _ = values.shape
    heads: Any = attention.num_heads
    return values.reshape(batch, tokens, int(heads), -1).transpose(1, 2)


def projection_input(attention: nn.Module, mixed: torch.Tensor) -> torch.Tensor:
    """What the output projection multiplies: the mixed values after any norm the attention
    applies to them (`norm`, timm's scale_norm)."""
    norm = getattr(attention, "norm", None)
    return norm(mixed) if isinstance(norm, nn.Module) else mixed
