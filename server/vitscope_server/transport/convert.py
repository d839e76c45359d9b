"""protobuf <-> core types. No logic beyond the mapping."""

from __future__ import annotations

from vitscope import tensors as wire
from vitscope.v1 import activations_pb2, common_pb2, models_pb2, tensor_pb2
from vitscope_server.core.activations.compute import OUTPUT_DTYPES as FLOAT_DTYPES
from vitscope_server.core.activations.compute import (
    Reduction,
    TensorDType,
)
from vitscope_server.core.model.adapters import Layout
from vitscope_server.core.model.images import ImageInput
from vitscope_server.core.model.loading import LoadedModel
from vitscope_server.core.model.provenance import Provenance
from vitscope_server.core.model.readout import Prediction
from vitscope_server.core.model.registry import ModelEntry, ModelState
from vitscope_server.core.model.sae import SaeInfo
from vitscope_server.core.model.sites import sae_sites
from vitscope_server.core.model.tokens import TokenMode, as_site_layout
from vitscope_server.core.runtime.errors import InvalidArgument
from vitscope_server.transport.enums import core_to_wire, enum_value, wire_to_core

# One token selection for every RPC that selects tokens.
TOKEN_MODES = wire_to_core(common_pb2.TokenSelectionMode, TokenMode)
TOKEN_MODES_BACK = core_to_wire(common_pb2.TokenSelectionMode, TokenMode)
REDUCTIONS = wire_to_core(activations_pb2.Reduction, Reduction, unspecified=Reduction.NONE)
REDUCTIONS_BACK = core_to_wire(activations_pb2.Reduction, Reduction)
OUTPUT_DTYPES = wire_to_core(
    tensor_pb2.Dtype, TensorDType, unspecified=TensorDType.FLOAT32, only=FLOAT_DTYPES
)
WIRE_DTYPES = core_to_wire(tensor_pb2.Dtype, TensorDType)
LAYOUTS = core_to_wire(models_pb2.SiteLayout, Layout)
_STATES = core_to_wire(models_pb2.ModelState, ModelState)


def tensor_array(proto: tensor_pb2.Tensor, field: str) -> wire.np.ndarray:
    try:
        return wire.from_proto(proto)
    except wire.TensorDecodeError as exc:
        raise InvalidArgument(field, str(exc)) from None


def image_inputs(images: list[common_pb2.Image]) -> list[ImageInput]:
    inputs = []
    for index, image in enumerate(images):
        source = image.WhichOneof("source")
        field = f"images[{index}].{source}"
        if source == "encoded":
            inputs.append(ImageInput(encoded=image.encoded))
        elif source == "pixels":
            inputs.append(ImageInput(pixels=tensor_array(image.pixels, field)))
        elif source == "preprocessed":
            inputs.append(ImageInput(preprocessed=tensor_array(image.preprocessed, field)))
        else:
            inputs.append(ImageInput())
    return inputs


def token_mode(tokens: common_pb2.TokenSelection) -> TokenMode:
    return enum_value(TOKEN_MODES, tokens.mode, "tokens.mode", common_pb2.TokenSelectionMode)


def provenance(p: Provenance) -> common_pb2.Provenance:
    return common_pb2.Provenance(
        model=p.model,
        weights_identity=p.weights_identity,
        library_versions=p.libraries,
        device=p.device,
        seed=p.seed,
    )


def model_summary(entry: ModelEntry, default: str) -> models_pb2.ModelSummary:
    return models_pb2.ModelSummary(
        name=entry.spec.name,
        family=entry.spec.family,
        architecture=entry.spec.architecture,
        state=_STATES[entry.state],
        error=entry.error,
        weights_identity=entry.loaded.weights_identity if entry.loaded else "",
        is_default=entry.spec.name == default,
        load_seconds=entry.load_seconds,
    )


def describe(
    entry: ModelEntry, loaded: LoadedModel, default: str, p: Provenance
) -> models_pb2.DescribeModelResponse:
    adapter = loaded.adapter
    config = adapter.data_config
    sites = []
    for site in [*adapter.canonical_sites(), *sae_sites(adapter)]:
        shape = loaded.site_shapes.get(site.name, ())
        sites.append(
            models_pb2.SiteInfo(
                name=site.name,
                module_path=site.module_path,
                layout=LAYOUTS[as_site_layout(site, shape).layout],
                shape=list(shape),
                prefix_token_count=site.num_prefix_tokens,
                grid_height=site.grid[0],
                grid_width=site.grid[1],
            )
        )
    return models_pb2.DescribeModelResponse(
        summary=model_summary(entry, default),
        block_count=len(adapter.blocks),
        embed_dim=adapter.embed_dim,
        prefix_token_count=adapter.num_prefix_tokens,
        grid_height=adapter.grid[0],
        grid_width=adapter.grid[1],
        preprocessing=models_pb2.Preprocessing(
            input_size=list(config.input_size),
            mean=list(config.mean),
            std=list(config.std),
            interpolation=config.interpolation,
            crop_pct=config.crop_pct,
        ),
        sites=sites,
        class_names=adapter.class_names,
        class_count=len(adapter.class_names),
        provenance=provenance(p),
        unavailable_sites=[
            models_pb2.UnavailableSite(site=u.site, reason=u.reason)
            for u in adapter.unavailable_sites
        ],
        saes=[sae_info(sae.info) for sae in adapter.saes.values()],
    )


def sae_info(info: SaeInfo) -> models_pb2.SaeInfo:
    return models_pb2.SaeInfo(
        name=info.name,
        site=info.site,
        input_width=info.d_in,
        width=info.d_sae,
        kind=info.kind.value,
        k=info.k,
        trained_as=info.trained_as,
        metrics=info.metrics,
    )


def image_predictions(rows: list[list[Prediction]]) -> list[activations_pb2.ImagePredictions]:
    return [
        activations_pb2.ImagePredictions(
            predictions=[
                common_pb2.Prediction(
                    class_index=p.class_index,
                    class_name=p.class_name,
                    probability=p.probability,
                    logit=p.logit,
                )
                for p in row
            ]
        )
        for row in rows
    ]
