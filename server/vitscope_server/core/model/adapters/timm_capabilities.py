"""The class-space capabilities of a timm model, read from its own modules and checked on
one forward before they are offered.

The classifier head is `head(fc_norm(pool(norm(x))))` with the model's `norm`, `fc_norm`,
`head` and `global_pool`; it is offered when those modules reproduce the model's logits
from the tokens entering its final norm and every served block is as wide as the head.
A block is pre-norm when its `norm1` reads the block's input; otherwise its sublayers are
post-normed. Attention outputs recomputed from probabilities and values, and memory
values times coefficients, are offered when they reproduce the sublayer outputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from vitscope_server.core.model.adapters.base import (
    Layout,
    ModelAdapter,
    SiteDef,
    Tap,
    tap_site,
)
from vitscope_server.core.model.adapters.capabilities import Missing, mixed_values
from vitscope_server.core.model.adapters.timm_sublayers import (
    ATTENTION,
    MLP,
    attention_values,
    block_norm,
    finish,
    projection_input,
    reaching_residual,
    value_projection,
)
from vitscope_server.core.model.capture import capture_sites
from vitscope_server.core.runtime.cancel import NEVER_CANCELLED

POOLS = ("token", "avg", "max", "avgmax")
TOLERANCE = 1e-4


def close(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """Equal to float rounding, relative to the expected tensor's magnitude."""
    if got.shape != expected.shape:
        return False
    scale = float(expected.abs().max()) + 1.0
    return bool(torch.allclose(got.float(), expected.float(), rtol=0, atol=TOLERANCE * scale))


def raw_site(name: str, path: str, from_input: bool = False) -> SiteDef:
    return tap_site(name, Tap(path, from_input=from_input), Layout.RAW, (0, 0), 0)


@dataclass(frozen=True)
class Probe:
    """One forward's tensors: per block its input, norm1's input, sublayer outputs, the
    attention's output-projection input and probabilities; the head's input; the logits."""

    tensors: dict[str, torch.Tensor]
    logits: torch.Tensor


def _attention(adapter: ModelAdapter, index: int) -> nn.Module | None:
    path = adapter.blocks[index].attention_path
    return None if path is None else adapter.root.get_submodule(path)


def probe_sites(adapter: ModelAdapter) -> list[SiteDef]:
    sites = []
    model: Any = adapter.root
    for i, block in enumerate(adapter.blocks):
        module = model.get_submodule(block.path)
        sites.append(raw_site(f"{i}/in", block.path, from_input=True))
        if block_norm(module, ATTENTION) is not None:
            sites.append(raw_site(f"{i}/norm1.in", f"{block.path}.norm1", from_input=True))
        attention = _attention(adapter, i)
        if isinstance(getattr(attention, "proj", None), nn.Linear):
            sites.append(raw_site(f"{i}/proj.in", f"{block.attention_path}.proj", from_input=True))
        for part, tap in block.taps.items():
            site = tap_site(f"{i}/{part}", tap, Layout.RAW, (0, 0), 0)
            if part == "attn.probs":
                site = replace(site, attention_path=block.attention_path)
            sites.append(site)
    if isinstance(getattr(model, "norm", None), nn.Module):
        sites.append(raw_site("head.in", "norm", from_input=True))
    return sites


def run_probe(adapter: ModelAdapter, pixels: torch.Tensor) -> Probe | str:
    try:
        with (
            torch.inference_mode(),
            capture_sites(adapter, probe_sites(adapter), 1, NEVER_CANCELLED) as captured,
        ):
            logits = adapter.forward(pixels)
    except Exception as exc:  # a capability the forward cannot show is refused, not a crash
        return f"its forward with attention probabilities exposed fails: {exc}"[:300]
    tensors = dict(captured)
    if "head.in" not in tensors:
        last = len(adapter.blocks) - 1
        tensors["head.in"] = tensors.get(f"{last}/in", torch.empty(0))
    return Probe(tensors, logits)


def pooled(model: Any, tokens: torch.Tensor, pool: str) -> torch.Tensor:
    """The model's own pooling of its normed tokens [B, T, D] -> [B, D]."""
    if pool == "token":
        return tokens[:, 0]
    patches = tokens[:, int(getattr(model, "num_prefix_tokens", 0)) :]
    if pool == "avg":
        return patches.mean(dim=1)
    if pool == "max":
        return patches.amax(dim=1)
    return 0.5 * (patches.mean(dim=1) + patches.amax(dim=1))


def head_cause(adapter: ModelAdapter, probe: Probe) -> str | None:
    """Why head(fc_norm(pool(norm(x)))) is not this model's classifier, or None when it is."""
    model: Any = adapter.root
    if getattr(model, "attn_pool", None) is not None or getattr(model, "global_pool", "") == "map":
        return (
            "it pools its tokens with attention (attn_pool) before the classifier, so a "
            "single token has no class scores of its own"
        )
    head = getattr(model, "head", None)
    linear = head if isinstance(head, nn.Linear) else getattr(head, "fc", None)
    if isinstance(linear, nn.Linear):
        widths = sorted({block.width for block in adapter.blocks} - {linear.in_features})
        if widths:
            return (
                f"its classifier reads {linear.in_features}-wide tokens and blocks of width "
                f"{widths} cannot be projected onto it (a hierarchical model)"
            )
    if not isinstance(head, nn.Linear):
        return (
            f"its head is a {type(head).__name__}, not one linear classifier over its pooled "
            "tokens"
        )
    pool = getattr(model, "global_pool", "")
    if pool not in POOLS:
        return f"its pooling {pool!r} is not one of {POOLS}"
    if not close(_logits(model, head, probe.tensors["head.in"], pool), probe.logits):
        return (
            "head(fc_norm(pool(norm(tokens)))) with its own modules does not reproduce its "
            "logits (the classifier reads more than the normed tokens)"
        )
    for index in range(len(adapter.blocks)):
        for part in ("attn.out", "mlp.out"):
            reason = adapter.unavailable_reason(index, part)
            if reason is not None:
                return f"block {index} serves no {part} ({reason}), whose projection it reads"
    return None


