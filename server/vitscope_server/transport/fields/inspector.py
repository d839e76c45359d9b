"""Declarations of vitscope.v1's request fields: what each allows before the core sees it.

Bounds that depend on the model (a channel below the site's width, a block below its depth)
or on the server's settings (max_batch) are the core's to check; these are the bounds that
hold on every model, so that no value past them reaches a decode or a forward.
"""

from __future__ import annotations

from vitscope_server.core.activations.top_images import MAX_TOP_K
from vitscope_server.core.explain.query import MAX_STEPS as EXPLAIN_MAX_STEPS
from vitscope_server.core.features.optimize import MAX_COPIES, MAX_IMAGE_SIZE, MIN_IMAGE_SIZE
from vitscope_server.core.features.optimize import MAX_STEPS as FEATURE_MAX_STEPS
from vitscope_server.core.inversion.invert import MAX_STEPS as INVERSION_MAX_STEPS
from vitscope_server.core.model.class_importance import MAX_KEEP_COUNTS
from vitscope_server.core.model.class_space import MAX_CLASS_NAMES, MAX_TEMPLATES
from vitscope_server.core.runtime.blur import MAX_BLUR_SIGMA
from vitscope_server.core.runtime.divergence import MAX_LEARNING_RATE, MAX_TV_WEIGHT
from vitscope_server.transport.fields.grammars import FOLDER, MODEL_NAME, SAE_NAME, SITE
from vitscope_server.transport.fields.rules import (
    Defined,
    Nested,
    Range,
    Repeated,
    Rule,
    Text,
    Unchecked,
)

INT32_MAX = 2**31 - 1
MAX_EDIT_VALUE = 1e9
MAX_IMAGES = 1 << 16
"""Images one message may carry; the server's max_batch is usually far lower."""
MAX_LIST = 1 << 16
"""Entries of a list of indices (channels, tokens, positions, blocks, depths)."""
_INDEX = Range(0, INT32_MAX)


def _below(what: str) -> Range:
    """An index the model bounds: 0 up to one less than `what`."""
    return Range(0, INT32_MAX, high_text=f"{what} - 1")


def _up_to(what: str) -> Range:
    """A count the model or the server bounds: 1 up to `what`."""
    return Range(1, INT32_MAX, high_text=what)


_CHANNEL = _below("the site's channels")
_TOKEN = _below("the site's tokens")
_CLASS = _below("the model's classes")
_MODEL = Text(256, MODEL_NAME)
_SITE = Text(256, SITE)
_NAME = Text(1000)
_SEED = Unchecked("any uint64")
_FLAG = Unchecked("true or false")
_ENUM = Defined()
_IMAGES = Repeated(Nested(), MAX_IMAGES)
_BLUR_SIGMA = Range(0.0, MAX_BLUR_SIGMA, low_open=True)
_LEARNING_RATE = Range(0.0, MAX_LEARNING_RATE, low_open=True)
_TV_WEIGHT = Range(0.0, MAX_TV_WEIGHT)
_LABEL_SET_FIELDS: dict[str, Rule] = {
    "vitscope.v1.LabelSet.class_names": Repeated(_NAME, MAX_CLASS_NAMES),
    "vitscope.v1.LabelSet.templates": Repeated(_NAME, MAX_TEMPLATES),
}

_SHARED: dict[str, Rule] = {
    "vitscope.v1.Image.encoded": Unchecked("PNG, JPEG or WebP bytes (sized before decoding)"),
    "vitscope.v1.Image.pixels": Nested(),
    "vitscope.v1.Image.preprocessed": Nested(),
    "vitscope.v1.Tensor.dtype": _ENUM,
    "vitscope.v1.Tensor.shape": Repeated(_INDEX, 8),
    "vitscope.v1.Tensor.data": Unchecked("bytes matching dtype and shape"),
    "vitscope.v1.TokenSelection.mode": _ENUM,
    "vitscope.v1.TokenSelection.indices": Repeated(_TOKEN, MAX_LIST),
    "vitscope.v1.TokenSelection.positions": Repeated(Nested(), MAX_LIST),
    "vitscope.v1.PatchPosition.row": _below("the grid's height"),
    "vitscope.v1.PatchPosition.col": _below("the grid's width"),
    "vitscope.v1.ClassRef.index": _CLASS,
    "vitscope.v1.ClassRef.name": _NAME,
    **_LABEL_SET_FIELDS,
}

