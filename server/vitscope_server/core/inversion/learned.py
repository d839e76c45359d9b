"""Learned inversion of many requests at once: the forwards are shared, each request's
inverse networks run on its own rows.

Requests for one model share the forward that reads their targets (stopped after the
deepest depth any asks for) and, per depth, the forward that scores the delivered 8-bit
reconstructions. The inverse chain runs per request, so that its kernels see exactly the
rows they would alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from vitscope_server.core.inversion.invert import (
    Event,
    PreparedInversion,
    Reconstruction,
    chain,
    header,
    representations,
    scored,
)
from vitscope_server.core.inversion.modules import chain_names
from vitscope_server.core.model.pixels import denormalize, to_uint8
from vitscope_server.core.runtime.batching import item_rows, outcome
from vitscope_server.core.runtime.cancel import CancelToken


@dataclass(eq=False)
class _Request:
    """One request's targets and originals, then its images and their scores per depth."""

    prepared: PreparedInversion
    targets: dict[int, torch.Tensor]
    originals: torch.Tensor | None
    images: dict[int, np.ndarray] = field(default_factory=dict)
    reconstructions: dict[int, Reconstruction] = field(default_factory=dict)

    def events(self) -> list[Event]:
        depths = self.prepared.query.depths
        return [header(self.prepared), *(self.reconstructions[d] for d in depths)]


def learned_batch_key(prepared: PreparedInversion) -> str:
    """Every learned inversion of a model may share forwards with the others."""
    return "learned"


def run_learned(
    items: Sequence[PreparedInversion], cancel: CancelToken
) -> list[list[Event] | BaseException]:
    """Each request's header and one Reconstruction per depth, in its order of depths; an
    error in a shared forward is raised (it concerns them all)."""
    adapter = items[0].loaded.adapter
    with torch.no_grad():
        requests = _targets(items, cancel)
        reconstructed = [outcome(_reconstruct, request) for request in requests]
        failed = {i: o for i, o in enumerate(reconstructed) if isinstance(o, BaseException)}
        live = [r for i, r in enumerate(requests) if i not in failed]
        for depth in sorted({d for r in live for d in r.images}):
            asking = [r for r in live if depth in r.images]
            results = scored(
                adapter,
                depth,
                [r.images[depth] for r in asking],
                [r.targets[depth] for r in asking],
                [r.originals for r in asking],
                cancel,
            )
            for request, result in zip(asking, results, strict=True):
                request.reconstructions[depth] = result
    return [failed.get(i) or r.events() for i, r in enumerate(requests)]


def _reconstruct(request: _Request) -> None:
    """The request's own inverse chain at each of its depths, as 8-bit images."""
    for depth in request.prepared.query.depths:
        modules = [request.prepared.modules[name] for name in chain_names(depth)]
        request.images[depth] = to_uint8(chain(modules, request.targets[depth]))


def _targets(items: Sequence[PreparedInversion], cancel: CancelToken) -> list[_Request]:
    """Every request's representations: sent, or read in one forward over all their images."""
    loaded = items[0].loaded
    adapter, device = loaded.adapter, loaded.device
    from_images = [item for item in items if item.representation is None]
    read: dict[int, torch.Tensor] = {}
    if from_images:
        pixels = torch.cat([item.pixels for item in from_images if item.pixels is not None])
        depths = sorted({d for item in from_images for d in item.query.depths})
        read = representations(adapter, pixels.to(device), depths, cancel)
    rows_read = item_rows(item.batch_size for item in from_images)
    requests = []
    for item in items:
        inputs = item.pixels.to(device) if item.pixels is not None else None
        if item.representation is not None:
            targets = {item.query.depths[0]: item.representation.to(device)}
        else:
            rows = next(rows_read)
            targets = {d: read[d][rows] for d in item.query.depths}
        originals = denormalize(inputs, adapter.data_config) if inputs is not None else None
        requests.append(_Request(item, targets, originals))
    return requests
