"""The load-time probe: checks each block part an adapter proposes on a real forward.

A part is served only when the forward shows it means what docs/methods.md section 0 says:
sublayer outputs that, with the block's input, add up to its output; an MLP hidden
tensor with one vector per token; attention probabilities that are rows of a
softmax. Each block's grid and prefix-token count are read from its own tokens.
What fails becomes an unavailable site with its reason, never a crash later.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from vitscope_server.core.model.adapters.base import (
    BlockAnatomy,
    BlockParts,
    HeadSplit,
    Layout,
    ModelAdapter,
    SiteDef,
    Tap,
    UnavailableSite,
    tap_site,
)
from vitscope_server.core.model.capture import capture_sites
from vitscope_server.core.runtime.cancel import NEVER_CANCELLED

# Relative tolerance of the sum identity, and of probability rows summing to one.
SUM_TOLERANCE = 1e-4
ROW_TOLERANCE = 1e-3
MAX_PREFIX_TOKENS = 16


@dataclass(frozen=True)
class _Probe:
    """One probe forward's tensors by key, and the exception that stopped it, if any."""

    tensors: dict[str, torch.Tensor]
    error: str = ""


def _key(index: int, part: str) -> str:
    return f"{index}/{part}"


def _run(adapter: ModelAdapter, sites: list[SiteDef], pixels: torch.Tensor) -> _Probe:
    """One forward reading `sites` as they come (4-D channels-last maps flattened to tokens);
    a block's output that is not a single tensor is left out."""
    single: dict[str, bool] = {}
    handles = [
        adapter.root.get_submodule(block.path).register_forward_hook(
            lambda module, args, output, i=i: single.__setitem__(
                _key(i, "out"), isinstance(output, torch.Tensor)
            )
        )
        for i, block in enumerate(adapter.parts)
    ]
    try:
        with (
            torch.inference_mode(),
            capture_sites(adapter, sites, 1, NEVER_CANCELLED) as captured,
        ):
            adapter.forward(pixels)
    except Exception as exc:  # the probe reports what fails instead of failing the load
        return _Probe({}, f"{type(exc).__name__}: {exc}"[:300])
    finally:
        for handle in handles:
            handle.remove()
    return _Probe({k: v for k, v in captured.items() if single.get(k, True)})


def _raw(name: str, tap: Tap) -> SiteDef:
    return tap_site(name, tap, Layout.RAW, (0, 0), 0)


def _probe_sites(
    parts: list[BlockParts], final: str | None
) -> tuple[list[SiteDef], list[SiteDef], list[SiteDef]]:
    """Sites of the plain forward (block inputs and outputs, sublayers, residual taps), of
    the forward with attention probabilities exposed, and of the one with the heads' context
    exposed (apart, so that a failing explicit path costs the heads alone)."""
    plain, probs, heads = [], [], []
    for i, block in enumerate(parts):
        plain.append(_raw(_key(i, "in"), Tap(block.path, from_input=True)))
        plain.append(_raw(_key(i, "out"), Tap(block.path)))
        for j, tap in enumerate(block.residual_taps):
            plain.append(_raw(_key(i, f"residual{j}"), tap))
        for part, tap in block.taps.items():
            site = _raw(_key(i, part), tap)
            if part == "attn.probs":
                probs.append(replace(site, attention_path=block.attention_path))
            elif part == "attn.heads":
                heads.append(replace(site, heads=block.heads))
            else:
                plain.append(site)
    if final is not None:
        plain.append(_raw("final", Tap(final)))
    return plain, probs, heads


def infer_grid(
    tokens: int, image: tuple[int, int], hint: int
) -> tuple[int, tuple[int, int]] | None:
    """(prefix count, (rows, cols)) such that tokens = prefix + rows * cols with the image's
    aspect. A grid of exactly the image's aspect wins over an approximate one, so that a
    block whose class token has not joined yet (ConViT) reads as no prefix on the whole
    grid; within each pass the hinted prefix count is tried first, then none, then others."""
    height, width = image
    prefixes = (hint, *(p for p in range(MAX_PREFIX_TOKENS + 1) if p != hint))
    for tolerance in (0.0, 0.25):
        for prefix in prefixes:
            found = _grid_of(tokens - prefix, height, width, tolerance)
            if found is not None:
                return prefix, found
    return None


