"""`train-sae`: an SAE trained on an activation dataset, resumable from its checkpoint.

The batch order is a function of the seed alone (shards shuffled per epoch, tokens shuffled
within groups of shards), and a checkpoint holds the SAE, Adam's state, the dead-latent
counters and the step: a run stopped and resumed gives the same SAE as one run straight
through, and two runs with one seed give the same SAE on the CPU.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vitscope_server.core.model.provenance import library_versions
from vitscope_server.core.model.sae import SparseAutoencoder
from vitscope_server.core.model.sae_files import write_sae
from vitscope_server.core.runtime.atomic_files import write_atomically
from vitscope_server.core.runtime.errors import FailedPrecondition, InvalidArgument
from vitscope_server.core.sae.activation_data import ActivationDataset
from vitscope_server.core.sae.recipe import (
    Recipe,
    folded,
    initial_sae,
    input_scale,
    learning_rate,
    normalize_decoder,
    remove_parallel_gradient,
    training_step,
)

CHECKPOINT = "checkpoint.pt"
# Shards whose tokens are shuffled together.
SHUFFLE_SHARDS = 4

CPU = torch.device("cpu")

Report = Callable[[dict[str, Any]], None]


@dataclass
class TrainState:
    """Everything a resumed run needs besides the dataset and the recipe."""

    sae: SparseAutoencoder
    optimizer: torch.optim.Adam
    scale: float
    step: int = 0
    # Tokens since each latent last fired, and how often each fired in the decay phase.
    since_fired: torch.Tensor | None = None
    fire_counts: torch.Tensor | None = None
    fire_tokens: int = 0
    threshold: float = 0.0


def total_steps(recipe: Recipe, data: ActivationDataset) -> int:
    return recipe.steps or math.ceil(data.num_tokens / recipe.batch_size)


def _groups(data: ActivationDataset, seed: int, epoch: int) -> list[list[int]]:
    order = torch.randperm(data.num_shards, generator=torch.Generator().manual_seed(seed + epoch))
    indices = order.tolist()
    return [indices[i : i + SHUFFLE_SHARDS] for i in range(0, len(indices), SHUFFLE_SHARDS)]


def batches(data: ActivationDataset, recipe: Recipe, start: int) -> Iterator[torch.Tensor]:
    """Unscaled float32 batches from step `start` on, epoch after epoch; groups wholly before
    `start` are skipped without being read."""
    step, epoch = 0, 0
    while True:
        for number, group in enumerate(_groups(data, recipe.seed, epoch)):
            tokens = sum(data.shard_tokens[i] for i in group)
            count = math.ceil(tokens / recipe.batch_size)
            if step + count <= start:
                step += count
                continue
            rows = torch.cat(list(data.shards(group)))
            generator = torch.Generator().manual_seed(recipe.seed * 7919 + epoch * 104729 + number)
            rows = rows[torch.randperm(len(rows), generator=generator)]
            for offset in range(0, len(rows), recipe.batch_size):
                if step >= start:
                    yield rows[offset : offset + recipe.batch_size]
                step += 1
        epoch += 1


def init_sample(data: ActivationDataset, recipe: Recipe) -> torch.Tensor:
    """The first init_tokens tokens of the first epoch's order."""
    rows, count = [], 0
    for group in _groups(data, recipe.seed, 0):
        for shard in data.shards(group):
            rows.append(shard[: recipe.init_tokens - count])
            count += len(rows[-1])
            if count >= recipe.init_tokens:
                return torch.cat(rows)
    return torch.cat(rows)


def new_state(data: ActivationDataset, recipe: Recipe, device: torch.device) -> TrainState:
    sample = init_sample(data, recipe)
    scale = input_scale(sample)
    sae = initial_sae(recipe, sample * scale).to(device)
    optimizer = torch.optim.Adam(sae.parameters(), lr=recipe.lr)
    state = TrainState(sae, optimizer, scale)
    state.since_fired = torch.zeros(sae.d_sae, dtype=torch.int64, device=device)
    state.fire_counts = torch.zeros(sae.d_sae, dtype=torch.int64, device=device)
    return state


def _check(recipe: Recipe, data: ActivationDataset) -> None:
    if recipe.kind != "relu" and not 1 <= recipe.latents_per_token <= recipe.expansion * data.width:
        raise InvalidArgument(
            "--latents-per-token", f"must be in 1..{recipe.expansion * data.width}"
        )


