"""An Intervene request validated before any forward: edits resolved against the model,
the sweep expanded, the metric's classes and the outputs checked, and the variants per
forward chosen so that the request fits its memory budget."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from vitscope_server.core.interventions.edits import (
    Edit,
    InterventionQuery,
    MetricKind,
    Operation,
    Outputs,
    Variant,
)
from vitscope_server.core.interventions.estimate import fixed_bytes, variant_bytes
from vitscope_server.core.interventions.selection import ResolvedEdit, class_index, resolve_edit
from vitscope_server.core.interventions.sweeps import SweepPlan, expand
from vitscope_server.core.model.adapters import SiteDef
from vitscope_server.core.model.images import ImageInput, prepare_batch
from vitscope_server.core.model.loading import LoadedModel
from vitscope_server.core.model.readout import Reduction, TensorDType, check_site
from vitscope_server.core.model.sites import resolve_site
from vitscope_server.core.model.tokens import TokenMode, as_site_layout
from vitscope_server.core.runtime.errors import (
    FailedPrecondition,
    InvalidArgument,
    Reason,
    ResourceExhausted,
    require_unique,
)

# Image forwards (variants x images) one request may ask for.
MAX_IMAGE_FORWARDS = 1 << 17


@dataclass(frozen=True)
class InterventionLimits:
    max_batch: int
    max_pixels: int
    max_result_bytes: int
    max_message_bytes: int
    memory_bytes: int  # the per-request memory budget


@dataclass(frozen=True)
class ImageSets:
    base: list[ImageInput]
    source: list[ImageInput]
    reference: list[ImageInput]

    def fields(self) -> list[str]:
        return [
            f"{name}[{i}]"
            for name, images in (
                ("images", self.base),
                ("source_images", self.source),
                ("reference_images", self.reference),
            )
            for i in range(len(images))
        ]

    def all(self) -> list[ImageInput]:
        return [*self.base, *self.source, *self.reference]


@dataclass(frozen=True)
class SiteReadout:
    """How an output site is read after the edits (the Readout of core/model/readout)."""

    token_mode: TokenMode
    token_indices: tuple[int, ...]
    positions: tuple[tuple[int, int], ...]
    reduction: Reduction
    channels: tuple[int, ...]
    top_k: int
    output_dtype: TensorDType


@dataclass(frozen=True)
class Plan:
    """Variants (the sweep's, expanded) and the forwards they take."""

    variants: tuple[Variant, ...]
    sweep: SweepPlan | None
    variants_per_forward: int
    bytes: int


@dataclass(frozen=True)
class PreparedIntervention:
    loaded: LoadedModel
    query: InterventionQuery  # effective
    plan: Plan
    edits: tuple[tuple[ResolvedEdit, ...], ...]  # per variant
    base: torch.Tensor
    source: torch.Tensor | None
    reference: torch.Tensor | None
    output_sites: tuple[SiteDef, ...]
    readout: SiteReadout
    classes: tuple[int, ...]
    metric: MetricKind | None
    metric_classes: tuple[int | None, int | None]


def _variants(
    loaded: LoadedModel, query: InterventionQuery
) -> tuple[tuple[Variant, ...], SweepPlan | None]:
    if query.sweep is not None and query.variants:
        raise InvalidArgument("sweep", "give variants or a sweep, not both")
    if query.sweep is not None:
        sweep = expand(loaded.adapter, query.sweep)
        return sweep.variants, sweep
    if not query.variants:
        raise InvalidArgument(
            "variants",
            "at least one variant (or a sweep) is required",
            reason=Reason.FIELD_REQUIRED,
        )
    return query.variants, None


def _sites_of(variants: tuple[Variant, ...], operation: Operation) -> list[str]:
    return sorted({e.site for v in variants for e in v.edits if e.operation is operation})


def plan_forwards(
    loaded: LoadedModel, images: ImageSets, query: InterventionQuery, limits: InterventionLimits
) -> Plan:
    """The variants and how many go in one forward, from the request alone (before decoding
    images): as many as the memory budget allows, up to the server's max batch in rows."""
    variants, sweep = _variants(loaded, query)
    base = len(images.base)
    if not 1 <= base <= limits.max_batch:
        raise InvalidArgument("images", f"{base} images; allowed 1..{limits.max_batch}")
    if base * len(variants) > MAX_IMAGE_FORWARDS:
        raise ResourceExhausted(
            f"{'sweep' if sweep else 'variants'}: {len(variants)} variants x {base} images is "
            f"over the limit of {MAX_IMAGE_FORWARDS} image forwards; send fewer images or "
            "sweep fewer blocks (sweep.blocks)",
            reason=Reason.LIMIT_EXCEEDED,
            field="sweep" if sweep else "variants",
        )
    adapter, shapes = loaded.adapter, loaded.site_shapes
    recorded = _sites_of(variants, Operation.PATCH) + _sites_of(variants, Operation.MEAN)
    fixed = fixed_bytes(adapter, shapes, images.all(), images.fields(), recorded, limits.max_pixels)
    per_variant = variant_bytes(adapter, shapes, base, query.outputs.sites)
    room = (limits.memory_bytes - fixed) // max(per_variant, 1)
    wanted = query.variants_per_forward or len(variants)
    if query.variants_per_forward is not None and query.variants_per_forward < 1:
        raise InvalidArgument("variants_per_forward", "must be >= 1")
    chosen = min(wanted, len(variants), max(1, limits.max_batch // base), room)
    if chosen < 1:
        raise ResourceExhausted(
            f"images: one variant of {base} images needs about {(fixed + per_variant) >> 20} MiB, "
            f"over the per-request memory budget of {limits.memory_bytes >> 20} MiB; send fewer "
            "or smaller images",
            reason=Reason.REQUEST_BUDGET_EXCEEDED,
            field="images",
        )
    return Plan(variants, sweep, chosen, fixed + per_variant * chosen)


def _check_counts(images: ImageSets) -> None:
    if images.source and len(images.source) not in (1, len(images.base)):
        raise InvalidArgument(
            "source_images",
            f"{len(images.source)} images; give one per image ({len(images.base)}) or one for all",
        )


def _metric(
    loaded: LoadedModel, query: InterventionQuery, has_source: bool
) -> tuple[MetricKind | None, tuple[int | None, int | None]]:
    metric = query.metric
    adapter = loaded.adapter
    if not adapter.has_classifier:
        if metric.kind is not None or query.sweep is not None:
            raise FailedPrecondition(
                f"metric: model {adapter.spec.name} has no classifier; a metric (and a sweep) "
                "needs class scores",
                reason=Reason.NO_CLASSIFIER,
                subject=adapter.spec.name,
                field="metric",
            )
        return None, (None, None)
    kind = metric.kind or (MetricKind.LOGIT_DIFFERENCE if has_source else MetricKind.KL_DIVERGENCE)
    target = None if metric.target is None else class_index(adapter, metric.target, "metric.target")
    other = None if metric.other is None else class_index(adapter, metric.other, "metric.other")
    if kind is MetricKind.LOGIT_DIFFERENCE and not has_source and (target is None or other is None):
        raise InvalidArgument(
            "metric.target",
            "a logit difference without source images needs both classes (target and other)",
            reason=Reason.FIELD_REQUIRED,
        )
    return kind, (target, other)


def _outputs(
    loaded: LoadedModel, outputs: Outputs
) -> tuple[tuple[SiteDef, ...], SiteReadout, tuple[int, ...]]:
    adapter = loaded.adapter
    if outputs.top_k < 0 or outputs.top_k > len(adapter.class_names):
        raise InvalidArgument(
            "outputs.top_k", f"{outputs.top_k}; allowed 0..{len(adapter.class_names)}"
        )
    classes = tuple(
        class_index(adapter, c, f"outputs.classes[{i}]") for i, c in enumerate(outputs.classes)
    )
    sites = tuple(
        resolve_site(adapter, name, f"outputs.sites[{i}]") for i, name in enumerate(outputs.sites)
    )
    require_unique("outputs.sites", [s.name for s in sites])
    mode = outputs.token_mode
    if mode is TokenMode.UNSPECIFIED:
        mode = TokenMode.ALL if outputs.reduction is Reduction.NONE else TokenMode.PATCHES
    _check_reduction(outputs, mode)
    readout = SiteReadout(
        mode,
        outputs.token_indices,
        outputs.positions,
        outputs.reduction,
        outputs.channels,
        outputs.top_channels,
        outputs.output_dtype,
    )
    for index, site in enumerate(sites):
        shape = loaded.site_shapes.get(site.name)
        if shape is not None:
            _check_output_site(readout, site, shape, index)
    return sites, readout, classes


# Fields the shared read-out check names, as an Intervene request's outputs spell them.
_OUTPUT_FIELDS = {"top_k": "outputs.top_channels", "sites": "outputs.sites"}


def _check_output_site(
    readout: SiteReadout, site: SiteDef, shape: tuple[int, ...], index: int
) -> None:
    """The read-out against the site's probed shape, before any forward (token indices,
    channels, top channels, reductions the layout allows), naming the outputs' fields."""
    try:
        check_site(readout, as_site_layout(site, shape), shape)
    except InvalidArgument as exc:
        field = _OUTPUT_FIELDS.get(exc.field, f"outputs.{exc.field}")
        if field == "outputs.sites":
            field = f"outputs.sites[{index}]"
        raise InvalidArgument(
            field, exc.description, reason=exc.reason, metadata=exc.metadata
        ) from None


def _check_reduction(outputs: Outputs, mode: TokenMode) -> None:
    """The reduction's own fields, as GetActivations asks for them."""
    if outputs.reduction is Reduction.TOP_CHANNELS and outputs.top_channels < 1:
        raise InvalidArgument(
            "outputs.top_channels",
            f"REDUCTION_TOP_CHANNELS needs top_channels >= 1, got {outputs.top_channels}",
        )
    if outputs.reduction is Reduction.PATCH_MAP and not outputs.channels:
        raise InvalidArgument(
            "outputs.channels",
            "REDUCTION_PATCH_MAP needs at least one channel",
            reason=Reason.FIELD_REQUIRED,
        )
    if outputs.reduction is Reduction.PATCH_MAP and mode is not TokenMode.PATCHES:
        raise InvalidArgument(
            "outputs.tokens.mode", "REDUCTION_PATCH_MAP covers the patch grid; use PATCHES"
        )


def _check_message(
    loaded: LoadedModel,
    prepared_sites: tuple[SiteDef, ...],
    outputs: Outputs,
    images: int,
    limits: InterventionLimits,
) -> None:
    """One variant's message: its logits, classes, predictions and site values."""
    classes = len(loaded.adapter.class_names) or 1
    logits = classes if outputs.logits else 0
    per_image = (logits + len(outputs.classes) + 16 * outputs.top_k + 16) * 4
    sites = sum(math.prod(loaded.site_shapes.get(s.name, (1,))[1:]) * 4 for s in prepared_sites)
    size = images * (per_image + sites)
    if size > min(limits.max_message_bytes, limits.max_result_bytes):
        raise ResourceExhausted(
            f"outputs: one variant's result takes up to {size} bytes, over the "
            f"{limits.max_message_bytes}-byte message limit; read fewer sites or tokens, or "
            "reduce them (outputs.reduction)",
            reason=Reason.RESULT_TOO_LARGE,
            field="outputs",
        )


def _resolve_variants(
    loaded: LoadedModel, plan: Plan, sets: frozenset[str]
) -> tuple[tuple[ResolvedEdit, ...], ...]:
    name = "sweep" if plan.sweep is not None else "variants"
    resolved: list[tuple[ResolvedEdit, ...]] = []
    cache: dict[Edit, ResolvedEdit] = {}  # a sweep repeats few distinct edits
    for i, variant in enumerate(plan.variants):
        edits = []
        for j, edit in enumerate(variant.edits):
            field = "sweep" if plan.sweep is not None else f"{name}[{i}].edits[{j}]"
            if edit not in cache:
                cache[edit] = resolve_edit(loaded, edit, field, sets)
            edits.append(cache[edit])
        resolved.append(tuple(edits))
    return tuple(resolved)


def _decoded(
    loaded: LoadedModel, images: ImageSets, name: str, limits: InterventionLimits
) -> torch.Tensor | None:
    """One image set preprocessed, its errors naming the set's field; None when empty."""
    given = {"images": images.base, "source_images": images.source}.get(name, images.reference)
    if not given and name != "images":
        return None
    fields = [f"{name}[{i}]" for i in range(len(given))]
    return prepare_batch(loaded.adapter, given, limits.max_batch, limits.max_pixels, fields)


def prepare_intervention(
    loaded: LoadedModel, images: ImageSets, query: InterventionQuery, limits: InterventionLimits
) -> PreparedIntervention:
    """Validation, decoding and the plan: everything before the first forward."""
    plan = plan_forwards(loaded, images, query, limits)
    _check_counts(images)
    sets = frozenset(
        name
        for name, given in (("source", images.source), ("reference", images.reference))
        if given
    )
    edits = _resolve_variants(loaded, plan, sets)
    kind, metric_classes = _metric(loaded, query, bool(images.source))
    sites, readout, classes = _outputs(loaded, query.outputs)
    _check_message(loaded, sites, query.outputs, len(images.base), limits)
    base, source, reference = (
        _decoded(loaded, images, name, limits)
        for name in ("images", "source_images", "reference_images")
    )
    assert base is not None
    effective = replace(
        query,
        sweep=plan.sweep.sweep if plan.sweep is not None else None,
        variants_per_forward=plan.variants_per_forward,
    )
    return PreparedIntervention(
        loaded,
        effective,
        plan,
        edits,
        base,
        source,
        reference,
        sites,
        readout,
        classes,
        kind,
        metric_classes,
    )