def _grid_of(patches: int, height: int, width: int, tolerance: float) -> tuple[int, int] | None:
    """rows x cols = patches with a cell aspect within `tolerance` of the image's."""
    if patches <= 0:
        return None
    guess = round(math.sqrt(patches * height / width))
    for rows in (guess, guess - 1, guess + 1):
        if rows > 0 and patches % rows == 0:
            cols = patches // rows
            cell_h, cell_w = height / rows, width / cols
            if abs(cell_h - cell_w) <= tolerance * max(cell_h, cell_w):
                return rows, cols
    return None


def _layout_of_tokens(
    out: torch.Tensor, hidden_width: int | None, image: tuple[int, int], hint: int
) -> tuple[int, tuple[int, int]] | str:
    """The block output's prefix count and grid, or why it is not a token tensor."""
    if out.dim() == 4 and out.shape[-1] == hidden_width:
        return 0, (int(out.shape[1]), int(out.shape[2]))
    if out.dim() != 3:
        return f"the block's output {list(out.shape)} is not tokens [B, T, C] or [B, H, W, C]"
    found = infer_grid(int(out.shape[1]), image, hint)
    if found is None:
        return f"the block's {out.shape[1]} tokens form no grid of the {image} input"
    return found


def _output_width(root: nn.Module, tap: Tap | None) -> int | None:
    """Width the MLP's output projection writes (to tell [B, H, W, C] from [B, C, H, W])."""
    if tap is None:
        return None
    module = root.get_submodule(tap.module_path)
    return int(module.out_features) if isinstance(module, nn.Linear) else None


def _check_sum(probe: _Probe, index: int, block: BlockParts, out: torch.Tensor) -> dict[str, str]:
    """attn.out and mlp.out must add up, with the residual entering the block, to its output."""
    parts = ("attn.out", "mlp.out")
    found = [probe.tensors.get(_key(index, p)) for p in parts]
    if any(p not in block.taps for p in parts):
        return {
            p: "cannot be checked without both sublayer outputs" for p in parts if p in block.taps
        }
    missing = [p for p, t in zip(parts, found, strict=True) if t is None]
    if missing:
        return {p: f"module {block.taps[p].module_path} did not run in the block" for p in parts}
    attn, mlp = (_tokens(t) for t in found if t is not None)
    out = _tokens(out)
    scale = float(out.abs().max()) + 1.0
    for j in range(-1, len(block.residual_taps)):
        residual = probe.tensors.get(_key(index, "in" if j < 0 else f"residual{j}"))
        if residual is None or not _same_shape(out, _tokens(residual), attn, mlp):
            continue
        if torch.allclose(_tokens(residual) + attn + mlp, out, rtol=0, atol=SUM_TOLERANCE * scale):
            return {}
    reason = "the block's input plus attn.out plus mlp.out is not its output (not a plain residual)"
    return dict.fromkeys(parts, reason)


def _tokens(tensor: torch.Tensor) -> torch.Tensor:
    """[B, H, W, C] maps as [B, H*W, C] tokens; anything else as it is."""
    return tensor.reshape(tensor.shape[0], -1, tensor.shape[-1]) if tensor.dim() == 4 else tensor


def _same_shape(*tensors: torch.Tensor) -> bool:
    return len({tuple(t.shape) for t in tensors}) == 1


def _check_hidden(probe: _Probe, index: int, out: torch.Tensor) -> str | None:
    hidden = probe.tensors.get(_key(index, "mlp.hidden"))
    if hidden is None:
        return "the MLP's output projection did not run"
    hidden, out = _tokens(hidden), _tokens(out)
    if hidden.dim() != 3 or hidden.shape[:-1] != out.shape[:-1]:
        return f"the MLP's hidden tensor {list(hidden.shape)} is not one vector per token"
    return None


def _check_probs(probe: _Probe, index: int, tokens: int) -> Layout | str:
    """The layout of the probabilities, or why they are not softmax rows over the tokens."""
    if probe.error:
        return f"the unfused attention path fails: {probe.error}"
    probs = probe.tensors.get(_key(index, "attn.probs"))
    if probs is None:
        return "the attention computes no explicit probabilities"
    if probs.dim() not in (4, 5) or not torch.is_floating_point(probs):
        return f"the attention's weights {list(probs.shape)} are not [B, heads, T, T]"
    rows = probs.float().sum(dim=-1)
    if probs.min() < 0 or not torch.allclose(rows, torch.ones_like(rows), atol=ROW_TOLERANCE):
        return "the attention's weights are not rows of probabilities"
    if probs.dim() == 4 and probs.shape[0] == 1:
        if probs.shape[2] != tokens:
            return f"the attention has {probs.shape[2]} queries for the block's {tokens} tokens"
        return Layout.ATTENTION
    return Layout.WINDOW_ATTENTION


