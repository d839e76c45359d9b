"""What to serve: one ModelSpec per model, from a models file, flags or the built-ins."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from vitscope_server.core.runtime.errors import InvalidArgument

Family = Literal["timm", "open_clip"]


MODEL_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._:/-]*"
"""What a served model may be called (requests naming a model are checked against it too)."""
SAE_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_-]*"
"""What a served SAE may be called (its sites are `{site}@sae:{name}`)."""


class SaeSource(BaseModel):
    """An SAE served on one of the model's sites: a folder in SAELens's layout (cfg.json,
    sae_weights.safetensors) whose metadata.hook_name names the site it reads."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, pattern=f"^{SAE_NAME_PATTERN}$")
    path: Path


class ModelSpec(BaseModel):
    """One served model.

    `weights` is "random" (seeded init), "file:PATH" (safetensors, or a torch
    checkpoint read with weights_only=True), "hub" (the library's default
    pretrained weights) or "hub:TAG" (a timm pretrained tag or an open_clip
    pretrained name).
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, pattern=f"^{MODEL_NAME_PATTERN}$")
    family: Family = "timm"
    architecture: str = Field(min_length=1)
    weights: str = "random"
    seed: int = 0
    kwargs: dict[str, Any] = Field(default_factory=dict)
    class_names: list[str] | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    crop_pct: float | None = None
    interpolation: str | None = None
    saes: list[SaeSource] = Field(default_factory=list)

    @field_validator("weights")
    @classmethod
    def _known_weights_source(cls, value: str) -> str:
        if value == "random" or value == "hub" or value.startswith(("file:", "hub:")):
            return value
        raise ValueError('weights must be "random", "file:PATH", "hub" or "hub:TAG"')

    @property
    def weights_file(self) -> Path | None:
        return (
            Path(self.weights.removeprefix("file:")).expanduser()
            if self.weights.startswith("file:")
            else None
        )

    @property
    def hub_tag(self) -> str | None:
        if self.weights == "hub":
            return ""
        return self.weights.removeprefix("hub:") if self.weights.startswith("hub:") else None


class ModelsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    default: str | None = None
    models: list[ModelSpec]


def load_models_file(path: Path) -> ModelsFile:
    """Reads a YAML models file; relative weight and SAE paths resolve against its folder."""
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise InvalidArgument("models_file", f"{path} cannot be read: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise InvalidArgument("models_file", f"{path} is not valid YAML: {exc}") from exc
    try:
        parsed = ModelsFile.model_validate(raw)
    except ValidationError as exc:
        raise InvalidArgument("models_file", f"{path} is invalid: {exc}") from exc
    resolved = []
    for spec in parsed.models:
        weights_file = spec.weights_file
        if weights_file is not None and not weights_file.is_absolute():
            spec = spec.model_copy(
                update={"weights": f"file:{(path.parent / weights_file).resolve()}"}
            )
        saes = [
            sae.model_copy(update={"path": (path.parent / sae.path).resolve()}) for sae in spec.saes
        ]
        resolved.append(spec.model_copy(update={"saes": saes}))
    return parsed.model_copy(update={"models": resolved})


def parse_model_flag(value: str) -> ModelSpec:
    """Parses NAME=FAMILY:ARCH[@WEIGHTS], e.g. vit=timm:vit_tiny_patch16_224@random."""
    name, sep, rest = value.partition("=")
    family, sep2, arch_weights = rest.partition(":")
    if not sep or not sep2:
        raise InvalidArgument("--model", f"{value!r}: expected NAME=FAMILY:ARCHITECTURE[@WEIGHTS]")
    architecture, _, weights = arch_weights.partition("@")
    try:
        return ModelSpec.model_validate(
            {
                "name": name,
                "family": family,
                "architecture": architecture,
                "weights": weights or "random",
            }
        )
    except ValidationError as exc:
        raise InvalidArgument("--model", f"{value!r}: {exc}") from exc


def parse_sae_flag(value: str) -> tuple[str, SaeSource]:
    """Parses MODEL:NAME=FOLDER into the model's name and the SAE."""
    model_and_name, sep, folder = value.partition("=")
    model, sep2, name = model_and_name.rpartition(":")
    if not sep or not sep2 or not model:
        raise InvalidArgument("--saes", f"{value!r}: expected MODEL:NAME=FOLDER")
    try:
        return model, SaeSource(name=name, path=Path(folder).expanduser())
    except ValidationError as exc:
        raise InvalidArgument("--saes", f"{value!r}: {exc}") from exc
