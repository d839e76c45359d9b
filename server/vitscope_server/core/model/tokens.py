"""Token selection shared by every method that reads a site per token."""

from __future__ import annotations

from dataclasses import replace
from enum import Enum
from typing import Protocol

import torch

from vitscope_server.core.model.adapters import Layout, SiteDef
from vitscope_server.core.runtime.errors import InvalidArgument, Reason


class TokenMode(Enum):
    UNSPECIFIED = "unspecified"
    ALL = "all"
    PREFIX = "prefix"
    PATCHES = "patches"
    INDICES = "indices"
    POSITIONS = "positions"


class TokenSelection(Protocol):
    """What a request says about its tokens (ActivationQuery, ProjectionQuery)."""

    @property
    def token_mode(self) -> TokenMode: ...

    @property
    def token_indices(self) -> tuple[int, ...]: ...

    @property
    def positions(self) -> tuple[tuple[int, int], ...]: ...


def resolve_token_indices(query: TokenSelection, site: SiteDef, num_tokens: int) -> list[int]:
    """The token indices a request selects at a site, validated against its grid."""
    prefix = site.num_prefix_tokens
    height, width = site.grid
    mode = query.token_mode
    if mode is TokenMode.ALL:
        return list(range(num_tokens))
    if mode is TokenMode.PREFIX:
        if prefix == 0:
            raise InvalidArgument("tokens.mode", f"site {site.name!r} has no prefix tokens")
        return list(range(prefix))
    if mode is TokenMode.PATCHES:
        return list(range(prefix, num_tokens))
    if mode is TokenMode.INDICES and not query.token_indices:
        raise InvalidArgument(
            "tokens.indices", "required with token mode INDICES", reason=Reason.FIELD_REQUIRED
        )
    if mode is TokenMode.POSITIONS and not query.positions:
        raise InvalidArgument(
            "tokens.positions", "required with token mode POSITIONS", reason=Reason.FIELD_REQUIRED
        )
    if len(query.token_indices) > num_tokens or len(query.positions) > num_tokens:
        raise InvalidArgument(
            "tokens", f"at most {num_tokens} indices or positions for site {site.name!r}"
        )
    if mode is TokenMode.INDICES:
        bad = [n for n, i in enumerate(query.token_indices) if not 0 <= i < num_tokens]
        if bad:
            raise InvalidArgument(
                f"tokens.indices[{bad[0]}]",
                f"{query.token_indices[bad[0]]} out of range for site {site.name!r}; "
                f"allowed 0..{num_tokens - 1}",
            )
        return list(query.token_indices)
    bad = [
        n for n, (r, c) in enumerate(query.positions) if not (0 <= r < height and 0 <= c < width)
    ]
    if bad:
        raise InvalidArgument(
            f"tokens.positions[{bad[0]}]",
            f"{query.positions[bad[0]]} outside the {height}x{width} grid of site {site.name!r}; "
            f"rows 0..{height - 1}, cols 0..{width - 1}",
        )
    return [prefix + r * width + c for r, c in query.positions]


def select_tokens(tensor: torch.Tensor, axis: int, indices: list[int]) -> torch.Tensor:
    """A contiguous range is a view (all tokens cost nothing); scattered indices copy."""
    start = indices[0]
    if indices == list(range(start, start + len(indices))):
        return tensor.narrow(axis, start, len(indices))
    return tensor.index_select(axis, torch.tensor(indices, device=tensor.device))


def as_site_layout(site: SiteDef, shape: tuple[int, ...]) -> SiteDef:
    """The layout a tensor of this shape really has: a raw module with one vector per token
    reads like a token site; a token site that is not [B, tokens, C] (a pooled 'final') is raw."""
    tokens = site.num_prefix_tokens + site.grid[0] * site.grid[1]
    per_token = len(shape) == 3 and shape[1] == tokens
    if site.layout is Layout.RAW and per_token:
        return replace(site, layout=Layout.TOKENS)
    if site.layout is Layout.TOKENS and not per_token:
        return replace(site, layout=Layout.RAW)
    return site
