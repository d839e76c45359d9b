"""Forward hooks that apply each variant's edits to its rows of a batch.

The batch holds variants x images rows, variant-major. Each edited site gets one hook on
the module it is read from; the hook edits a copy of the tensor, so an edit at a later
site sees every earlier one, and edits at one site apply in request order. Heads are
edited on their context vectors before the output projection; a site read through an SAE
in the SAE's space, with its error term kept. Hooks record only on the thread that installed
them, like capture.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from vitscope_server.core.interventions.edits import Operation
from vitscope_server.core.interventions.selection import ResolvedEdit
from vitscope_server.core.model.adapters import Layout, ModelAdapter, SiteDef
from vitscope_server.core.model.capture import head_context_paths


@dataclass(frozen=True)
class RowEdit:
    """One edit of one variant: its rows in the batch."""

    rows: slice
    edit: ResolvedEdit


@dataclass(frozen=True)
class SiteValues:
    """Values edits read: the source images' edit spaces by site (one row per image, or one
    for all) and the reference images' means (one row)."""

    source: dict[str, torch.Tensor]
    mean: dict[str, torch.Tensor]


def edit_view(
    adapter: ModelAdapter, site: SiteDef, tensor: torch.Tensor, batch: int
) -> torch.Tensor:
    """The tensor as the edit space: [B, tokens, channels], or [B, tokens, heads, head_dim]
    for attn.heads; a view wherever the layout allows, so edits write through."""
    if site.layout is Layout.HEADS and site.heads is not None:
        return tensor.reshape(*tensor.shape[:2], site.heads.heads, -1)
    return adapter.to_canonical(tensor, site, batch)


def edit_space_site(site: SiteDef) -> SiteDef:
    """The site read for an edit's values: attn.heads as its raw context vectors."""
    if site.layout is Layout.HEADS:
        return SiteDef(
            site.name,
            site.module_path,
            Layout.RAW,
            site.grid,
            site.num_prefix_tokens,
            from_input=site.from_input,
            heads=site.heads,
        )
    return site


def _apply(view: torch.Tensor, rows: slice, edit: ResolvedEdit, values: SiteValues) -> None:
    """Writes one edit into view[rows] in place."""
    region = view[rows]
    mask = edit.mask
    op = edit.operation
    if op is Operation.ZERO:
        region.masked_fill_(mask, 0.0)
        return
    if op is Operation.SET:
        region.masked_fill_(mask, edit.value)
        return
    if op is Operation.SCALE:
        new = region * edit.factor
    elif op is Operation.ADD:
        assert edit.delta is not None
        new = region + edit.delta.to(region.dtype)
    elif op is Operation.PATCH:
        new = values.source[edit.site.name].to(region.dtype).expand_as(region)
    else:
        new = values.mean[edit.site.name].to(region.dtype).expand_as(region)
    region.copy_(torch.where(mask, new, region))


def _apply_all(view: torch.Tensor, site: SiteDef, edits: list[RowEdit], values: SiteValues) -> None:
    """The site's edits, in order, written into its base tokens `view`. A site read through
    an SAE is edited in the SAE's space and the difference lifted back to the tokens, so the
    SAE's error term stays as it was (unedited values leave the tokens exactly as they are)."""
    read = site.sae_read
    space = view if read is None else read.values(view)
    edited = space if read is None else space.clone()
    for row_edit in edits:
        _apply(edited, row_edit.rows, row_edit.edit, values)
    if read is not None:
        view.add_(read.lift(edited - space).to(view.dtype))


def _swap(value: Any, index: int, tensor: torch.Tensor) -> Any:
    if isinstance(value, tuple):
        return (*value[:index], tensor, *value[index + 1 :])
    if isinstance(value, list):
        return [*value[:index], tensor, *value[index + 1 :]]
    return tensor


@contextmanager
def editing(
    adapter: ModelAdapter, plan: Sequence[RowEdit], batch: int, values: SiteValues
) -> Iterator[None]:
    """Installs the plan's hooks for the next forward on this thread."""
    owner = threading.get_ident()
    by_site: dict[str, list[RowEdit]] = {}
    for row_edit in plan:
        by_site.setdefault(row_edit.edit.site.name, []).append(row_edit)

    def editor(site: SiteDef, edits: list[RowEdit]) -> Any:
        count = itertools.count()

        def edit(value: Any) -> Any:
            if threading.get_ident() != owner or next(count) % site.calls != site.call_index:
                return None
            picked = value[site.output_index] if isinstance(value, (tuple, list)) else value
            copy = picked.clone(memory_format=torch.contiguous_format)
            view = edit_view(adapter, site, copy, batch)
            if view.untyped_storage().data_ptr() != copy.untyped_storage().data_ptr():
                raise RuntimeError(f"site {site.name} has no editable view")
            _apply_all(view, site, edits, values)
            return _swap(value, site.output_index, copy)

        return edit

    sites = [edits[0].edit.site for edits in by_site.values()]
    with ExitStack() as stack:
        stack.enter_context(adapter.head_contexts_exposed(head_context_paths(sites)))
        for site in sites:
            module = adapter.root.get_submodule(site.module_path)
            edit = editor(site, by_site[site.name])
            if site.from_input:
                handle = module.register_forward_pre_hook(lambda m, args, e=edit: e(args))
            else:
                handle = module.register_forward_hook(lambda m, args, out, e=edit: e(out))
            stack.callback(handle.remove)
        yield


@contextmanager
def widening(adapter: ModelAdapter, block: int, copies: int) -> Iterator[None]:
    """The next forward on this thread runs `copies` copies of its batch from `block` on:
    the blocks before it, which no edit touches, run once for every variant."""
    owner = threading.get_ident()

    def widen(module: Any, args: Any) -> Any:
        if threading.get_ident() != owner:
            return None
        tokens = args[0]
        return (tokens.repeat(copies, *([1] * (tokens.dim() - 1))), *args[1:])

    module = adapter.root.get_submodule(adapter.blocks[block].path)
    handle = module.register_forward_pre_hook(widen)
    try:
        yield
    finally:
        handle.remove()
