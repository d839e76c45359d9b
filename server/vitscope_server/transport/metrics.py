"""Prometheus metrics: prefix vitscope_, base units, labels method/model/code only."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

from vitscope_server.core.runtime.stages import Stage, StageTimes

_STAGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0, 10.0)
_LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)


def _admission_gauges(registry: CollectorRegistry) -> tuple[Gauge, Gauge]:
    """Requests waiting for compute, and the bytes admitted requests hold."""
    queued = Gauge(
        "vitscope_queued_requests", "Requests waiting for a compute slot.", registry=registry
    )
    reserved = Gauge(
        "vitscope_memory_reserved_bytes",
        "Estimated bytes held by admitted requests (the server memory budget in use).",
        registry=registry,
    )
    return queued, reserved


def _batch_histograms(registry: CollectorRegistry) -> tuple[Histogram, Histogram]:
    """Images per batched forward, and how long a batch waited for arriving requests."""
    images = Histogram(
        "vitscope_batch_images",
        "Images per batched forward (requests for one model that arrived together).",
        ["method", "model"],
        buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        registry=registry,
    )
    delay = Histogram(
        "vitscope_batch_delay_seconds",
        "Time a batch waited for more requests to arrive before it ran.",
        ["method", "model"],
        buckets=(0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05),
        registry=registry,
    )
    return images, delay


@lru_cache(maxsize=4096)
def labelled(metric: MetricWrapperBase, *labels: str) -> Any:
    """metric.labels(*labels), looked up once: each request touches a dozen series, and
    prometheus_client checks and locks on every lookup. Series are never removed."""
    return metric.labels(*labels)


def _stage_histograms(registry: CollectorRegistry) -> dict[Stage, Histogram]:
    """One histogram per stage of a request (queue waits are vitscope_queue_wait_seconds)."""
    return {
        stage: Histogram(
            f"vitscope_{stage.value}_seconds",
            f"Time a request spent in its {stage.value.replace('_', ' ')} stage.",
            ["method", "model"],
            buckets=_STAGE_BUCKETS,
            registry=registry,
        )
        for stage in Stage
        if stage is not Stage.QUEUE
    }


class Metrics:
    """One set per server, on its own registry so several servers can share a process."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "vitscope_requests_total",
            "RPCs finished, by method, model and status code.",
            ["method", "model", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "vitscope_request_duration_seconds",
            "Wall time of an RPC from arrival to its last message.",
            ["method", "model", "code"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "vitscope_queue_wait_seconds",
            "Time spent waiting for a compute slot.",
            ["method", "model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.compute = Histogram(
            "vitscope_compute_seconds",
            "Time holding a compute slot.",
            ["method", "model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.sent_bytes = Counter(
            "vitscope_sent_bytes_total",
            "Serialized response bytes sent.",
            ["method", "model"],
            registry=r,
        )
        self.in_flight = Gauge(
            "vitscope_requests_in_flight", "RPCs being served now.", ["method"], registry=r
        )
        self.model_load = Gauge(
            "vitscope_model_load_seconds",
            "Seconds the last load of a model took.",
            ["model"],
            registry=r,
        )
        self.model_ready = Gauge(
            "vitscope_model_ready", "1 when the model serves requests.", ["model"], registry=r
        )
        self.optimization_steps = Counter(
            "vitscope_optimization_steps_total",
            "Optimization steps run (feature visualization, inversion).",
            ["method", "model"],
            registry=r,
        )
        self.batch_images, self.batch_delay = _batch_histograms(r)
        self.queued, self.memory_reserved = _admission_gauges(r)
        self.stages = _stage_histograms(r)

    def record_stages(self, method: str, model: str, stages: StageTimes) -> None:
        """Every stage but the queue, which record_batched observes with the compute time."""
        for stage, seconds in stages.seconds.items():
            if stage is not Stage.QUEUE:
                labelled(self.stages[stage], method, model).observe(seconds)

    def watch_gpu_memory(self) -> None:
        """Exports allocated CUDA memory when a GPU is in use."""
        import torch

        if torch.cuda.is_available():
            gauge = Gauge(
                "vitscope_gpu_memory_bytes",
                "CUDA memory allocated by tensors.",
                registry=self.registry,
            )
            gauge.set_function(lambda: float(torch.cuda.memory_allocated()))
