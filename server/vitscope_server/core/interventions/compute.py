"""Intervene: the base, source and reference forwards, then the variants in batches of
variants x images with their edits hooked in; a generator of events (a header, progress
with partial sweep results, one result per variant or the sweep's result)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from vitscope_server.core.interventions.edits import Operation
from vitscope_server.core.interventions.hooks import (
    RowEdit,
    SiteValues,
    edit_space_site,
    edit_view,
    editing,
    widening,
)
from vitscope_server.core.interventions.metrics import ResolvedMetric, metric_values, normalized
from vitscope_server.core.interventions.query import PreparedIntervention
from vitscope_server.core.interventions.selection import ResolvedEdit
from vitscope_server.core.model.adapters import ModelAdapter, SiteDef
from vitscope_server.core.model.capture import capture_sites
from vitscope_server.core.model.provenance import Provenance, provenance_of
from vitscope_server.core.model.readout import (
    DeviceSite,
    Prediction,
    SiteOutput,
    predictions,
    predictions_of,
    reduce_on_device,
    top_predictions,
)
from vitscope_server.core.model.tokens import as_site_layout
from vitscope_server.core.runtime.cancel import CancelToken
from vitscope_server.core.runtime.transfer import to_host


@dataclass(frozen=True)
class Reference:
    """The unedited base (and source) run per image: metric, top predictions."""

    metric: np.ndarray | None  # float32 [images]
    predictions: list[list[Prediction]]


@dataclass(frozen=True)
class InterventionHeader:
    provenance: Provenance
    prepared: PreparedIntervention
    base: Reference
    source: Reference | None
    targets: list[int]  # the metric's classes per image (-1 when none)
    others: list[int]


@dataclass(frozen=True)
class InterventionProgress:
    completed: int
    total: int
    # Sweeps: the variants just run (flat indices) and their metric per image.
    indices: list[int]
    values: np.ndarray | None  # float32 [variants, images]
    normalized: np.ndarray | None


@dataclass(frozen=True)
class VariantResult:
    index: int
    label: str
    metric: np.ndarray | None  # float32 [images]
    normalized: np.ndarray | None
    logits: np.ndarray | None  # float32 [images, classes] (the output without classes)
    class_logits: np.ndarray | None  # float32 [images, chosen classes]
    predictions: list[list[Prediction]]
    sites: list[SiteOutput]


@dataclass(frozen=True)
class SweepResult:
    shape: tuple[int, ...]
    axes: tuple[str, ...]
    values: np.ndarray  # float32 [images, *shape]
    normalized: np.ndarray | None


Event = InterventionHeader | InterventionProgress | VariantResult | SweepResult


def _record(
    prepared: PreparedIntervention, pixels: torch.Tensor, sites: list[SiteDef], cancel: CancelToken
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A plain forward: its output, and the edit spaces of `sites`."""
    adapter = prepared.loaded.adapter
    spaces = [edit_space_site(site) for site in sites]
    with capture_sites(adapter, spaces, pixels.shape[0], cancel) as captured:
        output = adapter.forward_by_request(pixels, [slice(0, pixels.shape[0])])
    views = {s.name: edit_view(adapter, s, captured[s.name], pixels.shape[0]) for s in sites}
    return output, views


def _edited_sites(prepared: PreparedIntervention, operation: Operation) -> list[SiteDef]:
    found = {
        e.site.name: e.site for edits in prepared.edits for e in edits if e.operation is operation
    }
    return list(found.values())


def _metric(
    prepared: PreparedIntervention, base: torch.Tensor, source: torch.Tensor | None
) -> ResolvedMetric | None:
    if prepared.metric is None:
        return None
    images = base.shape[0]
    base_top = base.argmax(dim=-1)
    source_top = source.argmax(dim=-1).expand(images) if source is not None else base_top
    target, other = prepared.metric_classes
    targets = source_top if target is None else torch.full_like(base_top, target)
    others = base_top if other is None else torch.full_like(base_top, other)
    return ResolvedMetric(prepared.metric, targets, others)


@dataclass(frozen=True)
class _Run:
    values: SiteValues
    base_output: torch.Tensor
    metric: ResolvedMetric | None
    base_metric: torch.Tensor | None
    source_metric: torch.Tensor | None