def _logits(model: Any, head: nn.Module, tokens: torch.Tensor, pool: str) -> torch.Tensor:
    """The logits the model's own modules give from the tokens entering its final norm; a
    distilled model averages its class-token head with `head_dist` on the next token."""
    if tokens.dim() != 3:
        return torch.empty(0)
    norm, fc_norm = (getattr(model, n, None) or nn.Identity() for n in ("norm", "fc_norm"))
    head_dist = getattr(model, "head_dist", None)
    if isinstance(head_dist, nn.Linear):
        normed = fc_norm(norm(tokens))
        return 0.5 * (head(normed[:, 0]) + head_dist(normed[:, 1]))
    logits: torch.Tensor = head(fc_norm(pooled(model, norm(tokens), pool)))
    return logits


def pre_norms(adapter: ModelAdapter, probe: Probe) -> list[bool] | str:
    """Per block: True when norm1 reads the block's input (pre-norm), False when it reads
    the attention's output (post-norm)."""
    result = []
    for i in range(len(adapter.blocks)):
        given, read = probe.tensors.get(f"{i}/in"), probe.tensors.get(f"{i}/norm1.in")
        if given is None or read is None:
            return f"block {i} has no norm1 before or after its attention"
        result.append(close(read, given))
    return result


def attention_cause(adapter: ModelAdapter, probe: Probe, index: int, pre_norm: bool) -> str | None:
    """Why block `index`'s attention output cannot be recomputed from its probabilities."""
    block = adapter.blocks[index]
    module = adapter.root.get_submodule(block.path)
    attention: Any = _attention(adapter, index)
    probs = probe.tensors.get(f"{index}/attn.probs")
    output = probe.tensors.get(f"{index}/attn.out")
    given = probe.tensors.get(f"{index}/in")
    if block.windowed:
        return f"block {index} attends within windows"
    for part in ("attn.probs", "attn.out"):
        reason = adapter.unavailable_reason(index, part)
        if reason is not None:
            return f"block {index} serves no {part} ({reason})"
    if attention is None or probs is None or output is None or given is None or given.dim() != 3:
        return f"block {index} serves no attention probabilities over its tokens"
    if value_projection(attention) is None or not isinstance(
        getattr(attention, "proj", None), nn.Linear
    ):
        return f"block {index}'s attention has no value and output projections to recompute it"
    values = attention_values(module, attention, given, pre_norm)
    mixed = mixed_values(probs, values)
    got = finish(module, ATTENTION, attention.proj(projection_input(attention, mixed)), pre_norm)
    if not close(got, output):
        return (
            f"block {index}'s attention output is not its probabilities times its values "
            "through its output projection (it mixes more than the probabilities show)"
        )
    return None


def memory_cause(
    adapter: ModelAdapter, probe: Probe, index: int, pre_norm: bool, values: Mapping[int, Any]
) -> str | None:
    """Why block `index`'s sublayer outputs are not coefficients times value vectors."""
    module = adapter.root.get_submodule(adapter.blocks[index].path)
    checks = (("mlp.hidden", "mlp.out", MLP), ("proj.in", "attn.out", ATTENTION))
    for source, target, sublayer in checks:
        coefficients = probe.tensors.get(f"{index}/{source}")
        output = probe.tensors.get(f"{index}/{target}")
        matrix = values.get(sublayer)
        if coefficients is None or output is None or matrix is None:
            return f"block {index} has no output projection read as memories for its {target}"
        got = coefficients @ matrix.T
        if pre_norm:
            offset = (output - got).reshape(-1, output.shape[-1])
            ok = close(offset, offset[:1].expand_as(offset))
        else:
            raw = coefficients @ _weight(adapter, index, sublayer).T
            ok = close(
                finish(module, sublayer, raw + _bias(adapter, index, sublayer), False), output
            )
        if not ok:
            return f"block {index}'s {target} is not its coefficients times its value vectors"
    return None


def output_projection(adapter: ModelAdapter, index: int, sublayer: int) -> nn.Module | None:
    block = adapter.blocks[index]
    if sublayer == MLP:
        tap = block.taps.get("mlp.hidden")
        return None if tap is None else adapter.root.get_submodule(tap.module_path)
    attention = _attention(adapter, index)
    return getattr(attention, "proj", None)


def _weight(adapter: ModelAdapter, index: int, sublayer: int) -> torch.Tensor:
    module: Any = output_projection(adapter, index, sublayer)
    weight: torch.Tensor = module.weight
    return weight


def _bias(adapter: ModelAdapter, index: int, sublayer: int) -> torch.Tensor | float:
    module: Any = output_projection(adapter, index, sublayer)
    return 0.0 if module.bias is None else module.bias


def value_matrices(adapter: ModelAdapter, index: int, pre_norm: bool) -> dict[int, torch.Tensor]:
    """Per sublayer, the output projection's columns as they reach the residual stream."""
    module = adapter.root.get_submodule(adapter.blocks[index].path)
    matrices = {}
    for sublayer in (MLP, ATTENTION):
        projection = output_projection(adapter, index, sublayer)
        if not isinstance(projection, nn.Linear):
            continue
        matrix = reaching_residual(module, sublayer, projection.weight, pre_norm)
        if matrix is not None:
            matrices[sublayer] = matrix
    return matrices


def missing_or(adapter: ModelAdapter, cause: str | None) -> Missing | None:
    return None if cause is None else adapter.missing(cause)
