"""Admission by memory budget: images are sized from their headers and from what the model's
resize would build, and requests are held to a per-request and a server-wide budget."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image
from support.waiting import HANG_SECONDS, wait_until

from vitscope import Client, ResourceExhaustedError
from vitscope_server.core.model.loading import LoadedModel
from vitscope_server.core.runtime.budget import MemoryBudget, RequestTooLarge, ServerBudgetExceeded
from vitscope_server.core.runtime.cancel import CancelToken
from vitscope_server.core.runtime.errors import Cancelled
from vitscope_server.settings import ServerSettings
from vitscope_server.transport.app import RunningServer, create_server

MODEL = "tiny"
MIB = 1 << 20


def _png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height)).save(out, format="PNG", optimize=True)
    return out.getvalue()


@pytest.fixture(scope="module")
def tight() -> Iterator[RunningServer]:
    settings = ServerSettings(
        host="127.0.0.1",
        port=0,
        metrics_port=-1,
        builtin_models=False,
        models=[f"{MODEL}=timm:test_vit@random"],
        request_memory_bytes=64 * MIB,
        server_memory_bytes=48 * MIB,
    )
    running = create_server(settings)
    assert running.registry.wait_until_settled(120)
    yield running
    running.stop(0)


def _steps_peak(loaded: LoadedModel, image: Image.Image) -> int:
    """The most pixels any step of the model's transform holds, by running the steps."""
    peak = image.width * image.height
    current: object = image
    for step in loaded.adapter._transform.transforms:  # type: ignore[attr-defined]
        current = step(current)
        if isinstance(current, Image.Image):
            peak = max(peak, current.width * current.height)
        else:
            peak = max(peak, int(np.prod(current.shape[-2:])))  # type: ignore[attr-defined]
    return peak


@pytest.mark.parametrize("model", ["vit", "deit", "swin", "clip", "clip-pooled"])
@pytest.mark.parametrize("size", [(7, 900), (900, 7), (64, 64), (300, 17)])
def test_resize_peak_matches_running_the_transform(
    loaded: dict[str, LoadedModel], model: str, size: tuple[int, int]
) -> None:
    image = Image.new("RGB", size)
    expected = _steps_peak(loaded[model], image)
    assert loaded[model].adapter.preprocess_peak_pixels(*size) == expected


@pytest.mark.parametrize("size", [(1, 1_000_000), (1_000_000, 1)])
def test_extreme_aspect_png_is_refused_from_its_header(
    client: Client, size: tuple[int, int]
) -> None:
    data = _png(*size)
    assert len(data) < 10_000
    with pytest.raises(
        ResourceExhaustedError, match=r"images\[0\]\.encoded: the model's resize"
    ) as caught:
        client.activations([data], ["blocks.0.out"])
    assert caught.value.reason == "IMAGE_TOO_LARGE"
    assert client.activations([_png(64, 64)], ["blocks.0.out"]).sites["blocks.0.out"].values.size


def test_extreme_aspect_pixels_are_refused(client: Client) -> None:
    pixels = np.zeros((1, 200_000, 3), np.uint8)
    with pytest.raises(ResourceExhaustedError, match="max_image_pixels"):
        client.activations([pixels], ["blocks.0.out"])


def test_request_over_its_budget_is_refused(tight: RunningServer) -> None:
    with Client(f"127.0.0.1:{tight.port}", timeout=60) as c:
        # 4000 x 4000 decodes to 16 M pixels: far over 64 MiB once decoded and converted.
        with pytest.raises(ResourceExhaustedError, match="request_memory_bytes") as caught:
            c.activations([_png(4000, 4000)], ["blocks.0.out"], model=MODEL)
        assert caught.value.reason == "REQUEST_BUDGET_EXCEEDED"
        # Under the request budget but over the server's.
        with pytest.raises(ResourceExhaustedError, match="server_memory_bytes") as caught:
            c.activations([_png(2200, 2200)], ["blocks.0.out"], model=MODEL)
        assert caught.value.reason == "REQUEST_BUDGET_EXCEEDED"
        small = c.activations([_png(160, 160)], ["blocks.0.out"], model=MODEL)
    assert small.sites["blocks.0.out"].values.shape[0] == 1
    assert tight.metrics.registry.get_sample_value("vitscope_memory_reserved_bytes") == 0


def test_a_waiter_cancelled_while_it_waits_leaves_at_once() -> None:
    """Cancelled mid-wait (not before), a waiter leaves the queue while the budget is still
    full, and the next request is admitted once there is room."""
    budget = MemoryBudget(request_bytes=100, server_bytes=100, max_waiting=2)
    cancel = CancelToken()
    outcome: list[BaseException] = []

    def waiter() -> None:
        try:
            with budget.reserve(50, cancel):
                pass
        except Cancelled as exc:
            outcome.append(exc)

    with budget.reserve(80, CancelToken()):
        thread = threading.Thread(target=waiter)
        thread.start()
        wait_until(lambda: budget.waiting == 1, "the waiter to queue")
        cancel.cancel()
        thread.join(HANG_SECONDS)
        assert not thread.is_alive() and len(outcome) == 1
        assert budget.waiting == 0 and budget.reserved == 80
    with budget.reserve(50, CancelToken()):
        assert budget.reserved == 50


def test_budget_queues_refuses_and_honours_cancel() -> None:
    budget = MemoryBudget(request_bytes=100, server_bytes=100, max_waiting=1)
    with pytest.raises(RequestTooLarge, match="request_memory_bytes"):
        budget.reserve(101, CancelToken()).__enter__()
    admitted = threading.Event()
    cancel = CancelToken()
    with budget.reserve(60, CancelToken()):
        assert budget.reserved == 60

        def second() -> None:
            with budget.reserve(50, CancelToken()):
                admitted.set()

        waiter = threading.Thread(target=second)
        waiter.start()
        wait_until(lambda: budget.waiting == 1, "the second request to queue")
        with pytest.raises(ServerBudgetExceeded, match="1 requests waiting") as full:
            budget.reserve(50, cancel).__enter__()
        assert full.value.retry_after == 1.0
        assert not admitted.is_set()
    waiter.join(10)
    assert admitted.is_set() and budget.reserved == 0
    with budget.reserve(90, CancelToken()):
        cancel.cancel()
        with pytest.raises(Cancelled):
            budget.reserve(20, cancel).__enter__()
    assert budget.reserved == 0
