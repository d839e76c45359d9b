"""Which models a process serves and on which device: shared by `vitscope-server serve` and the
batch commands (scan, train-inverter), so a Job names models exactly as the server does."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from vitscope_server.builtin import builtin_default_name, builtin_specs
from vitscope_server.core.model.specs import (
    ModelSpec,
    SaeSource,
    load_models_file,
    parse_model_flag,
    parse_sae_flag,
)
from vitscope_server.core.runtime.errors import InvalidArgument, NotFound, Reason
from vitscope_server.settings import ServerSettings


def model_specs(settings: ServerSettings) -> tuple[list[ModelSpec], str]:
    """Built-ins, then the models file, then --model flags; a later name replaces an earlier one."""
    specs: dict[str, ModelSpec] = {}
    default = builtin_default_name() if settings.builtin_models else None
    if settings.builtin_models:
        specs.update({s.name: s for s in builtin_specs()})
    if settings.models_file is not None:
        parsed = load_models_file(settings.models_file)
        specs.update({s.name: s for s in parsed.models})
        default = parsed.default or default or parsed.models[0].name
    for flag in settings.models:
        spec = parse_model_flag(flag)
        specs[spec.name] = spec
        default = default or spec.name
    default = settings.default_model or default
    if not specs or default is None:
        raise InvalidArgument(
            "models", "no models to serve: enable the built-ins, give --models-file or --model"
        )
    return with_saes(list(specs.values()), settings), default


def with_saes(specs: list[ModelSpec], settings: ServerSettings) -> list[ModelSpec]:
    """Each spec with the SAEs of --saes-dir (a folder not yet written counts as empty) and
    --saes added after its own; a name given again replaces the earlier SAE."""
    extra: list[tuple[str, SaeSource]] = []
    if settings.saes_dir is not None and settings.saes_dir.is_dir():
        extra += [
            (model.name, SaeSource(name=folder.name, path=folder))
            for model in sorted(settings.saes_dir.iterdir())
            if model.is_dir()
            for folder in sorted(model.iterdir())
            if (folder / "cfg.json").is_file()
        ]
    extra += [parse_sae_flag(flag) for flag in settings.saes]
    names = {spec.name for spec in specs}
    unknown = sorted({model for model, _ in extra} - names)
    if unknown:
        raise InvalidArgument("saes", f"SAEs name models that are not served: {unknown}")
    result = []
    for spec in specs:
        saes = {sae.name: sae for sae in spec.saes}
        saes.update({sae.name: sae for model, sae in extra if model == spec.name})
        result.append(spec.model_copy(update={"saes": list(saes.values())}))
    return result


def resolve_device(name: str) -> torch.device:
    """The device to compute on. On CUDA, TF32 is turned off for matmuls and convolutions:
    float32 results then match the CPU's within float32 rounding, and reduced precision is
    what a request asks for explicitly (compute_dtype)."""
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name
    )
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return device


def select_spec(name: str, models_file: Path | None, model_flags: Sequence[str]) -> ModelSpec:
    """The model named `name` among those `vitscope-server serve` would serve with the same flags
    (and the same VITSCOPE_* environment, which a flag left out does not override)."""
    given: dict[str, object] = {}
    if models_file is not None:
        given["models_file"] = models_file
    if model_flags:
        given["models"] = list(model_flags)
    settings = ServerSettings.model_validate(given)
    specs, _ = model_specs(settings)
    for spec in specs:
        if spec.name == name:
            return spec
    raise NotFound(
        Reason.MODEL_NOT_FOUND,
        name,
        f"--model: {name!r} is not among {sorted(s.name for s in specs)}",
        field="--model",
    )