_MODELS: dict[str, Rule] = {
    "vitscope.v1.DescribeModelRequest.model": _MODEL,
    "vitscope.v1.ListInvertersRequest.model": _MODEL,
}

_ACTIVATIONS: dict[str, Rule] = {
    "vitscope.v1.GetActivationsRequest.model": _MODEL,
    "vitscope.v1.GetActivationsRequest.images": _IMAGES,
    "vitscope.v1.GetActivationsRequest.sites": Repeated(_SITE, 256),
    "vitscope.v1.GetActivationsRequest.tokens": Nested(),
    "vitscope.v1.GetActivationsRequest.reduction": _ENUM,
    "vitscope.v1.GetActivationsRequest.channels": Repeated(_CHANNEL, MAX_LIST),
    "vitscope.v1.GetActivationsRequest.top_k": _up_to("the site's channels"),
    "vitscope.v1.GetActivationsRequest.output_dtype": _ENUM,
    "vitscope.v1.GetActivationsRequest.top_predictions": _up_to("the model's classes"),
    "vitscope.v1.GetActivationsRequest.compute_dtype": _ENUM,
    "vitscope.v1.TopActivatingImagesRequest.model": _MODEL,
    "vitscope.v1.TopActivatingImagesRequest.site": _SITE,
    "vitscope.v1.TopActivatingImagesRequest.channels": Repeated(_CHANNEL, MAX_LIST),
    "vitscope.v1.TopActivatingImagesRequest.top_k": Range(1, MAX_TOP_K),
    "vitscope.v1.TopActivatingImagesRequest.image_folder": Text(4096, FOLDER),
    "vitscope.v1.TopActivatingImagesRequest.images": _IMAGES,
}

_FEATURES: dict[str, Rule] = {
    "vitscope.v1.OptimizeFeaturesRequest.model": _MODEL,
    "vitscope.v1.OptimizeFeaturesRequest.features": Repeated(Nested(), 256),
    "vitscope.v1.OptimizeFeaturesRequest.parameters": Nested(),
    "vitscope.v1.OptimizeFeaturesRequest.seed": _SEED,
    "vitscope.v1.OptimizeFeaturesRequest.progress_every": Range(0, FEATURE_MAX_STEPS),
    "vitscope.v1.OptimizeFeaturesRequest.preview": _FLAG,
    "vitscope.v1.Feature.site": _SITE,
    "vitscope.v1.Feature.channel": _CHANNEL,
    "vitscope.v1.Feature.objective": _ENUM,
    "vitscope.v1.Feature.token_index": _TOKEN,
    "vitscope.v1.Feature.direction": Nested(),
    "vitscope.v1.Feature.class_index": _CLASS,
    "vitscope.v1.OptimizationParameters.steps": Range(1, FEATURE_MAX_STEPS),
    "vitscope.v1.OptimizationParameters.learning_rate": _LEARNING_RATE,
    "vitscope.v1.OptimizationParameters.tv_weight": _TV_WEIGHT,
    "vitscope.v1.OptimizationParameters.copies": Range(1, MAX_COPIES),
    "vitscope.v1.OptimizationParameters.jitter": Range(0, MAX_IMAGE_SIZE - 1),
    "vitscope.v1.OptimizationParameters.image_size": Range(MIN_IMAGE_SIZE, MAX_IMAGE_SIZE),
    "vitscope.v1.OptimizationParameters.parameterization": _ENUM,
    "vitscope.v1.OptimizationParameters.schedule": _ENUM,
    "vitscope.v1.OptimizationParameters.optimizer": _ENUM,
}

