"""One rule for optimizations that blow up: a loss that stops being finite ends the call
with INVALID_ARGUMENT naming the learning rate, never with a NaN image or an INTERNAL."""

from __future__ import annotations

import math

import torch

from vitscope_server.core.runtime.errors import InvalidArgument, Reason

MAX_LEARNING_RATE = 1000.0
"""Far above any useful rate (the defaults are 0.05 to 1.0); beyond it the optimizers overflow."""
MAX_TV_WEIGHT = 1e6


def require_converging(loss: torch.Tensor | float, field: str, step: int) -> None:
    """Raises when the loss of `step` is NaN or infinite (reads the loss: a device sync)."""
    value = float(loss.detach()) if isinstance(loss, torch.Tensor) else loss
    if not math.isfinite(value):
        raise InvalidArgument(
            field,
            f"the optimization diverged by step {step} (the loss is {value}); "
            "lower the learning rate",
            reason=Reason.OPTIMIZATION_DIVERGED,
        )
