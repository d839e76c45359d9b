"""Invert and ListInverters results on the client side (numpy + PIL, no torch)."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from google.protobuf.json_format import MessageToDict
from PIL import Image

from vitscope import tensors as wire
from vitscope.enums import short_names
from vitscope.v1 import inversion_pb2 as pb

METHODS = short_names(pb.InversionMethod)


@dataclass(frozen=True)
class InverterModule:
    name: str
    kind: str
    best_val_mse: float
    best_epoch: int
    epochs: int
    parameters: int


@dataclass(frozen=True)
class Inverter:
    """A trained inverter of one model: its modules and how they were trained."""

    model: str
    architecture: str
    weights_identity: str
    store: str
    data: str
    max_depth: int
    modules: list[InverterModule]


@dataclass(frozen=True)
class InversionProgress:
    depth: int
    step: int
    total_steps: int
    loss: float
    representation_distance: float


@dataclass(frozen=True)
class DepthReconstruction:
    """Reconstructions of every image from one depth; mse/psnr are None without originals."""

    depth: int
    site: str
    images: list[Image.Image]
    mse: list[float] | None
    psnr: list[float] | None
    representation_distance: list[float]

    def pixels(self) -> np.ndarray:
        """[batch, H, W, 3] float32 in [0, 1]."""
        return np.stack([np.asarray(i, dtype=np.float32) / 255.0 for i in self.images])


@dataclass(frozen=True)
class Inversion:
    reconstructions: dict[int, DepthReconstruction]
    provenance: dict[str, Any]
    parameters: dict[str, Any]
    progress: list[InversionProgress] = field(default_factory=list)

    def __getitem__(self, depth: int) -> DepthReconstruction:
        return self.reconstructions[depth]


def inverter(info: pb.InverterInfo) -> Inverter:
    return Inverter(
        model=info.model,
        architecture=info.architecture,
        weights_identity=info.weights_identity,
        store=info.store,
        data=info.data,
        max_depth=info.max_depth,
        modules=[
            InverterModule(
                m.name, m.kind, m.best_val_mse, m.best_epoch, m.epochs, m.parameter_count
            )
            for m in info.modules
        ],
    )


def optimization_message(
    steps: int | None,
    learning_rate: float | None,
    tv_weight: float | None,
    seed: int,
    progress_every: int | None,
) -> pb.InversionOptimization:
    """Settings left at None stay unset, so the server applies its defaults."""
    return pb.InversionOptimization(
        steps=steps,
        learning_rate=learning_rate,
        tv_weight=tv_weight,
        seed=seed,
        progress_every=progress_every,
    )


def representation_message(values: np.ndarray, depth: int) -> pb.RepresentationAtDepth:
    return pb.RepresentationAtDepth(values=wire.to_proto(values), depth=depth)


def collect(
    responses: Iterable[pb.InvertResponse],
    on_progress: Callable[[InversionProgress], None] | None = None,
) -> Inversion:
    """Gathers a stream into one result; progress also goes to on_progress as it arrives."""
    header: pb.InversionHeader | None = None
    progress: list[InversionProgress] = []
    parts: dict[int, dict[int, pb.Reconstruction]] = {}
    for response in responses:
        kind = response.WhichOneof("payload")
        if kind == "header":
            header = response.header
        elif kind == "progress":
            p = response.progress
            step = InversionProgress(
                p.depth, p.step, p.total_steps, p.loss, p.representation_distance
            )
            progress.append(step)
            if on_progress is not None:
                on_progress(step)
        elif kind == "reconstruction":
            r = response.reconstruction
            parts.setdefault(r.depth, {})[r.image_index] = r
    if header is None:
        raise wire.TensorDecodeError("the stream ended without a header")
    reconstructions = {}
    for depth, by_index in parts.items():
        ordered = [by_index[i] for i in sorted(by_index)]
        scored = all(r.HasField("mse") for r in ordered)
        reconstructions[depth] = DepthReconstruction(
            depth=depth,
            site=ordered[0].site,
            images=[Image.open(io.BytesIO(r.png)).convert("RGB") for r in ordered],
            mse=[r.mse for r in ordered] if scored else None,
            psnr=[r.psnr for r in ordered] if scored else None,
            representation_distance=[r.representation_distance for r in ordered],
        )
    return Inversion(
        reconstructions=reconstructions,
        provenance=MessageToDict(header.provenance, preserving_proto_field_name=True),
        parameters=MessageToDict(header.parameters, preserving_proto_field_name=True),
        progress=progress,
    )
