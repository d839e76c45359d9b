"""Explain for several requests in one run, when every method they ask for reads one
forward and no gradient: rollout and feature maps.

The gradient methods run alone: a backward over a larger batch changed a class-embedding
map's last bits, integrated gradients streams its progress as it runs, and relevancy
differentiates the batch's summed scores. So do faithfulness curves (their random orders
are seeded per request) and prompt targets (they extend the class list). Each request's
head runs on its own rows, so its scores are those it gets alone.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import replace

import torch

from vitscope_server.core.explain.compute import (
    Event,
    ExplanationHeader,
    ImageExplanation,
    explain,
    summary,
)
from vitscope_server.core.explain.query import Method, PreparedExplanation
from vitscope_server.core.explain.targets import Prompt, resolve_targets, target_space
from vitscope_server.core.runtime.batching import item_rows, outcome
from vitscope_server.core.runtime.cancel import CancelToken

_SHARABLE = {Method.ROLLOUT, Method.FEATURE_MAP}


def explain_batch_key(prepared: PreparedExplanation) -> Hashable | None:
    """Requests asking for the same methods over the same labels share a run; None for a
    request that runs on its own, streaming its progress."""
    query = prepared.query
    sharable = (
        prepared.loaded.adapter.head_apart
        and query.faithfulness is None
        and all(spec.method in _SHARABLE for spec in query.methods)
        and not any(isinstance(target, Prompt) for target in query.targets)
    )
    return (query.methods, query.labels) if sharable else None


def run_explanations(
    items: Sequence[PreparedExplanation], cancel: CancelToken
) -> list[list[Event] | BaseException]:
    """Each request's events, as explain yields them for it alone. A request whose own
    targets are invalid gets its error; an error of the shared run is raised."""
    if len(items) == 1:
        return [list(explain(items[0], cancel))]
    checked = [outcome(_check_targets, item, cancel) for item in items]
    valid = [item for item, error in zip(items, checked, strict=True) if error is None]
    events = _shared(valid, cancel) if valid else []
    shared = iter(events)
    return [error if error is not None else next(shared) for error in checked]


def _check_targets(item: PreparedExplanation, cancel: CancelToken) -> None:
    """Raises the error this request's targets would raise in its own run."""
    space = target_space(item.loaded, item.query.labels, [], cancel)
    if space is not None and item.query.targets:
        predicted = torch.zeros(item.pixels.shape[0], dtype=torch.long)
        resolve_targets(space, item.query.targets, predicted)


def _shared(items: list[PreparedExplanation], cancel: CancelToken) -> list[list[Event]]:
    sizes = [int(item.pixels.shape[0]) for item in items]
    targets = tuple(
        t
        for item, size in zip(items, sizes, strict=True)
        for t in item.query.targets or [None] * size
    )
    merged = replace(
        items[0],
        query=replace(items[0].query, targets=targets),
        pixels=torch.cat([item.pixels for item in items]),
    )
    rows = list(item_rows(sizes))
    events = list(explain(merged, cancel, rows))
    header = next(e for e in events if isinstance(e, ExplanationHeader))
    images = [e for e in events if isinstance(e, ImageExplanation)]
    methods = [spec.method for spec in merged.query.methods]
    per_request: list[list[Event]] = []
    for item, own in zip(items, rows, strict=True):
        mine = [replace(image, image_index=image.image_index - own.start) for image in images[own]]
        per_request.append([replace(header, prepared=item), *mine, summary(methods, mine)])
    return per_request
