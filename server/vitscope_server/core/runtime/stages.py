"""Where a request's time goes, stage by stage, so the server can say what its own work costs
beside the model's (the stages Triton reports as queue, compute input, infer and output)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
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

    @contextmanager
    def timing(self, stage: Stage) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - started)
