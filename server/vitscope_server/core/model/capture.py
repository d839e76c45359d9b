"""Reading sites during one forward pass with hooks that are always removed.

Hooks are module-global, so each one records only on the thread that
installed it: concurrent requests on one model never see each other's tensors.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from typing import Any, TypeVar

import torch
from torch import nn

from vitscope_server.core.model.adapters import ModelAdapter, SiteDef
from vitscope_server.core.runtime.cancel import CancelToken
from vitscope_server.core.runtime.errors import InvalidArgument


def _pick_tensor(value: Any, site: SiteDef) -> torch.Tensor:
    if isinstance(value, (tuple, list)):
        value = value[site.output_index] if len(value) > site.output_index else None
    if not isinstance(value, torch.Tensor):
        raise InvalidArgument(
            "sites", f"module {site.module_path!r} of site {site.name!r} yields no tensor"
        )
    return value


def head_context_paths(sites: list[SiteDef]) -> set[str]:
    """Attentions that must call their output projection as a module for these sites."""
    return {s.heads.context_path for s in sites if s.heads and s.heads.context_path}


class ForwardStopped(Exception):
    """Raised out of the forward once the last needed block has run."""


def last_block_needed(adapter: ModelAdapter, sites: list[SiteDef]) -> int | None:
    """The deepest block holding a site, or None when a site lies outside the blocks."""
    deepest = 0
    for site in sites:
        if site.from_input and site.module_path == adapter.blocks[0].path:
            continue
        inside = [
            index
            for index, block in enumerate(adapter.blocks)
            if site.module_path == block.path or site.module_path.startswith(block.path + ".")
        ]
        if not inside:
            return None
        deepest = max(deepest, inside[0])
    return deepest


def _inside_a_block(adapter: ModelAdapter, path: str) -> bool:
    return any(path.startswith(block.path + ".") for block in adapter.blocks)


@contextmanager
def _exposed(adapter: ModelAdapter, sites: list[SiteDef]) -> Iterator[ExitStack]:
    """The model switched to serve the sites: explicit attention and head contexts where they
    read them, and compiled blocks (compile_blocks) run as written when a site lies inside one."""
    attention_paths = {s.attention_path for s in sites if s.attention_path is not None}
    with ExitStack() as stack:
        if any(_inside_a_block(adapter, site.module_path) for site in sites):
            stack.enter_context(torch.compiler.set_stance("force_eager"))
        stack.enter_context(adapter.attention_probs_exposed(attention_paths))
        stack.enter_context(adapter.head_contexts_exposed(head_context_paths(sites)))
        yield stack


Hook = TypeVar("Hook", bound=Callable[..., Any])


def _plain(adapter: ModelAdapter, hook: Hook) -> Hook:
    """The hook kept out of the compiler's graphs when the blocks are compiled (a wrapper that
    costs a little on every call, so eager models go without it)."""
    return torch.compiler.disable(hook) if adapter.compiled else hook


def _hook(
    adapter: ModelAdapter, module: nn.Module, site: SiteDef, record: Callable[[Any], None]
) -> Callable[[], None]:
    """Records the site's input or output of the module; returns what removes the hook."""
    if site.from_input:
        pre = _plain(adapter, lambda module, args: record(args))
        return module.register_forward_pre_hook(pre).remove
    post = _plain(adapter, lambda module, args, output: record(output))
    return module.register_forward_hook(post).remove


@contextmanager
def capture_sites(
    adapter: ModelAdapter,
    sites: list[SiteDef],
    batch: int,
    cancel: CancelToken,
    stop_after_block: int | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yields a dict that the next forward on this thread fills with canonical tensors by site name.

    With stop_after_block, the forward raises ForwardStopped once that block has run,
    so blocks no site needs are never computed. With compiled blocks (compile_blocks) the
    hooks run as plain Python around them, and a forward that reads a site inside a block
    runs the blocks as written: the compiler would fold a hook's thread check and call count
    into its graph.
    """
    owner = threading.get_ident()
    captured: dict[str, torch.Tensor] = {}

    def recorder(site: SiteDef) -> Callable[[Any], None]:
        """Records the site's call of its module (call_index of every `calls` calls)."""
        count = itertools.count()

        def record(value: Any) -> None:
            if threading.get_ident() != owner or next(count) % site.calls != site.call_index:
                return
            tensor = adapter.to_canonical(_pick_tensor(value, site), site, batch)
            captured[site.name] = tensor if site.sae_read is None else site.sae_read(tensor)

        return record

    def cancel_hook(module: nn.Module, args: Any) -> None:
        if threading.get_ident() == owner:
            cancel.raise_if_cancelled()

    def stop_hook(module: nn.Module, args: Any, output: Any) -> None:
        if threading.get_ident() == owner:
            raise ForwardStopped

    with _exposed(adapter, sites) as stack:
        for block in adapter.blocks:
            module = adapter.root.get_submodule(block.path)
            handle = module.register_forward_pre_hook(_plain(adapter, cancel_hook))
            stack.callback(handle.remove)
        for site in sites:
            module = adapter.root.get_submodule(site.module_path)
            stack.callback(_hook(adapter, module, site, recorder(site)))
        if stop_after_block is not None:
            last = adapter.root.get_submodule(adapter.blocks[stop_after_block].path)
            stack.callback(last.register_forward_hook(_plain(adapter, stop_hook)).remove)
        yield captured


def read_site(
    adapter: ModelAdapter, site: SiteDef, pixels: torch.Tensor, cancel: CancelToken
) -> torch.Tensor:
    """One site's canonical tensor for a batch of preprocessed images, the forward stopped
    after the last block it needs (run under the caller's grad mode)."""
    stop = last_block_needed(adapter, [site])
    with (
        capture_sites(adapter, [site], pixels.shape[0], cancel, stop) as captured,
        suppress(ForwardStopped),
    ):
        adapter.forward(pixels)
    if site.name not in captured:
        raise InvalidArgument("site", f"{site.name!r} is not reached by the forward pass")
    return captured[site.name]
