"""Forwards with a site's tensor replaced: the SAE's reconstruction spliced in, or zeros.

Like capture, the hook acts only on the thread that installed it, and it is always removed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from vitscope_server.core.model.adapters import Layout, ModelAdapter, SiteDef
from vitscope_server.core.runtime.errors import FailedPrecondition

Replacement = Callable[[torch.Tensor], torch.Tensor]


def _replaced(
    adapter: ModelAdapter, site: SiteDef, raw: torch.Tensor, replace: Replacement
) -> torch.Tensor:
    """replace() on the canonical [B, T, C] view, returned in the module's own shape."""
    canonical = adapter.to_canonical(raw, site, raw.shape[0])
    return replace(canonical).to(raw.dtype).reshape(raw.shape)


@contextmanager
def replaced_site(adapter: ModelAdapter, site: SiteDef, replace: Replacement) -> Iterator[None]:
    """Forwards on this thread inside the block see replace(x) where the site holds x."""
    if site.layout is not Layout.TOKENS or site.calls != 1 or site.sae_read is not None:
        raise FailedPrecondition(
            f"site {site.name!r} cannot be replaced: only token sites read once per forward",
            subject=adapter.spec.name,
            field="site",
        )
    owner = threading.get_ident()
    module = adapter.root.get_submodule(site.module_path)

    def on_input(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if threading.get_ident() != owner:
            return None
        return (_replaced(adapter, site, args[0], replace), *args[1:])

    def on_output(module: torch.nn.Module, args: Any, output: Any) -> Any:
        if threading.get_ident() != owner:
            return None
        if isinstance(output, (tuple, list)):
            parts = list(output)
            parts[site.output_index] = _replaced(adapter, site, parts[site.output_index], replace)
            return type(output)(parts)
        return _replaced(adapter, site, output, replace)

    if site.from_input:
        handle = module.register_forward_pre_hook(on_input)
    else:
        handle = module.register_forward_hook(on_output)
    try:
        yield
    finally:
        handle.remove()
