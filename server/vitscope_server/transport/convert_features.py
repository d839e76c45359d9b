"""protobuf <-> core types for OptimizeFeatures."""

from __future__ import annotations

import numpy as np

from vitscope import tensors as wire
from vitscope.v1 import features_pb2 as fpb
from vitscope_server.core.features.optimize import (
    ADAM_BETAS,
    ADAM_EPS,
    SCHEDULE_DETAILS,
    FeatureSpec,
    Objective,
    OptimizationParams,
    OptimizationResult,
    Optimizer,
    Progress,
    Schedule,
)
from vitscope_server.core.features.parameterization import DETAILS, Parameterization
from vitscope_server.transport.convert import provenance, tensor_array
from vitscope_server.transport.enums import core_to_wire, enum_value, wire_to_core
from vitscope_server.transport.png import png

_OBJECTIVES = wire_to_core(fpb.FeatureObjective, Objective, unspecified=Objective.PATCH_MEAN)
_OBJECTIVES_BACK = core_to_wire(fpb.FeatureObjective, Objective)
_PARAMETERIZATIONS = wire_to_core(
    fpb.ImageParameterization, Parameterization, unspecified=Parameterization.PIXEL
)
_PARAMETERIZATIONS_BACK = core_to_wire(fpb.ImageParameterization, Parameterization)
_SCHEDULES = wire_to_core(fpb.LearningRateSchedule, Schedule, unspecified=Schedule.COSINE)
_SCHEDULES_BACK = core_to_wire(fpb.LearningRateSchedule, Schedule)
_OPTIMIZERS = wire_to_core(fpb.FeatureOptimizer, Optimizer, unspecified=Optimizer.ADAM)
_OPTIMIZERS_BACK = core_to_wire(fpb.FeatureOptimizer, Optimizer)


def feature_specs(request: fpb.OptimizeFeaturesRequest) -> list[FeatureSpec]:
    specs = []
    for index, feature in enumerate(request.features):
        field = f"features[{index}]"
        # Kept as decoded: the core checks its length against the site before converting it.
        direction = (
            tensor_array(feature.direction, f"{field}.direction")
            if feature.HasField("direction")
            else None
        )
        specs.append(
            FeatureSpec(
                site=feature.site,
                channel=feature.channel,
                objective=enum_value(
                    _OBJECTIVES, feature.objective, f"{field}.objective", fpb.FeatureObjective
                ),
                token_index=feature.token_index,
                direction=direction,
                class_index=feature.class_index,
            )
        )
    return specs


def optimization_params(request: fpb.OptimizeFeaturesRequest) -> OptimizationParams:
    p = request.parameters
    return OptimizationParams(
        steps=p.steps if p.HasField("steps") else None,
        learning_rate=p.learning_rate if p.HasField("learning_rate") else None,
        tv_weight=p.tv_weight if p.HasField("tv_weight") else None,
        copies=p.copies if p.HasField("copies") else None,
        jitter=p.jitter if p.HasField("jitter") else None,
        image_size=p.image_size if p.HasField("image_size") else None,
        seed=request.seed,
        progress_every=request.progress_every,
        preview=request.preview,
        parameterization=enum_value(
            _PARAMETERIZATIONS,
            p.parameterization,
            "parameters.parameterization",
            fpb.ImageParameterization,
        ),
        schedule=enum_value(
            _SCHEDULES, p.schedule, "parameters.schedule", fpb.LearningRateSchedule
        ),
        optimizer=enum_value(
            _OPTIMIZERS, p.optimizer, "parameters.optimizer", fpb.FeatureOptimizer
        ),
    )


def _feature(spec: FeatureSpec) -> fpb.Feature:
    message = fpb.Feature(
        site=spec.site,
        channel=spec.channel,
        objective=_OBJECTIVES_BACK[spec.objective],
        token_index=spec.token_index,
        class_index=spec.class_index,
    )
    if spec.direction is not None:
        direction = np.asarray(spec.direction, dtype=np.float32).reshape(-1)
        message.direction.CopyFrom(wire.to_proto(direction))
    return message


def optimization_response(event: Progress | OptimizationResult) -> fpb.OptimizeFeaturesResponse:
    if isinstance(event, Progress):
        return fpb.OptimizeFeaturesResponse(
            progress=fpb.OptimizationProgress(
                step=event.step,
                loss=event.loss,
                objectives=event.objectives,
                preview_pngs=[png(i) for i in event.images] if event.images is not None else [],
            )
        )
    p = event.params
    return fpb.OptimizeFeaturesResponse(
        result=fpb.OptimizationResult(
            provenance=provenance(event.provenance),
            parameters=fpb.EffectiveOptimizationParameters(
                steps=p.steps,
                learning_rate=p.learning_rate,
                tv_weight=p.tv_weight,
                copies=p.copies,
                jitter=p.jitter,
                image_size=p.image_size,
                adam_beta1=ADAM_BETAS[0],
                adam_beta2=ADAM_BETAS[1],
                adam_eps=ADAM_EPS,
                parameterization_detail=DETAILS[p.parameterization],
                schedule_detail=SCHEDULE_DETAILS[p.schedule],
                parameterization=_PARAMETERIZATIONS_BACK[p.parameterization],
                schedule=_SCHEDULES_BACK[p.schedule],
                optimizer=_OPTIMIZERS_BACK[p.optimizer],
                progress_every=p.progress_every,
                preview=p.preview,
                features=[_feature(f.feature) for f in event.features],
            ),
            features=[
                fpb.OptimizedFeature(
                    feature=_feature(f.feature),
                    png=png(f.image),
                    objective=f.objective,
                    patch_map=wire.to_proto(f.patch_map) if f.patch_map is not None else None,
                )
                for f in event.features
            ],
        )
    )
