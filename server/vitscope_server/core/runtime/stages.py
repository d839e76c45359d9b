"""Where a request's time goes, stage by stage, so the server can say what its own work costs
beside the model's (the stages Triton reports as queue, compute input, infer and output)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum


class Stage(Enum):
    DECODE = "decode"  # encoded or raw images to RGB pictures
    PREPROCESS = "preprocess"  # the model's transform, to the input tensor
    QUEUE = "queue"  # waiting for a batch and a compute slot
    FORWARD = "forward"  # the model's forward with the sites captured
    REDUCE = "reduce"  # token selection, reductions and dtype casts, on the device
    DEVICE_TO_HOST = "device_to_host"  # results copied off the device
    ENCODE = "encode"  # results to response messages
    SEND = "send"  # messages handed to gRPC until the last is taken


@dataclass
class StageTimes:
    """Seconds per stage of one request (a batch's stages count for each of its requests)."""

    seconds: dict[Stage, float] = field(default_factory=dict)

    def add(self, stage: Stage, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def update(self, other: StageTimes) -> None:
        for stage, seconds in other.seconds.items():
            self.add(stage, seconds)

    def timing(self, stage: Stage) -> _Timing:
        """A block timed into `stage`."""
        return _Timing(self.seconds, stage)


class _Timing:
    """A plain context manager rather than a generator one: a request times a dozen blocks,
    and this is its cheapest form."""

    __slots__ = ("_seconds", "_stage", "_started")

    def __init__(self, seconds: dict[Stage, float], stage: Stage) -> None:
        self._seconds, self._stage = seconds, stage

    def __enter__(self) -> None:
        self._started = time.perf_counter()

    def __exit__(self, *_: object) -> None:
        elapsed = time.perf_counter() - self._started
        self._seconds[self._stage] = self._seconds.get(self._stage, 0.0) + elapsed
