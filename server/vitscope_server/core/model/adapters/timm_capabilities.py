"""The class-space capabilities of a timm model, checked on one forward before they are
offered.

The classifier (timm_classifier.py) is offered when the model's own modules reproduce its
logits from the tokens entering its final norm and its last block is as wide as the head.
A block is post-norm when what it adds from its attention is its norm1's output, pre-norm
otherwise. Attention outputs recomputed from probabilities and values, and memory values
times coefficients, are offered when they reproduce the sublayer outputs.
"""

from __future__ import annotations

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
from vitscope_server.core.model.adapters.capabilities import MemoryKind, mixed_values
from vitscope_server.core.model.adapters.timm_classifier import (
    Classifier,
    as_tokens,
    find_classifier,
)
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
    """One forward's tensors: per block its input, norm1's output, sublayer outputs, the
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
            sites.append(raw_site(f"{i}/norm1.out", f"{block.path}.norm1"))
        attention = _attention(adapter, i)
        if isinstance(getattr(attention, "proj", None), nn.Linear):
            sites.append(raw_site(f"{i}/proj.in", f"{block.attention_path}.proj", from_input=True))
        for part, tap in block.taps.items():
            site = tap_site(f"{i}/{part}", tap, Layout.RAW, (0, 0), 0)
            if part == "attn.probs":
                site = replace(site, attention_path=block.attention_path)
            sites.append(site)
    path = adapter.final_norm_path
    last = adapter.blocks[-1].path
    sites.append(raw_site("head.in", path or last, from_input=path is not None))
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
    return Probe(dict(captured), logits)


def head_cause(adapter: ModelAdapter, probe: Probe) -> Classifier | str:
    """The model's classifier when its own modules reproduce its logits and its last
    blocks serve what projection reads, or why not."""
    found = find_classifier(adapter)
    if isinstance(found, str):
        return found
    width = adapter.blocks[-1].width
    if found.fc.in_features != width:
        return (
            f"its classifier reads {found.fc.in_features}-wide tokens and its last block "
            f"gives {width}-wide ones"
        )
    tokens = as_tokens(probe.tensors.get("head.in", torch.empty(0)), width)
    if tokens is None or not _reproduces(found, tokens, probe.logits):
        return (
            "its classifier reads more than its normed, pooled tokens: "
            "fc(fc_norm(pool(norm(x)))) with its own modules does not reproduce its logits"
        )
    for index in adapter.tail_blocks():
        for part in ("attn.out", "mlp.out"):
            reason = adapter.unavailable_reason(index, part)
            if reason is not None:
                return f"block {index} serves no {part}, which the projection reads ({reason})"
    return found


def _reproduces(classifier: Classifier, tokens: torch.Tensor, logits: torch.Tensor) -> bool:
    try:
        return close(classifier.logits(tokens), logits)
    except (RuntimeError, ValueError):  # a head module that takes another layout
        return False


def pre_norm_of(probe: Probe, index: int) -> bool | None:
    """False when what block `index` adds from its attention is its norm1's output (a
    post-norm block), True otherwise (norm1 before the attention), None without a norm1."""
    normed, added = probe.tensors.get(f"{index}/norm1.out"), probe.tensors.get(f"{index}/attn.out")
    if normed is None:
        return None
    return added is None or not close(normed, added)


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
    if probs.shape[1] != values.shape[1]:
        return (
            f"block {index}'s attention has {probs.shape[1]} probability maps for "
            f"{values.shape[1]} value heads (it combines several softmaxes)"
        )
    mixed = mixed_values(probs, values)
    got = finish(module, ATTENTION, attention.proj(projection_input(attention, mixed)), pre_norm)
    if not close(got, output):
        return (
            f"block {index}'s attention output is not its probabilities times its values "
            "through its output projection (it mixes more than the probabilities show)"
        )
    return None


def memory_causes(
    adapter: ModelAdapter, probe: Probe, index: int, pre_norm: bool
) -> dict[MemoryKind, str]:
    """Per kind, why block `index`'s sublayer output is not coefficients times value vectors."""
    module = adapter.root.get_submodule(adapter.blocks[index].path)
    values = value_matrices(adapter, index, pre_norm)
    causes: dict[MemoryKind, str] = {}
    checks = (
        (MemoryKind.MLP, "mlp.hidden", "mlp.out", MLP),
        (MemoryKind.ATTENTION, "proj.in", "attn.out", ATTENTION),
    )
    for kind, source, target, sublayer in checks:
        coefficients = probe.tensors.get(f"{index}/{source}")
        output = probe.tensors.get(f"{index}/{target}")
        matrix = values.get(sublayer)
        if kind is MemoryKind.ATTENTION and adapter.blocks[index].windowed:
            causes[kind] = (
                f"block {index} attends within windows, so what its output projection "
                "multiplies is not in token order"
            )
        elif coefficients is None or output is None or matrix is None:
            causes[kind] = (
                f"block {index} has no output projection read as memories for its {target}"
            )
        elif coefficients.shape[:-1] != output.shape[:-1] or not _adds_up(
            module,
            output_projection(adapter, index, sublayer),
            sublayer,
            pre_norm,
            (coefficients, output, matrix),
        ):
            causes[kind] = (
                f"block {index}'s {target} is not its coefficients times its value vectors"
            )
    return causes


def _adds_up(
    module: nn.Module,
    projection: Any,
    sublayer: int,
    pre_norm: bool,
    tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> bool:
    """Pre-norm: the output minus coefficients @ values is one vector (the bias) for every
    token. Post-norm: the block's norm of the projection's output is the sublayer output
    (the values are then the projection's columns through the norm, see reaching_residual)."""
    coefficients, output, matrix = tensors
    if not pre_norm:
        return close(finish(module, sublayer, projection(coefficients), False), output)
    width = output.shape[-1]
    offset = output.reshape(-1, width) - (coefficients @ matrix.T).reshape(-1, width)
    return close(offset, offset[:1].expand_as(offset))


def output_projection(adapter: ModelAdapter, index: int, sublayer: int) -> nn.Module | None:
    block = adapter.blocks[index]
    if sublayer == MLP:
        tap = block.taps.get("mlp.hidden")
        return None if tap is None else adapter.root.get_submodule(tap.module_path)
    attention = _attention(adapter, index)
    return getattr(attention, "proj", None)


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
