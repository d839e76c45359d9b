"""Per-request lookups that are computed once: a model's memory footprint and the metric
series a request touches."""

from __future__ import annotations

import dataclasses

import torch
from prometheus_client import CollectorRegistry

from vitscope_server.core.model.loading import load_model
from vitscope_server.core.model.specs import ModelSpec
from vitscope_server.core.runtime.budget import ModelFootprint
from vitscope_server.core.runtime.stages import Stage, StageTimes
from vitscope_server.transport.metrics import Metrics, labelled


def test_a_footprint_is_measured_once_per_settled_anatomy() -> None:
    adapter = load_model(ModelSpec(name="m", architecture="test_vit"), torch.device("cpu")).adapter
    first = ModelFootprint.of(adapter)
    assert ModelFootprint.of(adapter) is first
    wider = [dataclasses.replace(block, width=block.width * 2) for block in adapter.blocks]
    adapter.settle(wider, [], final_ok=True)
    resettled = ModelFootprint.of(adapter)
    assert resettled.forward_bytes == 2 * first.forward_bytes
    assert resettled.input_bytes == first.input_bytes


def test_a_labelled_series_is_the_registry_s_own_and_counts_in_it() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    series = labelled(metrics.requests, "GetActivations", "m", "OK")
    assert series is metrics.requests.labels("GetActivations", "m", "OK")
    assert labelled(metrics.requests, "GetActivations", "m", "OK") is series
    series.inc()
    labelled(metrics.requests, "GetActivations", "m", "OK").inc()
    value = registry.get_sample_value(
        "vitscope_requests_total", {"method": "GetActivations", "model": "m", "code": "OK"}
    )
    assert value == 2.0


def test_timed_blocks_add_up_per_stage_even_when_the_block_raises() -> None:
    stages = StageTimes()
    with stages.timing(Stage.ENCODE):
        pass
    try:
        with stages.timing(Stage.ENCODE):
            raise ValueError("inside")
    except ValueError:
        pass
    assert set(stages.seconds) == {Stage.ENCODE}
    assert stages.seconds[Stage.ENCODE] > 0.0