def _check_heads(
    adapter: ModelAdapter,
    index: int,
    block: BlockParts,
    probes: tuple[_Probe, _Probe, _Probe],
    unavailable: dict[str, str],
    probs_layout: Layout,
) -> str | None:
    """The heads' contributions, with the projection's bias (times LayerScale), must add up
    to attn.out; why not, or None when they do."""
    if "attn.probs" in unavailable:
        return f"needs the attention's probabilities: {unavailable['attn.probs']}"
    if probs_layout is Layout.WINDOW_ATTENTION:
        return (
            "the attention is windowed: a head's context covers one window, and the windows "
            "are merged (and shifted back) only after the output projection"
        )
    if "attn.out" in unavailable or "attn.out" not in block.taps:
        return f"needs attn.out: {unavailable.get('attn.out', 'not found in the block')}"
    if probes[2].error:
        return f"the attention's explicit path fails: {probes[2].error}"
    context = probes[2].tensors.get(_key(index, "attn.heads"))
    attention = probes[0].tensors.get(_key(index, "attn.out"))
    if context is None or attention is None or block.heads is None:
        return "the attention's output projection did not run as a module"
    return _heads_sum_reason(adapter, block, block.heads, context, attention)


def _heads_sum_reason(
    adapter: ModelAdapter,
    block: BlockParts,
    split: HeadSplit,
    context: torch.Tensor,
    attention: torch.Tensor,
) -> str | None:
    tap = block.taps["attn.heads"]
    site = replace(_raw("heads", tap), layout=Layout.HEADS, heads=split)
    projection = adapter.root.get_submodule(tap.module_path)
    if context.dim() != 3 or context.shape[-1] % split.heads:
        return (
            f"the projection's input {list(context.shape)} does not split into {split.heads} heads"
        )
    summed = adapter.to_canonical(context, site, 1).sum(dim=2)
    bias = getattr(projection, "bias", None)
    if bias is not None:
        gamma = adapter.head_layer_scale(site)
        summed = summed + (bias if gamma is None else bias * gamma)
    tokens = replace(_raw("attn.out", block.taps["attn.out"]), layout=Layout.TOKENS)
    expected = adapter.to_canonical(attention, tokens, 1)
    scale = float(expected.abs().max()) + 1.0
    if summed.shape != expected.shape or not torch.allclose(
        summed, expected, rtol=0, atol=SUM_TOLERANCE * scale
    ):
        return "the heads' contributions do not add up to attn.out (a norm or gate between them)"
    return None


def _settle_block(
    adapter: ModelAdapter,
    index: int,
    block: BlockParts,
    probes: tuple[_Probe, _Probe, _Probe],
    image: tuple[int, int],
    hint: int,
) -> BlockAnatomy | str:
    plain, exposed, _ = probes
    out = plain.tensors.get(_key(index, "out"))
    if not isinstance(out, torch.Tensor):
        return "the block's output is not one tensor"
    given = plain.tensors.get(_key(index, "in"))
    if given is not None and _tokens(given).shape[:-1] != _tokens(out).shape[:-1]:
        return (
            f"it maps input {list(given.shape)} to output {list(out.shape)}, not tokens to "
            "tokens (a class-attention or resampling block)"
        )
    layout = _layout_of_tokens(
        out, _output_width(adapter.root, block.taps.get("mlp.hidden")), image, hint
    )
    if isinstance(layout, str):
        return layout
    prefix, grid = layout
    unavailable = dict(block.unavailable)
    unavailable.update(_check_sum(plain, index, block, out))
    if "mlp.hidden" in block.taps:
        reason = _check_hidden(plain, index, out)
        if reason is not None:
            unavailable["mlp.hidden"] = reason
    probs_layout = Layout.ATTENTION
    if "attn.probs" in block.taps:
        checked = _check_probs(exposed, index, prefix + grid[0] * grid[1])
        if isinstance(checked, str):
            unavailable["attn.probs"] = checked
        else:
            probs_layout = checked
    if "attn.heads" in block.taps:
        reason = _check_heads(adapter, index, block, probes, unavailable, probs_layout)
        if reason is not None:
            unavailable["attn.heads"] = reason
    taps = {part: tap for part, tap in block.taps.items() if part not in unavailable}
    return BlockAnatomy(
        block.path,
        taps,
        unavailable,
        grid,
        prefix,
        int(out.shape[-1]),
        block.attention_path,
        probs_layout,
        block.heads,
    )