_PROJECTION: dict[str, Rule] = {
    "vitscope.v1.ProjectToClassSpaceRequest.model": _MODEL,
    "vitscope.v1.ProjectToClassSpaceRequest.images": _IMAGES,
    "vitscope.v1.ProjectToClassSpaceRequest.targets": Repeated(Nested(), MAX_IMAGES),
    "vitscope.v1.ProjectToClassSpaceRequest.representations": Repeated(_ENUM, 16),
    "vitscope.v1.ProjectToClassSpaceRequest.blocks": Repeated(_below("the model's blocks"), 4096),
    "vitscope.v1.ProjectToClassSpaceRequest.tokens": Nested(),
    "vitscope.v1.ProjectToClassSpaceRequest.top_k": _up_to("the classes"),
    "vitscope.v1.ProjectToClassSpaceRequest.importance_maps": _FLAG,
    "vitscope.v1.ProjectToClassSpaceRequest.labels": Nested(),
    "vitscope.v1.ProjectToClassSpaceRequest.evaluate_importance": _FLAG,
    "vitscope.v1.ProjectToClassSpaceRequest.keep_counts": Repeated(
        Range(0, INT32_MAX, high_text="the patches"), MAX_KEEP_COUNTS
    ),
    "vitscope.v1.ProjectToClassSpaceRequest.evaluation_seed": _SEED,
    "vitscope.v1.ProjectMemoriesRequest.model": _MODEL,
    "vitscope.v1.ProjectMemoriesRequest.block": _below("the model's blocks"),
    "vitscope.v1.ProjectMemoriesRequest.kinds": Repeated(_ENUM, 16),
    "vitscope.v1.ProjectMemoriesRequest.top_k": _up_to("the classes"),
    "vitscope.v1.ProjectMemoriesRequest.cosine": _FLAG,
    "vitscope.v1.ProjectMemoriesRequest.images": _IMAGES,
    "vitscope.v1.ProjectMemoriesRequest.targets": Repeated(Nested(), MAX_IMAGES),
    "vitscope.v1.ProjectMemoriesRequest.labels": Nested(),
}

_INVERSION: dict[str, Rule] = {
    "vitscope.v1.InvertRequest.model": _MODEL,
    "vitscope.v1.InvertRequest.method": _ENUM,
    "vitscope.v1.InvertRequest.images": _IMAGES,
    "vitscope.v1.InvertRequest.depths": Repeated(
        Range(0, INT32_MAX, high_text="the model's blocks"), 4096
    ),
    "vitscope.v1.InvertRequest.representation": Nested(),
    "vitscope.v1.InvertRequest.optimization": Nested(),
    "vitscope.v1.RepresentationAtDepth.values": Nested(),
    "vitscope.v1.RepresentationAtDepth.depth": Range(0, INT32_MAX, high_text="the model's blocks"),
    "vitscope.v1.InversionOptimization.steps": Range(1, INVERSION_MAX_STEPS),
    "vitscope.v1.InversionOptimization.learning_rate": _LEARNING_RATE,
    "vitscope.v1.InversionOptimization.tv_weight": _TV_WEIGHT,
    "vitscope.v1.InversionOptimization.seed": _SEED,
    "vitscope.v1.InversionOptimization.progress_every": Range(1, INT32_MAX),
}

_EXPLAIN: dict[str, Rule] = {
    "vitscope.v1.ExplainRequest.model": _MODEL,
    "vitscope.v1.ExplainRequest.images": _IMAGES,
    "vitscope.v1.ExplainRequest.targets": Repeated(Nested(), MAX_IMAGES),
    "vitscope.v1.ExplainRequest.methods": Repeated(Nested(), 16),
    "vitscope.v1.ExplainRequest.labels": Nested(),
    "vitscope.v1.ExplainRequest.faithfulness": Nested(),
    "vitscope.v1.ExplanationTarget.class_ref": Nested(),
    "vitscope.v1.ExplanationTarget.prompt": _NAME,
    "vitscope.v1.ExplanationMethodRequest.method": _ENUM,
    "vitscope.v1.ExplanationMethodRequest.rollout": Nested(),
    "vitscope.v1.ExplanationMethodRequest.integrated_gradients": Nested(),
    "vitscope.v1.ExplanationMethodRequest.feature_map": Nested(),
    "vitscope.v1.RolloutParameters.head_fusion": _ENUM,
    "vitscope.v1.IntegratedGradientsParameters.steps": Range(1, EXPLAIN_MAX_STEPS),
    "vitscope.v1.IntegratedGradientsParameters.baseline": _ENUM,
    "vitscope.v1.IntegratedGradientsParameters.batch_size": _up_to("max_batch"),
    "vitscope.v1.IntegratedGradientsParameters.blur_sigma": _BLUR_SIGMA,
    "vitscope.v1.IntegratedGradientsParameters.seed": _SEED,
    "vitscope.v1.FeatureMapParameters.site": _SITE,
    "vitscope.v1.FeatureMapParameters.channel": _CHANNEL,
    "vitscope.v1.FaithfulnessParameters.patches_per_step": _up_to("the model's patches"),
    "vitscope.v1.FaithfulnessParameters.blur_sigma": _BLUR_SIGMA,
    "vitscope.v1.FaithfulnessParameters.seed": _SEED,
}

