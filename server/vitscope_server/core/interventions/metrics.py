"""The metric per variant and image (docs/methods.md section 7), and its normalized form."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vitscope_server.core.interventions.edits import MetricKind


@dataclass(frozen=True)
class ResolvedMetric:
    """kind with each image's classes: target and other (logit difference), target
    (probability); KL reads the base's log-probabilities."""

    kind: MetricKind
    targets: torch.Tensor  # [images] long
    others: torch.Tensor  # [images] long


def metric_values(
    metric: ResolvedMetric, outputs: torch.Tensor, base: torch.Tensor, variants: int
) -> torch.Tensor:
    """outputs [variants * images, classes] (variant-major), base [images, classes]:
    the metric per row, float32 [variants * images]."""
    scores = outputs.float()
    targets = metric.targets.repeat(variants)
    if metric.kind is MetricKind.LOGIT_DIFFERENCE:
        others = metric.others.repeat(variants)
        rows = torch.arange(scores.shape[0], device=scores.device)
        return scores[rows, targets] - scores[rows, others]
    log_probs = scores.log_softmax(dim=-1)
    if metric.kind is MetricKind.TARGET_PROBABILITY:
        return log_probs.gather(1, targets[:, None])[:, 0].exp()
    base_log_probs = base.float().log_softmax(dim=-1).repeat(variants, 1)
    return (base_log_probs.exp() * (base_log_probs - log_probs)).sum(dim=-1)


def normalized(values: torch.Tensor, base: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """(m_variant - m_base) / (m_source - m_base) per row; NaN where source equals base.
    values [variants * images]; base and source [images]."""
    variants = values.shape[0] // base.shape[0]
    base_rows, source_rows = base.repeat(variants), source.repeat(variants)
    gap = source_rows - base_rows
    return torch.where(gap != 0, (values - base_rows) / gap, torch.full_like(gap, float("nan")))