def settle_anatomy(
    adapter: ModelAdapter, device: torch.device, prefix_hint: int
) -> dict[str, tuple[int, ...]]:
    """Probes the adapter's proposed blocks on `device`, settles its anatomy, and returns
    the shape of every canonical site for a batch of one."""
    input_size = adapter.data_config.input_size
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn((1, *input_size), generator=generator).to(device)
    plain_sites, probs_sites, heads_sites = _probe_sites(adapter.parts, adapter.final_norm_path)
    plain = _run(adapter, plain_sites, pixels)
    if plain.error:
        # Even the plain forward fails: every proposed part is suspect; try the blocks alone.
        plain = _run(adapter, [s for s in plain_sites if s.name.endswith(("/in", "/out"))], pixels)
    exposed = _run(adapter, probs_sites, pixels) if probs_sites else _Probe({})
    heads = _run(adapter, heads_sites, pixels) if heads_sites else _Probe({})
    image = (int(input_size[1]), int(input_size[2]))
    blocks: list[BlockAnatomy] = []
    kept: list[int] = []  # the proposed index of each settled block
    notes = (
        [UnavailableSite("forward", f"the model's forward fails: {plain.error}")]
        if plain.error
        else []
    )
    for index, block in enumerate(adapter.parts):
        probes = (plain, exposed, heads)
        settled = _settle_block(adapter, index, block, probes, image, prefix_hint)
        if isinstance(settled, str):
            notes.append(UnavailableSite(block.path, f"not served as a canonical block: {settled}"))
        else:
            blocks.append(settled)
            kept.append(index)
    blocks = _windowed_alike(adapter, blocks)
    final_ok = "final" in plain.tensors
    if adapter.final_norm_path is not None and not final_ok:
        notes.append(UnavailableSite("final", f"module {adapter.final_norm_path} did not run"))
    adapter.settle(blocks, notes, final_ok)
    if blocks:
        adapter.settle_capabilities(pixels)
    return _site_shapes(adapter, kept, {**plain.tensors, **exposed.tensors, **heads.tensors})


def _windowed_alike(adapter: ModelAdapter, blocks: list[BlockAnatomy]) -> list[BlockAnatomy]:
    """A block whose attention is of the class another block's was found windowed in attends
    within windows too, even where one window covers its whole map (Swin's last stage):
    its probabilities keep the windowed layout [B, windows, heads, N, N]."""

    def kind(block: BlockAnatomy) -> type | None:
        path = block.attention_path
        return None if path is None else type(adapter.root.get_submodule(path))

    windowed = {kind(b) for b in blocks if b.windowed} - {None}
    return [
        replace(b, probs_layout=Layout.WINDOW_ATTENTION)
        if "attn.probs" in b.taps and not b.windowed and kind(b) in windowed
        else b
        for b in blocks
    ]


def _site_shapes(
    adapter: ModelAdapter, kept: list[int], tensors: dict[str, torch.Tensor]
) -> dict[str, tuple[int, ...]]:
    """Shape of every canonical site for a batch of one, read from the probe's tensors."""
    if not kept:
        return {}
    keys = {"final": "final"}
    if kept:
        keys["embed"] = _key(kept[0], "in")
    for i, index in enumerate(kept):
        for part in ("out", "attn.out", "attn.probs", "attn.heads", "mlp.hidden", "mlp.out"):
            keys[f"blocks.{i}.{part}"] = _key(index, part)
    shapes = {}
    for site in adapter.canonical_sites():
        tensor = tensors.get(keys.get(site.name, ""))
        if tensor is not None:
            shapes[site.name] = tuple(adapter.to_canonical(tensor, site, 1).shape)
    return shapes
