"""The device path, per device: the GPU memory gauge, CUDA out-of-memory as
RESOURCE_EXHAUSTED with the server still serving, and batched results on each device.
The cuda variants skip where torch finds no CUDA device."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from skimage import data as skdata

from vitscope import Client, ResourceExhaustedError
from vitscope_server.settings import ServerSettings
from vitscope_server.transport.app import RunningServer, create_server

NO_CUDA = "torch finds no CUDA device"
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)),
]


@pytest.fixture(scope="module", params=DEVICES)
def device_server(request: pytest.FixtureRequest) -> Iterator[RunningServer]:
    settings = ServerSettings(
        host="127.0.0.1",
        port=0,
        metrics_port=-1,
        builtin_models=False,
        models=["big=timm:vit_tiny_patch16_224@random"],
        device=request.param,
        max_running=1,
    )
    running = create_server(settings)
    assert running.registry.wait_until_settled(timeout=300)
    yield running
    running.stop(0)


def _device(server: RunningServer) -> str:
    return str(server.registry.get("big").device.type)


def test_gpu_memory_gauge_reports_the_model(device_server: RunningServer) -> None:
    value = device_server.metrics.registry.get_sample_value("vitscope_gpu_memory_bytes")
    if not torch.cuda.is_available():
        assert value is None  # no GPU: the gauge is not exported
        return
    if _device(device_server) == "cuda":
        module = device_server.registry.get("big").adapter.module
        assert value is not None and value >= sum(p.numel() * 4 for p in module.parameters())


def test_reduced_precision_on_the_device(device_server: RunningServer) -> None:
    """bfloat16 autocast on either device; float16 where it is fast (the GPU)."""
    photos = [skdata.astronaut(), skdata.coffee()]
    dtypes = ["bfloat16", "float16"] if _device(device_server) == "cuda" else ["bfloat16"]
    with Client(f"127.0.0.1:{device_server.port}", timeout=300) as client:
        exact = client.activations(photos, ["blocks.11.out"], model="big")["blocks.11.out"]
        for dtype in dtypes:
            reduced = client.activations(
                photos, ["blocks.11.out"], model="big", compute_dtype=dtype
            )["blocks.11.out"]
            scale = float(np.abs(exact).max())
            np.testing.assert_allclose(reduced, exact, atol=0.05 * scale, rtol=0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_cuda_out_of_memory_is_resource_exhausted_and_serving_goes_on(
    device_server: RunningServer,
) -> None:
    if _device(device_server) != "cuda":
        pytest.skip("the out-of-memory path is the GPU's")
    images = [np.zeros((3, 224, 224), np.float32)] * 32
    total = torch.cuda.get_device_properties(0).total_memory
    target = f"127.0.0.1:{device_server.port}"
    with Client(target, timeout=300, retries=1) as client:
        torch.cuda.empty_cache()
        allowed = (torch.cuda.memory_allocated() + (8 << 20)) / total
        torch.cuda.set_per_process_memory_fraction(allowed)
        try:
            with pytest.raises(ResourceExhaustedError, match="memory"):
                client.activations(images, ["blocks.11.mlp.hidden"], model="big")
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
        result = client.activations(images[:2], ["blocks.11.out"], model="big")
        assert result["blocks.11.out"].shape[0] == 2
