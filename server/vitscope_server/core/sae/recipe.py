"""The SAE training recipe (METHODS §6) as pure functions of tensors, so the trainer and any
in-process loop (bench/sae.py) run exactly the same steps.

Inputs are scaled by one constant so their mean norm is √d; decoder rows stay at unit norm
(the gradient's component along each row is removed before the step, the row renormalized
after it); `b_dec` starts at the mean or geometric median of a sample and `W_enc` at
`W_decᵀ`; TopK and BatchTopK fight dead latents with the AuxK loss (Gao et al. 2024).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from vitscope_server.core.model.sae import SaeKind, SparseAutoencoder

TrainedKind = Literal["topk", "batchtopk", "relu"]
# How each trained kind is served: BatchTopK becomes JumpReLU with one global threshold.
SERVED_KIND: dict[str, SaeKind] = {
    "topk": SaeKind.TOPK,
    "batchtopk": SaeKind.JUMPRELU,
    "relu": SaeKind.RELU,
}


class Recipe(BaseModel):
    """How an SAE is trained; each field is a `train-sae` flag."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: TrainedKind = Field(
        "topk", description="topk, batchtopk (served as JumpReLU with a global threshold) or relu."
    )
    expansion: int = Field(8, ge=1, description="Latents per input dimension (d_sae / d).")
    latents_per_token: int = Field(
        32, ge=1, description="TopK: latents kept per token; BatchTopK: on average per token."
    )
    l1_coefficient: float = Field(
        5.0, ge=0, description="ReLU: weight of the L1 penalty (times decoder row norms)."
    )
    lr: float = Field(4e-4, gt=0, description="Adam's peak learning rate.")
    batch_size: int = Field(1024, ge=1, description="Tokens per step.")
    steps: int = Field(0, ge=0, description="Training steps; 0: one pass over the dataset.")
    warmup_steps: int = Field(
        100, ge=0, description="Linear learning-rate warm-up (at most a tenth of the steps)."
    )
    decay_fraction: float = Field(
        0.2, ge=0, le=1, description="The last fraction of steps decays the rate linearly to 0."
    )
    b_dec_init: Literal["mean", "geometric_median"] = Field(
        "geometric_median", description="Decoder bias start: the sample's mean or geometric median."
    )
    aux_k: int = Field(
        0, ge=0, description="AuxK: dead latents that reconstruct the error; 0: d/2."
    )
    aux_coefficient: float = Field(1 / 32, ge=0, description="AuxK loss weight.")
    dead_after_tokens: int = Field(
        10_000_000,
        ge=1,
        description="A latent is dead after this many tokens without firing (at most a "
        "quarter of the run's tokens).",
    )
    threshold_rate: float = Field(
        0.01, gt=0, le=1, description="BatchTopK: moving-average rate of the global threshold."
    )
    init_tokens: int = Field(
        65536, ge=1, description="Tokens sampled for the input scale and the decoder bias."
    )
    seed: int = Field(0, description="Seed of the initialization and the batch order.")


def input_scale(sample: torch.Tensor) -> float:
    """The constant that brings the sample's mean token norm to √d."""
    return math.sqrt(sample.shape[1]) / float(sample.double().norm(dim=1).mean())


def geometric_median(points: torch.Tensor, iterations: int = 100) -> torch.Tensor:
    """Weiszfeld's iterations in float64, started at the mean."""
    points = points.double()
    median = points.mean(dim=0)
    for _ in range(iterations):
        distances = (points - median).norm(dim=1).clamp_min(1e-8)
        weights = 1 / distances
        updated = (weights[:, None] * points).sum(dim=0) / weights.sum()
        if (updated - median).norm() < 1e-7 * (1 + median.norm()):
            return updated
        median = updated
    return median


def initial_sae(recipe: Recipe, scaled_sample: torch.Tensor) -> SparseAutoencoder:
    """Unit-norm random decoder rows, W_enc = W_decᵀ, b_enc = 0, b_dec from the sample."""
    d_in = scaled_sample.shape[1]
    d_sae = recipe.expansion * d_in
    sae = SparseAutoencoder(d_in, d_sae, SERVED_KIND[recipe.kind], k=recipe.latents_per_token)
    generator = torch.Generator().manual_seed(recipe.seed)
    decoder = torch.randn(d_sae, d_in, generator=generator)
    decoder /= decoder.norm(dim=1, keepdim=True)
    center = (
        scaled_sample.double().mean(dim=0)
        if recipe.b_dec_init == "mean"
        else geometric_median(scaled_sample)
    )
    with torch.no_grad():
        sae.W_dec.copy_(decoder)
        sae.W_enc.copy_(decoder.T)
        sae.b_dec.copy_(center.float())
    return sae


