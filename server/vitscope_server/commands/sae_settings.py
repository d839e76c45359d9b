"""Settings of the SAE batch commands; their flags are generated from these fields
(settings_flags.py), each also a VITSCOPE_<FIELD> variable, as for `serve`."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from vitscope_server.core.model.datasets import BUILTIN_DIGITS, BUILTIN_DIGITS_TRAIN
from vitscope_server.core.sae.activation_data import ExtractConfig
from vitscope_server.core.sae.recipe import Recipe
from vitscope_server.settings import ENV_PREFIX

_CONFIG = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)


class ComputeSettings(BaseSettings):
    model_config = _CONFIG

    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    threads: int | None = Field(None, ge=1, description="torch CPU threads; unset: torch's choice.")


class ModelChoice(ComputeSettings):
    """A model named exactly as `serve` names it."""

    model: str = Field(description="Name of the model, as served.")
    models_file: Path | None = Field(None, description="YAML models file, as for serve.")
    model_spec: list[str] = Field(
        default_factory=list,
        description="NAME=FAMILY:ARCH[@WEIGHTS] as for serve --models; repeat for more.",
    )


class ExtractSettings(ModelChoice, ExtractConfig):
    """`vitscope-server extract`."""

    model_config = _CONFIG

    data: str = Field(
        description=f"Image folder, {BUILTIN_DIGITS_TRAIN} (4,000 training digits) or "
        f"{BUILTIN_DIGITS} (1,000 held-out digits)."
    )
    out: Path = Field(description="Dataset folder (manifest.json and shards).")
    shard: str = Field(
        "0/1", description="I/N: this worker writes the I-th of N slices of the shard files."
    )


class TrainSaeSettings(ComputeSettings, Recipe):
    """`vitscope-server train-sae`."""

    model_config = _CONFIG

    dataset: Path = Field(description="Activation dataset folder written by extract.")
    out: Path = Field(description="SAE folder: cfg.json, weights, checkpoint.")
    eval_dataset: Path | None = Field(
        None, description="Dataset the final metrics are measured on; unset: the training one."
    )
    eval_tokens: int = Field(
        1_000_000, ge=1, description="Most tokens the final metrics are measured on."
    )
    log_every: int = Field(50, ge=1, description="Steps between progress lines.")
    checkpoint_every: int = Field(500, ge=1, description="Steps between checkpoints.")
    stop_after: int = Field(
        0, ge=0, description="Stop after this many steps of this run (resume later); 0: finish."
    )


class EvaluateSaeSettings(ModelChoice):
    """`vitscope-server evaluate-sae`."""

    model_config = _CONFIG

    sae: str = Field(
        description="Name of the SAE: one the model serves, or the name for sae_folder."
    )
    sae_folder: Path | None = Field(
        None, description="SAE folder (SAELens layout) to evaluate under the name `sae`."
    )
    data: str = Field(
        description=f"Image folder, {BUILTIN_DIGITS} or {BUILTIN_DIGITS_TRAIN} (the digits' "
        "labels serve the losses; a folder's images use their clean top-1 class)."
    )
    max_images: int = Field(0, ge=0, description="Evaluate the first N images; 0: all.")
    batch: int = Field(32, ge=1, le=256, description="Images per forward.")
    quality_only: bool = Field(False, description="Only reconstruction metrics; no splicing.")
