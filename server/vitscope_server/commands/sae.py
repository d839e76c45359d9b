"""`vitscope-server extract` and `vitscope-server train-sae`: activation datasets and SAEs
trained on them. Progress and results are printed as JSON lines."""

from __future__ import annotations

import json
from typing import Any

import torch

from vitscope_server.commands.sae_settings import (
    ComputeSettings,
    EvaluateSaeSettings,
    ExtractSettings,
    ModelChoice,
    TrainSaeSettings,
)
from vitscope_server.core.model.datasets import dataset, dataset_labels, parse_shard
from vitscope_server.core.model.loading import load_model
from vitscope_server.core.model.specs import SaeSource
from vitscope_server.core.runtime.cancel import NEVER_CANCELLED
from vitscope_server.core.runtime.errors import VitscopeError
from vitscope_server.core.sae.activation_data import (
    MAX_IMAGE_PIXELS,
    ActivationDataset,
    ExtractConfig,
    extract_activations,
)
from vitscope_server.core.sae.evaluate import (
    EvaluationProgress,
    EvaluationQuery,
    SaeEvaluation,
    evaluate_sae,
    evaluation_json,
)
from vitscope_server.core.sae.quality import dataset_quality
from vitscope_server.core.sae.recipe import Recipe
from vitscope_server.core.sae.train import (
    TrainOptions,
    finished_sae,
    require_same_site,
    total_steps,
    train_sae,
    write_trained_sae,
)
from vitscope_server.model_selection import resolve_device, select_spec


def print_event(event: dict[str, Any]) -> None:
    print(json.dumps(event), flush=True)


def _device(settings: ComputeSettings | ModelChoice) -> torch.device:
    if settings.threads:
        torch.set_num_threads(settings.threads)
    return resolve_device(settings.device)


def extract(settings: ExtractSettings) -> None:
    try:
        spec = select_spec(settings.model, settings.models_file, settings.model_spec)
        loaded = load_model(spec, _device(settings))
        config = ExtractConfig.model_validate(
            settings.model_dump(include=set(ExtractConfig.model_fields))
        )
        manifest = extract_activations(
            loaded, settings.data, settings.out, config, parse_shard(settings.shard), print_event
        )
    except VitscopeError as exc:
        raise SystemExit(f"vitscope-server extract: {exc}") from None
    print_event({"event": "done", "out": str(settings.out), "num_shards": manifest["num_shards"]})


def train(settings: TrainSaeSettings) -> None:
    try:
        recipe = Recipe.model_validate(settings.model_dump(include=set(Recipe.model_fields)))
        data = ActivationDataset(settings.dataset)
        options = TrainOptions(
            settings.log_every, settings.checkpoint_every, settings.stop_after, _device(settings)
        )
        state = train_sae(data, recipe, settings.out, options, print_event)
        if state.step < total_steps(recipe, data):
            print_event({"event": "stopped", "step": state.step, "checkpoint": str(settings.out)})
            return
        evaluation = ActivationDataset(settings.eval_dataset) if settings.eval_dataset else data
        require_same_site(data, evaluation)
        quality = dataset_quality(finished_sae(state, recipe), evaluation, settings.eval_tokens)
        evaluated_on = str(settings.eval_dataset or settings.dataset)
        write_trained_sae(settings.out, state, recipe, data, quality.metrics(), evaluated_on)
    except VitscopeError as exc:
        raise SystemExit(f"vitscope-server train-sae: {exc}") from None
    print_event({"event": "done", "out": str(settings.out), **quality.metrics()})


def evaluate(settings: EvaluateSaeSettings) -> None:
    try:
        spec = select_spec(settings.model, settings.models_file, settings.model_spec)
        if settings.sae_folder is not None:
            source = SaeSource(name=settings.sae, path=settings.sae_folder)
            spec = spec.model_copy(update={"saes": [*spec.saes, source]})
        loaded = load_model(spec, _device(settings))
        names, load = dataset(settings.data)
        count = min(settings.max_images or len(names), len(names))
        labels = dataset_labels(settings.data)
        query = EvaluationQuery(
            sae=settings.sae,
            labels=tuple(labels[:count]) if labels and not settings.quality_only else (),
            batch=settings.batch,
            quality_only=settings.quality_only,
        )
        images = [load(i) for i in range(count)]
        for event in evaluate_sae(loaded, images, query, MAX_IMAGE_PIXELS, NEVER_CANCELLED):
            if isinstance(event, EvaluationProgress):
                print_event({"event": "progress", "images_done": event.images_done})
            elif isinstance(event, SaeEvaluation):
                print_event({"event": "done", "data": settings.data, **evaluation_json(event)})
    except VitscopeError as exc:
        raise SystemExit(f"vitscope-server evaluate-sae: {exc}") from None
