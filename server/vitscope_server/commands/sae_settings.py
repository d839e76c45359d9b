"""Settings of the SAE batch commands; their flags are generated from these fields
(settings_flags.py), each also a VITSCOPE_<FIELD> variable, as for `serve`."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from vitscope_server.core.model.datasets import BUILTIN_DIGITS, BUILTIN_DIGITS_TRAIN
from vitscope_server.core.sae.activation_data import ExtractConfig
from vitscope_server.core.sae.recipe import Recipe
from vitscope_server.settings import JobSettings, ModelJobSettings

# Flags and defaults only, as every job's (settings.JobSettings); frozen once parsed.
_CONFIG = SettingsConfigDict(extra="forbid", frozen=True)


class ComputeSettings(JobSettings):
    model_config = _CONFIG

    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    threads: int | None = Field(None, ge=1, description="torch CPU threads; unset: torch's choice.")


class ModelChoice(ModelJobSettings):
    """A model named exactly as `serve` names it, and the CPU threads to use."""

    model_config = _CONFIG

    threads: int | None = Field(None, ge=1, description="torch CPU threads; unset: torch's choice.")


class ExtractSettings(ModelChoice, ExtractConfig):
    """Write a site's token activations for a dataset to shards.

    Safetensors shards and a manifest (model, weights, site, tokens kept, dtype, image-list
    hash, seed); resumable, and sharded across the workers of an Indexed Job (--shard I/N)."""

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
    """Train a sparse autoencoder on an activation dataset.

    TopK, BatchTopK or ReLU+L1 with the recipe of docs/sae.md; progress as JSON lines,
    checkpoints that resume, and the SAE written in SAELens's layout."""

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
    """Measure an SAE's quality on a dataset.

    FVU, L0, dead and dense latents, the frequency histogram and what splicing the
    reconstruction into the model does to its output, as JSON lines."""

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
