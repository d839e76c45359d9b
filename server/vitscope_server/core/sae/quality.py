"""Streaming reconstruction quality of an SAE (METHODS §6): FVU in float64 with the vector
mean, L0, dead and dense latents, and the log-frequency histogram.

Batches merge with Chan's update of the mean and the sum of squared deviations, so the
streamed FVU equals the one computed over all tokens at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from vitscope_server.core.model.sae import SparseAutoencoder
from vitscope_server.core.sae.activation_data import ActivationDataset

# A latent firing on more than this fraction of tokens is dense.
DENSE_FREQUENCY = 0.1
# Histogram of log10 firing frequency: bins of 0.5 from 1e-8 to 1 (dead latents apart).
HISTOGRAM_EDGES = tuple(float(e) for e in np.arange(-8.0, 0.01, 0.5))


@dataclass(frozen=True)
class QualityReport:
    tokens: int
    fvu: float
    l0: float
    dead_fraction: float
    dense_fraction: float
    # counts[i] latents with log10 frequency in [edges[i], edges[i+1]); dead ones excluded.
    histogram_edges: tuple[float, ...]
    histogram_counts: tuple[int, ...]
    log_frequency: np.ndarray = field(repr=False)

    @property
    def explained_variance(self) -> float:
        return 1.0 - self.fvu

    def metrics(self) -> dict[str, float]:
        return {
            "fvu": self.fvu,
            "explained_variance": self.explained_variance,
            "l0": self.l0,
            "dead_fraction": self.dead_fraction,
            "dense_fraction": self.dense_fraction,
            "tokens": float(self.tokens),
        }


class QualityAccumulator:
    """Adds batches of (tokens, codes, reconstruction); `report` gives the totals."""

    def __init__(self, d_in: int, d_sae: int) -> None:
        self.count = 0
        self.mean = torch.zeros(d_in, dtype=torch.float64)
        self.deviations = 0.0  # Σ‖x − x̄‖² over the tokens so far
        self.error = 0.0  # Σ‖x − x̂‖²
        self.active = 0  # Σ over tokens of the non-zero latents
        self.fired = torch.zeros(d_sae, dtype=torch.int64)

    def add(self, x: torch.Tensor, codes: torch.Tensor, recon: torch.Tensor) -> None:
        x64 = x.detach().double().cpu()
        batch_mean = x64.mean(dim=0)
        batch_deviations = float((x64 - batch_mean).pow(2).sum())
        n, m = self.count, x64.shape[0]
        delta = batch_mean - self.mean
        self.deviations += batch_deviations + float(delta.pow(2).sum()) * n * m / (n + m)
        self.mean += delta * m / (n + m)
        self.count = n + m
        self.error += float((x64 - recon.detach().double().cpu()).pow(2).sum())
        firing = (codes.detach() > 0).cpu()
        self.active += int(firing.sum())
        self.fired += firing.sum(dim=0)

    def report(self) -> QualityReport:
        count = max(self.count, 1)
        frequency = self.fired.double() / count
        alive = frequency > 0
        logs = torch.where(
            alive, frequency.clamp_min(1e-300).log10(), torch.full_like(frequency, -np.inf)
        )
        counts, _ = np.histogram(logs[alive].numpy(), bins=np.asarray(HISTOGRAM_EDGES))
        return QualityReport(
            tokens=self.count,
            fvu=self.error / self.deviations if self.deviations > 0 else float("nan"),
            l0=self.active / count,
            dead_fraction=float((~alive).double().mean()),
            dense_fraction=float((frequency > DENSE_FREQUENCY).double().mean()),
            histogram_edges=HISTOGRAM_EDGES,
            histogram_counts=tuple(int(c) for c in counts),
            log_frequency=logs.numpy(),
        )


def dataset_quality(
    sae: SparseAutoencoder, data: ActivationDataset, max_tokens: int, batch: int = 8192
) -> QualityReport:
    """The SAE's quality over the dataset's first max_tokens tokens, in shard order."""
    device = sae.W_enc.device
    quality = QualityAccumulator(sae.d_in, sae.d_sae)
    for index in range(data.num_shards):
        rows = data.shard(index)[: max_tokens - quality.count]
        for start in range(0, len(rows), batch):
            x = rows[start : start + batch].to(device)
            with torch.inference_mode():
                codes = sae.encode(x)
                quality.add(x, codes, sae.decode(codes))
        if quality.count >= max_tokens:
            break
    return quality.report()
