"""Feature visualization results on the client: dataclasses and their parsing (no torch)."""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from google.protobuf.json_format import MessageToDict
from PIL import Image

from vitscope import tensors as wire
from vitscope.enums import short_names
from vitscope.v1 import features_pb2 as fpb

Value = TypeVar("Value")

OBJECTIVES = short_names(fpb.FeatureObjective)

PARAMETERIZATIONS = short_names(fpb.ImageParameterization)
SCHEDULES = short_names(fpb.LearningRateSchedule)
OPTIMIZERS = short_names(fpb.FeatureOptimizer)


def choice(options: Mapping[str, Value], name: str | None, field: str, unset: Value) -> Value:
    """The wire value of a named choice; `unset` (the server's default) for None."""
    if name is None:
        return unset
    if name not in options:
        raise ValueError(f"{field}: {name!r} is not one of {', '.join(options)}")
    return options[name]


@dataclass(frozen=True)
class Feature:
    """A site and channel, with the objective read from them (the paper's: patch_mean)."""

    site: str = ""
    channel: int = 0
    objective: str = "patch_mean"
    token_index: int = 0
    direction: np.ndarray | None = None
    class_index: int = 0

    def message(self) -> fpb.Feature:
        proto = fpb.Feature(
            site=self.site,
            channel=self.channel,
            objective=OBJECTIVES[self.objective],
            token_index=self.token_index,
            class_index=self.class_index,
        )
        if self.direction is not None:
            proto.direction.CopyFrom(wire.to_proto(np.asarray(self.direction, dtype=np.float32)))
        return proto


def _image(png: bytes) -> Image.Image:
    return Image.open(io.BytesIO(png)).convert("RGB")


@dataclass(frozen=True)
class OptimizationProgress:
    step: int
    loss: float
    objectives: list[float]
    previews: list[Image.Image]


@dataclass(frozen=True)
class OptimizedFeature:
    site: str
    channel: int
    objective_kind: str
    image: Image.Image
    png: bytes
    objective: float
    patch_map: np.ndarray | None


@dataclass(frozen=True)
class OptimizationResult:
    features: list[OptimizedFeature]
    provenance: dict[str, Any]
    parameters: dict[str, Any]


def parse_progress(message: fpb.OptimizationProgress) -> OptimizationProgress:
    return OptimizationProgress(
        step=message.step,
        loss=message.loss,
        objectives=list(message.objectives),
        previews=[_image(p) for p in message.preview_pngs],
    )


def parse_result(message: fpb.OptimizationResult) -> OptimizationResult:
    features = []
    for f in message.features:
        features.append(
            OptimizedFeature(
                site=f.feature.site,
                channel=f.feature.channel,
                objective_kind=fpb.FeatureObjective.Name(f.feature.objective)
                .removeprefix("FEATURE_OBJECTIVE_")
                .lower(),
                image=_image(f.png),
                png=f.png,
                objective=f.objective,
                patch_map=wire.from_proto(f.patch_map) if f.HasField("patch_map") else None,
            )
        )
    return OptimizationResult(
        features=features,
        provenance=MessageToDict(message.provenance, preserving_proto_field_name=True),
        parameters=MessageToDict(message.parameters, preserving_proto_field_name=True),
    )