def learning_rate(recipe: Recipe, step: int, total: int) -> float:
    """Linear warm-up, constant, then a linear decay to 0 over the last decay_fraction."""
    warmup = min(recipe.warmup_steps, max(total // 10, 1))
    if step < warmup:
        return recipe.lr * (step + 1) / warmup
    decay_start = int(total * (1 - recipe.decay_fraction))
    if step < decay_start:
        return recipe.lr
    return recipe.lr * max(total - step, 0) / max(total - decay_start, 1)


def batch_topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    """ReLU, then the k·B largest values over the whole batch of B tokens."""
    flat = torch.relu(pre).flatten()
    top = flat.topk(min(k * pre.shape[0], flat.numel()))
    return torch.zeros_like(flat).scatter(0, top.indices, top.values).view_as(pre)


@dataclass
class StepOutput:
    loss: torch.Tensor
    codes: torch.Tensor
    mse: float
    fvu: float
    aux: float
    l1: float


def _aux_loss(
    sae: SparseAutoencoder, pre: torch.Tensor, error: torch.Tensor, dead: torch.Tensor, aux_k: int
) -> torch.Tensor:
    """The error x − x̂ reconstructed from the aux_k largest dead latents (Gao et al.),
    scaled down when fewer latents are dead."""
    count = int(dead.sum())
    if count == 0:
        return pre.new_zeros(())
    masked = torch.where(dead, pre, torch.full_like(pre, -torch.inf))
    top = masked.topk(min(aux_k, count), dim=-1)
    codes = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
    rebuilt = codes @ sae.W_dec
    return min(count / aux_k, 1.0) * (rebuilt - error).pow(2).sum(dim=-1).mean()


def training_step(
    sae: SparseAutoencoder, recipe: Recipe, x: torch.Tensor, dead: torch.Tensor
) -> StepOutput:
    """The loss of one batch of scaled tokens (not yet backpropagated)."""
    pre = sae.pre_activations(x)
    if recipe.kind == "batchtopk":
        codes = batch_topk(pre, recipe.latents_per_token)
    elif recipe.kind == "topk":
        codes = sae.activate(pre)
    else:
        codes = torch.relu(pre)
    recon = sae.decode(codes)
    mse = (recon - x).pow(2).sum(dim=-1).mean()
    loss = mse
    l1 = aux = pre.new_zeros(())
    if recipe.kind == "relu":
        l1 = recipe.l1_coefficient * (codes * sae.W_dec.norm(dim=1)).sum(dim=-1).mean()
        loss = loss + l1
    else:
        aux_k = recipe.aux_k or max(x.shape[1] // 2, 1)
        aux = _aux_loss(sae, pre, (x - recon).detach(), dead, aux_k)
        loss = loss + recipe.aux_coefficient * aux
    with torch.no_grad():
        variance = (x - x.mean(dim=0)).pow(2).sum()
        fvu = float((recon - x).pow(2).sum() / variance.clamp_min(1e-12))
    return StepOutput(
        loss, codes.detach(), float(mse.detach()), fvu, float(aux.detach()), float(l1.detach())
    )


def remove_parallel_gradient(sae: SparseAutoencoder) -> None:
    """Drops the part of each decoder row's gradient along the row (it would only change
    the row's norm, which is held at 1)."""
    grad = sae.W_dec.grad
    if grad is not None:
        rows = sae.W_dec.detach()
        grad -= (grad * rows).sum(dim=1, keepdim=True) * rows


def normalize_decoder(sae: SparseAutoencoder) -> None:
    with torch.no_grad():
        sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))


def folded(sae: SparseAutoencoder, scale: float, threshold: float | None) -> SparseAutoencoder:
    """The SAE for unscaled inputs: x·scale folded into W_enc, 1/scale into W_dec and b_dec
    (pre-activations are unchanged, so a JumpReLU threshold is too); BatchTopK's global
    threshold set for every latent."""
    out = SparseAutoencoder(sae.d_in, sae.d_sae, sae.kind, k=sae.k)
    with torch.no_grad():
        out.W_enc.copy_(sae.W_enc * scale)
        out.b_enc.copy_(sae.b_enc)
        out.W_dec.copy_(sae.W_dec / scale)
        out.b_dec.copy_(sae.b_dec / scale)
        if threshold is not None:
            out.threshold.fill_(threshold)
    return out.eval().requires_grad_(False)
