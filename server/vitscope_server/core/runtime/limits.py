"""Per-request bounds every method shares; the values come from the server's settings."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RequestLimits:
    """Images per request, pixels per image, and bytes per result."""

    max_batch: int
    max_pixels: int
    max_result_bytes: int