def _references(
    prepared: PreparedIntervention, cancel: CancelToken
) -> tuple[_Run, InterventionHeader]:
    device = prepared.loaded.device
    base_output, _ = _record(prepared, prepared.base.to(device), [], cancel)
    means: dict[str, torch.Tensor] = {}
    if prepared.reference is not None:
        _, spaces = _record(
            prepared, prepared.reference.to(device), _edited_sites(prepared, Operation.MEAN), cancel
        )
        means = {name: value.mean(dim=0, keepdim=True) for name, value in spaces.items()}
    sources: dict[str, torch.Tensor] = {}
    source_output = None
    if prepared.source is not None:
        source_output, sources = _record(
            prepared, prepared.source.to(device), _edited_sites(prepared, Operation.PATCH), cancel
        )
    metric = _metric(prepared, base_output, source_output)
    base_metric = source_metric = None
    if metric is not None:
        base_metric = metric_values(metric, base_output, base_output, 1)
        if source_output is not None:
            expanded = source_output.expand(base_output.shape[0], -1)
            source_metric = metric_values(metric, expanded, base_output, 1)
    run = _Run(SiteValues(sources, means), base_output, metric, base_metric, source_metric)
    names = prepared.loaded.adapter.class_names
    top = prepared.query.outputs.top_k

    def reference(output: torch.Tensor, values: torch.Tensor | None) -> Reference:
        return Reference(
            None if values is None else values.cpu().numpy(),
            predictions(names, output, top) if top else [],
        )

    header = InterventionHeader(
        provenance_of(prepared.loaded),
        prepared,
        reference(base_output, base_metric),
        None if source_output is None else reference(source_output, source_metric),
        metric.targets.tolist() if metric else [],
        metric.others.tolist() if metric else [],
    )
    return run, header


def _chunk_plan(edits: tuple[tuple[ResolvedEdit, ...], ...], images: int) -> list[RowEdit]:
    return [
        RowEdit(slice(j * images, (j + 1) * images), edit)
        for j, variant in enumerate(edits)
        for edit in variant
    ]


def _block_of(adapter: ModelAdapter, site: SiteDef) -> int:
    """The block a site is read in; the last for a site after the blocks (final)."""
    for index, block in enumerate(adapter.blocks):
        if site.module_path == block.path or site.module_path.startswith(block.path + "."):
            return 0 if site.from_input and site.module_path == block.path else index
    return len(adapter.blocks) - 1


def _shared_blocks(prepared: PreparedIntervention, first: int, count: int) -> int:
    """The first block a variant of this batch edits or reads: the blocks before it run once
    for the batch's variants (0 where the model's blocks do not run in sequence)."""
    adapter = prepared.loaded.adapter
    if count < 2 or not adapter.runs_blocks_in_sequence():
        return 0
    sites = [e.site for edits in prepared.edits[first : first + count] for e in edits]
    sites += prepared.output_sites
    return min((_block_of(adapter, site) for site in sites), default=0)