def train_step(
    state: TrainState, recipe: Recipe, batch: torch.Tensor, total: int
) -> dict[str, Any]:
    """One optimization step on unscaled tokens; returns its metrics."""
    assert state.since_fired is not None and state.fire_counts is not None
    sae = state.sae
    x = batch.to(sae.W_enc.device) * state.scale
    dead_after = min(recipe.dead_after_tokens, max(total * recipe.batch_size // 4, 1))
    lr = learning_rate(recipe, state.step, total)
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    out = training_step(sae, recipe, x, state.since_fired >= dead_after)
    state.optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    remove_parallel_gradient(sae)
    state.optimizer.step()
    normalize_decoder(sae)
    fired = (out.codes > 0).any(dim=0)
    state.since_fired += len(x)
    state.since_fired[fired] = 0
    if recipe.kind == "batchtopk":
        positive = out.codes[out.codes > 0]
        if positive.numel():
            minimum = float(positive.min())
            rate = recipe.threshold_rate
            state.threshold = (
                minimum if state.step == 0 else (1 - rate) * state.threshold + rate * minimum
            )
    if state.step >= int(total * (1 - recipe.decay_fraction)):
        state.fire_counts += (out.codes > 0).sum(dim=0)
        state.fire_tokens += len(x)
    state.step += 1
    return {
        "step": state.step,
        "lr": lr,
        "loss": float(out.loss.detach()),
        "mse": out.mse,
        "fvu": out.fvu,
        "aux": out.aux,
        "l1": out.l1,
        "l0": float((out.codes > 0).sum(dim=-1).float().mean()),
        "dead_fraction": float((state.since_fired >= dead_after).float().mean()),
    }


def save_checkpoint(folder: Path, state: TrainState, recipe: Recipe) -> None:
    payload = {
        "recipe": recipe.model_dump(),
        "sae": state.sae.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scale": state.scale,
        "step": state.step,
        "since_fired": state.since_fired,
        "fire_counts": state.fire_counts,
        "fire_tokens": state.fire_tokens,
        "threshold": state.threshold,
    }
    write_atomically(folder / CHECKPOINT, lambda temp: torch.save(payload, temp))


def load_checkpoint(
    folder: Path, data: ActivationDataset, recipe: Recipe, device: torch.device
) -> TrainState:
    payload = torch.load(folder / CHECKPOINT, map_location=device, weights_only=True)
    if payload["recipe"] != recipe.model_dump():
        raise FailedPrecondition(
            f"--out {folder}: its checkpoint was trained with another recipe; use the same "
            "flags to resume, or a new folder",
            field="--out",
        )
    state = new_state(data, recipe, device)
    state.sae.load_state_dict(payload["sae"])
    state.optimizer.load_state_dict(payload["optimizer"])
    state.scale = float(payload["scale"])
    state.step = int(payload["step"])
    state.since_fired = payload["since_fired"]
    state.fire_counts = payload["fire_counts"]
    state.fire_tokens = int(payload["fire_tokens"])
    state.threshold = float(payload["threshold"])
    return state


@dataclass(frozen=True)
class TrainOptions:
    log_every: int = 50
    checkpoint_every: int = 500
    # Stop after this many steps of this run (the checkpoint then resumes it); 0: run to the end.
    stop_after: int = 0
    device: torch.device = CPU


def train_sae(
    data: ActivationDataset,
    recipe: Recipe,
    out: Path,
    options: TrainOptions = TrainOptions(),
    report: Report = lambda event: None,
) -> TrainState:
    """Trains (or resumes, when `out` holds a checkpoint) up to the recipe's total steps,
    checkpointing as it goes; the final SAE is written by `finish_sae`."""
    _check(recipe, data)
    total = total_steps(recipe, data)
    resume = (out / CHECKPOINT).exists()
    device = options.device
    state = (
        load_checkpoint(out, data, recipe, device) if resume else new_state(data, recipe, device)
    )
    report({"event": "start", "resumed_at": state.step, "steps": total, "scale": state.scale})
    started, first, tokens = time.perf_counter(), state.step, 0
    for batch in batches(data, recipe, state.step):
        if state.step >= total or (options.stop_after and state.step - first >= options.stop_after):
            break
        metrics = train_step(state, recipe, batch, total)
        tokens += len(batch)
        if state.step % options.log_every == 0 or state.step == total:
            rate = tokens / max(time.perf_counter() - started, 1e-9)
            report({"event": "progress", **metrics, "tokens_per_second": rate})
        if state.step % options.checkpoint_every == 0:
            save_checkpoint(out, state, recipe)
    save_checkpoint(out, state, recipe)
    return state


def require_same_site(data: ActivationDataset, other: ActivationDataset) -> None:
    """Refuses to measure an SAE on a dataset of another model, weights or site."""
    keys = ("model", "weights_identity", "site", "d")
    different = [key for key in keys if data.manifest.get(key) != other.manifest.get(key)]
    if different:
        raise InvalidArgument("--eval-dataset", f"differs from the training dataset in {different}")


def finished_sae(state: TrainState, recipe: Recipe) -> SparseAutoencoder:
    threshold = state.threshold if recipe.kind == "batchtopk" else None
    return folded(state.sae, state.scale, threshold)


def log_frequency(state: TrainState) -> torch.Tensor:
    """log10 of each latent's firing frequency over the decay phase (SAELens's sparsity)."""
    assert state.fire_counts is not None
    frequency = state.fire_counts.double().cpu() / max(state.fire_tokens, 1)
    return torch.log10(frequency + 1e-10).float()


def write_trained_sae(
    out: Path,
    state: TrainState,
    recipe: Recipe,
    data: ActivationDataset,
    metrics: dict[str, float],
    evaluated_on: str,
) -> SparseAutoencoder:
    """The final SAE, scale folded in, with its provenance and metrics (measured on the
    dataset `evaluated_on`) in the metadata."""
    sae = finished_sae(state, recipe)
    manifest = data.manifest
    provenance = {
        "model": manifest["model"],
        "weights_identity": manifest["weights_identity"],
        "dataset": {key: value for key, value in manifest.items() if key != "libraries"},
        "recipe": recipe.model_dump(),
        "input_scale": state.scale,
        "steps": state.step,
        "seed": recipe.seed,
        "libraries": library_versions(),
        "metrics": metrics,
        "metrics_dataset": evaluated_on,
    }
    if recipe.kind == "batchtopk":
        provenance["global_threshold"] = state.threshold
    write_sae(out, sae, manifest["site"], provenance, log_frequency(state))
    return sae
