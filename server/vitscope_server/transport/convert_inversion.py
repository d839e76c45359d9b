"""protobuf <-> core types for Invert and ListInverters. No logic beyond the mapping."""

from __future__ import annotations

import numpy as np

from vitscope.v1 import inversion_pb2 as pb
from vitscope_server.core.inversion.invert import (
    Event,
    InvertHeader,
    InvertQuery,
    Method,
    OptimizationParams,
    Progress,
    Reconstruction,
)
from vitscope_server.core.inversion.modules import depth_site
from vitscope_server.core.inversion.store import Manifest
from vitscope_server.transport.convert import provenance, tensor_array
from vitscope_server.transport.enums import core_to_wire, enum_value, wire_to_core
from vitscope_server.transport.png import png

_METHODS = wire_to_core(pb.InversionMethod, Method)
_METHODS_BACK = core_to_wire(pb.InversionMethod, Method)
_DEFAULTS = OptimizationParams()


def invert_query(request: pb.InvertRequest) -> InvertQuery:
    """Unset optimization fields take the defaults; set ones are kept for the core to check."""
    o = request.optimization
    return InvertQuery(
        method=enum_value(_METHODS, request.method, "method", pb.InversionMethod),
        depths=tuple(request.depths),
        optimization=OptimizationParams(
            steps=o.steps if o.HasField("steps") else _DEFAULTS.steps,
            learning_rate=(
                o.learning_rate if o.HasField("learning_rate") else _DEFAULTS.learning_rate
            ),
            tv_weight=o.tv_weight if o.HasField("tv_weight") else _DEFAULTS.tv_weight,
            seed=o.seed,
            progress_every=(
                o.progress_every if o.HasField("progress_every") else _DEFAULTS.progress_every
            ),
        ),
    )


def representation(request: pb.InvertRequest) -> tuple[np.ndarray, int] | None:
    if not request.HasField("representation"):
        return None
    r = request.representation
    return tensor_array(r.values, "representation.values"), r.depth


def inverter_info(manifest: Manifest) -> pb.InverterInfo:
    return pb.InverterInfo(
        model=manifest.model,
        architecture=manifest.architecture,
        weights_identity=manifest.weights_identity,
        store=manifest.path.name,
        data=manifest.data,
        max_depth=manifest.max_depth,
        modules=[
            pb.InverterModuleInfo(
                name=record.name,
                kind=record.kind,
                best_val_mse=record.best_val_mse,
                best_epoch=int(record.meta.get("best_epoch", 0)),
                epochs=int(record.meta.get("recipe", {}).get("epochs", 0)),
                parameter_count=int(record.meta.get("parameters", 0)),
            )
            for _, record in sorted(manifest.modules.items())
        ],
    )


def _header(header: InvertHeader) -> pb.InvertResponse:
    q = header.query
    o = q.optimization
    parameters = pb.EffectiveInversionParameters(
        method=_METHODS_BACK[q.method],
        depths=list(q.depths),
        sites=[depth_site(d) for d in q.depths],
        batch_size=header.batch_size,
        from_representation=header.from_representation,
    )
    if q.method is Method.OPTIMIZATION:
        parameters.optimization.CopyFrom(
            pb.InversionOptimization(
                steps=o.steps,
                learning_rate=o.learning_rate,
                tv_weight=o.tv_weight,
                seed=o.seed,
                progress_every=o.progress_every,
            )
        )
    if header.inverter is not None:
        parameters.inverter.CopyFrom(inverter_info(header.inverter))
    return pb.InvertResponse(
        header=pb.InversionHeader(provenance=provenance(header.provenance), parameters=parameters)
    )


def invert_responses(event: Event) -> list[pb.InvertResponse]:
    if isinstance(event, InvertHeader):
        return [_header(event)]
    if isinstance(event, Progress):
        return [
            pb.InvertResponse(
                progress=pb.InversionProgress(
                    depth=event.depth,
                    step=event.step,
                    total_steps=event.total_steps,
                    loss=event.loss,
                    representation_distance=event.representation_distance,
                )
            )
        ]
    return [_reconstruction(event, index) for index in range(len(event.images))]


def _reconstruction(event: Reconstruction, index: int) -> pb.InvertResponse:
    message = pb.Reconstruction(
        depth=event.depth,
        site=event.site,
        image_index=index,
        png=png(event.images[index]),
        representation_distance=event.representation_distance[index],
    )
    if event.mse is not None and event.psnr is not None:
        message.mse = event.mse[index]
        message.psnr = event.psnr[index]
    return pb.InvertResponse(reconstruction=message)