def _forward_chunk(
    prepared: PreparedIntervention, run: _Run, first: int, count: int, cancel: CancelToken
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward of `count` variants: their images widened to variants x images rows at
    the first block any of them edits, their edits hooked in, the output sites read."""
    adapter = prepared.loaded.adapter
    images = prepared.base.shape[0]
    rows = count * images
    base = prepared.base.to(prepared.loaded.device)
    start = _shared_blocks(prepared, first, count)
    pixels = base if start else base.repeat(count, 1, 1, 1)
    plan = _chunk_plan(prepared.edits[first : first + count], images)
    requests = [slice(j * images, (j + 1) * images) for j in range(count)]
    with (
        widening(adapter, start, count) if start else nullcontext(),
        editing(adapter, plan, rows, run.values),
        capture_sites(adapter, list(prepared.output_sites), rows, cancel) as captured,
    ):
        output = adapter.forward_by_request(pixels, requests)
    return output, captured


@dataclass(frozen=True)
class _DeviceVariant:
    """One variant's results before the chunk's single copy off the device."""

    index: int
    label: str
    metric: torch.Tensor | None
    normalized: torch.Tensor | None
    logits: torch.Tensor | None
    class_logits: torch.Tensor | None
    # (probabilities, class indices, logits) of the top predictions, each [images, k].
    top: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    sites: list[DeviceSite]

    def tensors(self) -> list[torch.Tensor]:
        values = [self.metric, self.normalized, self.logits, self.class_logits]
        kept = [t for t in values if t is not None] + list(self.top or ())
        return kept + [o.tensor for site in self.sites for o in site.tensors]

    def on_host(self, arrays: Iterator[np.ndarray], names: list[str]) -> VariantResult:
        """Reads this variant's arrays, in tensors() order, from the chunk's copy."""
        metric, scaled, logits, chosen = (
            None if t is None else next(arrays)
            for t in (self.metric, self.normalized, self.logits, self.class_logits)
        )
        top = [] if self.top is None else predictions_of(names, *(next(arrays) for _ in range(3)))
        sites = [site.on_host(arrays) for site in self.sites]
        return VariantResult(self.index, self.label, metric, scaled, logits, chosen, top, sites)


def _variant(
    prepared: PreparedIntervention,
    index: int,
    output: torch.Tensor,
    captured: dict[str, torch.Tensor],
    rows: slice,
    scores: tuple[torch.Tensor | None, torch.Tensor | None],
) -> _DeviceVariant:
    outputs = prepared.query.outputs
    logits = output[rows]
    chosen = logits[:, list(prepared.classes)] if prepared.classes else None
    sites = []
    for site in prepared.output_sites:
        tensor = captured[site.name][rows]
        sites.append(
            reduce_on_device(prepared.readout, as_site_layout(site, tuple(tensor.shape)), tensor)
        )
    metric, scaled = scores
    return _DeviceVariant(
        index,
        prepared.plan.variants[index].label,
        None if metric is None else metric[rows],
        None if scaled is None else scaled[rows],
        logits.float() if outputs.logits else None,
        None if chosen is None else chosen.float(),
        top_predictions(logits, outputs.top_k) if outputs.top_k else None,
        sites,
    )


def _variants_on_host(
    prepared: PreparedIntervention, variants: list[_DeviceVariant]
) -> list[VariantResult]:
    """A chunk's variants copied off the device at once."""
    arrays = iter(to_host([t.contiguous() for v in variants for t in v.tensors()]))
    names = prepared.loaded.adapter.class_names
    return [variant.on_host(arrays, names) for variant in variants]


def intervene(prepared: PreparedIntervention, cancel: CancelToken) -> Iterator[Event]:
    """The header, then per batch of variants its progress and results; a sweep ends with
    its whole result shaped like the sweep."""
    with torch.inference_mode():
        run, header = _references(prepared, cancel)
        yield header
        images = prepared.base.shape[0]
        total = len(prepared.plan.variants)
        step = prepared.plan.variants_per_forward
        sweep = prepared.plan.sweep
        values, scaled_values = [], []
        for first in range(0, total, step):
            cancel.raise_if_cancelled()
            count = min(step, total - first)
            output, captured = _forward_chunk(prepared, run, first, count, cancel)
            metric = scaled = None
            if run.metric is not None and run.base_metric is not None:
                metric = metric_values(run.metric, output, run.base_output, count)
                if run.source_metric is not None:
                    scaled = normalized(metric, run.base_metric, run.source_metric)
            indices = list(range(first, first + count))
            if sweep is None:
                on_device = [
                    _variant(
                        prepared,
                        index,
                        output,
                        captured,
                        slice(j * images, (j + 1) * images),
                        (metric, scaled),
                    )
                    for j, index in enumerate(indices)
                ]
                yield from _variants_on_host(prepared, on_device)
                yield InterventionProgress(first + count, total, indices, None, None)
                continue
            assert metric is not None
            chunk = metric.reshape(count, images).cpu().numpy()
            chunk_scaled = None if scaled is None else scaled.reshape(count, images).cpu().numpy()
            values.append(chunk)
            if chunk_scaled is not None:
                scaled_values.append(chunk_scaled)
            yield InterventionProgress(first + count, total, indices, chunk, chunk_scaled)
        if sweep is not None:
            yield _sweep_result(sweep.shape, sweep.axes, values, scaled_values)


def _sweep_result(
    shape: tuple[int, ...],
    axes: tuple[str, ...],
    values: list[np.ndarray],
    scaled: list[np.ndarray],
) -> SweepResult:
    def shaped(chunks: list[np.ndarray]) -> np.ndarray:
        flat = np.concatenate(chunks)  # [variants, images]
        return np.ascontiguousarray(flat.T.reshape(flat.shape[1], *shape), dtype=np.float32)

    return SweepResult(shape, axes, shaped(values), shaped(scaled) if scaled else None)
