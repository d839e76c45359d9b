"""Maximally activating images (Ghiasi et al. 2022): score every image by a channel's mean
over patch tokens and keep the top k per channel, with patch-wise activation maps.

One scan object serves the streaming RPC, the server-folder scan and the sharded batch
command. Ties are broken by image index, so top-k lists merged from shards equal the
top-k of one scan over everything.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vitscope_server.core.model.adapters import Layout, SiteDef
from vitscope_server.core.model.capture import ForwardStopped, capture_sites, last_block_needed
from vitscope_server.core.model.image_folders import read_image
from vitscope_server.core.model.images import ImageInput, prepare_batch
from vitscope_server.core.model.loading import LoadedModel
from vitscope_server.core.model.provenance import Provenance, provenance_of
from vitscope_server.core.model.sites import resolve_site
from vitscope_server.core.model.tokens import as_site_layout
from vitscope_server.core.runtime.cancel import CancelToken
from vitscope_server.core.runtime.errors import (
    InvalidArgument,
    Reason,
    ResourceExhausted,
    require_in_range,
    require_unique,
)

MAX_TOP_K = 1000
# What one hit takes in a result beside its float32 map and its path: index, score, framing.
HIT_FRAMING_BYTES = 64


@dataclass(frozen=True)
class ScanQuery:
    site: str
    channels: tuple[int, ...]
    top_k: int


@dataclass(frozen=True)
class Hit:
    index: int
    path: str
    score: float
    patch_map: np.ndarray  # float32 [H, W]


@dataclass(frozen=True)
class ScanItem:
    """One image to score: its index in the whole dataset and its name there."""

    index: int
    path: str
    image: ImageInput

    @property
    def field(self) -> str:
        """How errors name the image: by its path when it has one, else its stream index."""
        return f"image_folder[{self.path!r}]" if self.path else f"images[{self.index}]"


@dataclass(frozen=True)
class ScanResult:
    provenance: Provenance
    query: ScanQuery
    scanned: int
    tops: dict[int, list[Hit]]


def best(hits: Iterable[Hit], k: int) -> list[Hit]:
    """The k highest scores; equal scores keep the lower index first."""
    return sorted(hits, key=lambda hit: (-hit.score, hit.index))[:k]


class TopImageScan:
    """Accumulates the top-k per channel over batches of preprocessed images."""

    def __init__(self, loaded: LoadedModel, query: ScanQuery) -> None:
        adapter = loaded.adapter
        site = resolve_site(adapter, query.site, "site")
        shape = loaded.site_shapes.get(site.name)
        if shape is None or as_site_layout(site, shape).layout is not Layout.TOKENS:
            raise InvalidArgument(
                "site",
                f"{site.name!r} has no [tokens, channels] layout; use a token site "
                "such as blocks.{i}.mlp.hidden",
            )
        if not query.channels:
            raise InvalidArgument(
                "channels", "at least one channel is required", reason=Reason.FIELD_REQUIRED
            )
        require_in_range("channels", query.channels, 0, shape[-1] - 1, f" for site {site.name!r}")
        require_unique("channels", query.channels)
        if not 1 <= query.top_k <= MAX_TOP_K:
            raise InvalidArgument("top_k", f"must be in 1..{MAX_TOP_K}, got {query.top_k}")
        self.loaded = loaded
        self.query = ScanQuery(site.name, tuple(query.channels), query.top_k)
        self.site: SiteDef = site
        self.scanned = 0
        self.tops: dict[int, list[Hit]] = {c: [] for c in query.channels}

    def require_result_within(self, max_bytes: int, path_bytes: int = 0) -> None:
        """Refuses, before any image is scored, a scan whose full result (every channel's
        top_k hits, paths up to path_bytes long) would exceed max_bytes."""
        count, top_k = len(self.query.channels), self.query.top_k
        per_hit = math.prod(self.site.grid) * 4 + HIT_FRAMING_BYTES + path_bytes
        if count * top_k * per_hit > max_bytes:
            raise ResourceExhausted(
                f"channels, top_k: {count} channels x top_k {top_k} x {per_hit} bytes per hit "
                f"exceeds the result limit of {max_bytes} bytes; ask for fewer channels or a "
                "smaller top_k",
                reason=Reason.RESULT_TOO_LARGE,
            )

    def prepare(self, items: Sequence[ScanItem], max_pixels: int) -> torch.Tensor:
        """Decodes and preprocesses the items with the model's own transform; needs no
        compute slot. Errors name each item by its path or stream index."""
        return prepare_batch(
            self.loaded.adapter,
            [i.image for i in items],
            len(items),
            max_pixels,
            [i.field for i in items],
        )

    def add(self, pixels: torch.Tensor, items: Sequence[ScanItem], cancel: CancelToken) -> None:
        """Scores one prepared batch [B, 3, H, W] of the items."""
        adapter, site = self.loaded.adapter, self.site
        batch = pixels.to(self.loaded.device)
        stop_after = last_block_needed(adapter, [site])
        with torch.inference_mode():
            with (
                capture_sites(adapter, [site], batch.shape[0], cancel, stop_after) as captured,
                contextlib.suppress(ForwardStopped),
            ):
                adapter.forward(batch)
            channels = torch.tensor(self.query.channels, device=batch.device)
            patches = captured[site.name][:, site.num_prefix_tokens :].index_select(2, channels)
            scores = patches.float().mean(dim=1).cpu().numpy()
            maps = (
                patches.float().transpose(1, 2).reshape(batch.shape[0], len(channels), *site.grid)
            )
            maps_np = maps.cpu().numpy()
        for column, channel in enumerate(self.query.channels):
            # Each map is copied out of the batch so a kept hit does not keep the whole batch.
            fresh = [
                Hit(item.index, item.path, float(scores[row, column]), maps_np[row, column].copy())
                for row, item in enumerate(items)
            ]
            self.tops[channel] = best([*self.tops[channel], *fresh], self.query.top_k)
        self.scanned += batch.shape[0]

    def result(self) -> ScanResult:
        return ScanResult(provenance_of(self.loaded), self.query, self.scanned, dict(self.tops))


def file_items(files: Sequence[tuple[str, Path]], start: int) -> list[ScanItem]:
    """Scan items of files[i] numbered from start; the bytes are read here, batch by batch."""
    return [
        ScanItem(start + offset, name, read_image(name, path))
        for offset, (name, path) in enumerate(files)
    ]
