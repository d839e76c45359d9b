"""Intervene requests built from plain values, and responses as numpy arrays."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vitscope import tensors as wire
from vitscope.selection import ClassLike, class_ref, token_selection
from vitscope.v1 import interventions_pb2 as pb

OPERATIONS = {
    "zero": pb.EDIT_OPERATION_ZERO,
    "mean": pb.EDIT_OPERATION_MEAN,
    "set": pb.EDIT_OPERATION_SET,
    "add": pb.EDIT_OPERATION_ADD,
    "scale": pb.EDIT_OPERATION_SCALE,
    "patch": pb.EDIT_OPERATION_PATCH,
}
METRICS = {
    None: pb.METRIC_KIND_UNSPECIFIED,
    "logit_difference": pb.METRIC_KIND_LOGIT_DIFFERENCE,
    "target_probability": pb.METRIC_KIND_TARGET_PROBABILITY,
    "kl": pb.METRIC_KIND_KL_DIVERGENCE,
}
METRIC_NAMES = {v: k for k, v in METRICS.items()}
# The CLI's names of the residual parts a patching sweep patches.
PARTS = {
    "residual": "out",
    "out": "out",
    "attn": "attn.out",
    "attn.out": "attn.out",
    "mlp": "mlp.out",
    "mlp.out": "mlp.out",
}


def edit(
    site: str,
    operation: str,
    *,
    tokens: str | None = None,
    indices: Sequence[int] = (),
    positions: Sequence[tuple[int, int]] = (),
    heads: Sequence[int] = (),
    channels: Sequence[int] = (),
    value: float = 0.0,
    alpha: float | None = None,
    direction: np.ndarray | None = None,
    class_row: ClassLike = None,
    factor: float | None = None,
) -> pb.Edit:
    """One edit: operation zero | mean | set | add | scale | patch at `site`, on the selected
    tokens (all by default), heads (attn.heads sites) and channels. add: alpha times
    `direction` (a vector over the site's channels) or the classifier's row `class_row`."""
    message = pb.Edit(
        site=site,
        operation=OPERATIONS[operation],
        selection=pb.EditSelection(
            tokens=token_selection(tokens, indices, positions),
            heads=list(heads),
            channels=list(channels),
        ),
        value=value,
        alpha=alpha,
        factor=factor,
    )
    if direction is not None:
        message.direction.vector.CopyFrom(wire.to_proto(np.asarray(direction, np.float32)))
    elif class_row is not None:
        message.direction.class_row.CopyFrom(class_ref(class_row))
    return message


def variant(edits: Iterable[pb.Edit], label: str = "") -> pb.Variant:
    return pb.Variant(label=label, edits=list(edits))


def metric_message(kind: str | None, target: ClassLike, other: ClassLike) -> pb.Metric:
    """kind: logit_difference | target_probability | kl, or None for the server's default."""
    return pb.Metric(kind=METRICS[kind], target=class_ref(target), other=class_ref(other))


def _array(tensor: Any) -> np.ndarray | None:
    return wire.from_proto(tensor) if tensor.ByteSize() else None


@dataclass
class VariantOutcome:
    index: int
    label: str
    metric: np.ndarray | None  # [images]
    normalized: np.ndarray | None
    logits: np.ndarray | None  # [images, outputs]
    class_logits: np.ndarray | None  # [images, classes asked for]
    predictions: list[list[dict[str, Any]]]
    sites: dict[str, np.ndarray]  # site -> its "values" tensor
    # site -> role -> tensor ("values", and "channel_indices" for top channels)
    site_tensors: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


@dataclass
class Progress:
    """Variants run so far; for a sweep, the ones just run (flat indices, row-major over the
    sweep's shape) with their metric per image ([variants, images])."""

    completed: int
    total: int
    indices: list[int] = field(default_factory=list)
    values: np.ndarray | None = None
    normalized: np.ndarray | None = None


@dataclass
class Intervention:
    """Every variant's outcome, the base and source runs' metrics, and for a sweep its
    metric shaped like the sweep (values and normalized: [images, *shape])."""

    variant_count: int = 0
    variants_per_forward: int = 0
    metric: str | None = None
    target_classes: list[int] = field(default_factory=list)
    other_classes: list[int] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)
    base_metric: np.ndarray | None = None
    source_metric: np.ndarray | None = None
    variants: list[VariantOutcome] = field(default_factory=list)
    sweep_shape: tuple[int, ...] = ()
    sweep_axes: tuple[str, ...] = ()
    sweep_blocks: tuple[int, ...] = ()
    values: np.ndarray | None = None
    normalized: np.ndarray | None = None

    @property
    def mean_values(self) -> np.ndarray | None:
        """The sweep's metric averaged over the images: shaped like the sweep."""
        return None if self.values is None else self.values.mean(axis=0)

    @property
    def mean_normalized(self) -> np.ndarray | None:
        return None if self.normalized is None else np.nanmean(self.normalized, axis=0)


def _predictions(rows: Iterable[Any]) -> list[list[dict[str, Any]]]:
    return [
        [
            {
                "class_index": p.class_index,
                "class_name": p.class_name,
                "probability": p.probability,
                "logit": p.logit,
            }
            for p in row.predictions
        ]
        for row in rows
    ]


def _variant(message: pb.VariantResult) -> VariantOutcome:
    return VariantOutcome(
        message.index,
        message.label,
        _array(message.metric),
        _array(message.normalized),
        _array(message.logits),
        _array(message.class_logits),
        _predictions(message.predictions),
        {s.site: wire.from_proto(s.tensors[0]) for s in message.sites if s.tensors},
        {
            s.site: {role: wire.from_proto(t) for role, t in zip(s.roles, s.tensors, strict=True)}
            for s in message.sites
        },
    )


def _header(result: Intervention, header: pb.InterventionHeader) -> None:
    result.variant_count = header.variant_count
    result.variants_per_forward = header.variants_per_forward
    result.metric = METRIC_NAMES.get(header.metric)
    result.target_classes = list(header.target_classes)
    result.other_classes = list(header.other_classes)
    result.class_names = list(header.class_names)
    result.base_metric = _array(header.base.metric)
    if header.HasField("source"):
        result.source_metric = _array(header.source.metric)
    result.sweep_shape = tuple(header.sweep_shape)
    result.sweep_axes = tuple(header.sweep_axes)
    result.sweep_blocks = tuple(header.sweep.blocks)


def collect(
    responses: Iterable[pb.InterveneResponse],
    on_progress: Callable[[Progress], object] | None = None,
) -> Intervention:
    result = Intervention()
    for response in responses:
        kind = response.WhichOneof("payload")
        if kind == "header":
            _header(result, response.header)
        elif kind == "variant":
            result.variants.append(_variant(response.variant))
        elif kind == "progress" and on_progress is not None:
            progress = response.progress
            on_progress(
                Progress(
                    progress.completed_count,
                    progress.total_count,
                    list(progress.variant_indices),
                    _array(progress.values),
                    _array(progress.normalized),
                )
            )
        elif kind == "sweep":
            result.values = _array(response.sweep.values)
            result.normalized = _array(response.sweep.normalized)
    return result