# Edit values: finite, and small enough that a site times them stays finite in float32.
_EDIT_VALUE = Range(-MAX_EDIT_VALUE, MAX_EDIT_VALUE)

_INTERVENTIONS: dict[str, Rule] = {
    "vitscope.v1.InterveneRequest.model": _MODEL,
    "vitscope.v1.InterveneRequest.images": _IMAGES,
    "vitscope.v1.InterveneRequest.source_images": _IMAGES,
    "vitscope.v1.InterveneRequest.reference_images": _IMAGES,
    "vitscope.v1.InterveneRequest.variants": Repeated(Nested(), MAX_LIST),
    "vitscope.v1.InterveneRequest.sweep": Nested(),
    "vitscope.v1.InterveneRequest.metric": Nested(),
    "vitscope.v1.InterveneRequest.outputs": Nested(),
    "vitscope.v1.InterveneRequest.variants_per_forward": Range(1, INT32_MAX),
    "vitscope.v1.Variant.label": _NAME,
    "vitscope.v1.Variant.edits": Repeated(Nested(), 256),
    "vitscope.v1.Edit.site": _SITE,
    "vitscope.v1.Edit.operation": _ENUM,
    "vitscope.v1.Edit.selection": Nested(),
    "vitscope.v1.Edit.value": _EDIT_VALUE,
    "vitscope.v1.Edit.alpha": _EDIT_VALUE,
    "vitscope.v1.Edit.direction": Nested(),
    "vitscope.v1.Edit.factor": _EDIT_VALUE,
    "vitscope.v1.EditSelection.tokens": Nested(),
    "vitscope.v1.EditSelection.heads": Repeated(_below("the block's heads"), MAX_LIST),
    "vitscope.v1.EditSelection.channels": Repeated(_CHANNEL, MAX_LIST),
    "vitscope.v1.Direction.vector": Nested(),
    "vitscope.v1.Direction.class_row": Nested(),
    "vitscope.v1.Sweep.kind": _ENUM,
    "vitscope.v1.Sweep.part": Text(64),
    "vitscope.v1.Sweep.operation": _ENUM,
    "vitscope.v1.Sweep.blocks": Repeated(_below("the model's blocks"), 4096),
    "vitscope.v1.Metric.kind": _ENUM,
    "vitscope.v1.Metric.target": Nested(),
    "vitscope.v1.Metric.other": Nested(),
    "vitscope.v1.InterventionOutputs.top_k": _up_to("the model's classes"),
    "vitscope.v1.InterventionOutputs.classes": Repeated(Nested(), MAX_LIST),
    "vitscope.v1.InterventionOutputs.logits": _FLAG,
    "vitscope.v1.InterventionOutputs.sites": Repeated(_SITE, 256),
    "vitscope.v1.InterventionOutputs.tokens": Nested(),
    "vitscope.v1.InterventionOutputs.reduction": _ENUM,
    "vitscope.v1.InterventionOutputs.channels": Repeated(_CHANNEL, MAX_LIST),
    "vitscope.v1.InterventionOutputs.top_channels": _up_to("the site's channels"),
    "vitscope.v1.InterventionOutputs.output_dtype": _ENUM,
}

_SAE: dict[str, Rule] = {
    "vitscope.v1.EvaluateSaeRequest.model": _MODEL,
    "vitscope.v1.EvaluateSaeRequest.sae": Text(128, SAE_NAME),
    "vitscope.v1.EvaluateSaeRequest.images": _IMAGES,
    "vitscope.v1.EvaluateSaeRequest.labels": Repeated(_CLASS, MAX_IMAGES),
    "vitscope.v1.EvaluateSaeRequest.batch": _up_to("the server's max_batch"),
    "vitscope.v1.EvaluateSaeRequest.quality_only": _FLAG,
}

FIELDS: dict[str, Rule] = {
    **_SHARED,
    **_SAE,
    **_INTERVENTIONS,
    **_MODELS,
    **_ACTIVATIONS,
    **_FEATURES,
    **_PROJECTION,
    **_INVERSION,
    **_EXPLAIN,
}
