"""Cross-request batching of GetActivations on a real server: requests queued behind a busy
compute slot run as one forward, and each caller gets exactly what it gets alone."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import DEVICE, start
from skimage import data as skdata
from waiting import sample, wait_until

from vitscope import Client, InvalidArgumentError
from vitscope.client import Activations, image_message
from vitscope.v1 import activations_pb2 as pb
from vitscope.v1 import features_pb2, inspector_pb2_grpc, tensor_pb2
from vitscope_server.transport.app import RunningServer

PHOTOS = [skdata.astronaut(), skdata.chelsea(), skdata.coffee(), skdata.rocket()]


@pytest.fixture(scope="module")
def one_slot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One compute slot, so requests queue behind whatever holds it."""
    running = start(
        tmp_path_factory.mktemp("batching"), default_model="vit", max_running=1, max_queue=16
    )
    yield running
    running.stop(0)


def _wait_for_queued(server: RunningServer, count: int) -> None:
    """Waits on the server's own queue gauge."""
    wait_until(
        lambda: sample(server, "vitscope_queued_requests") == count, f"{count} queued requests"
    )


class SlotHolder:
    """Holds the only compute slot with a long feature optimisation until released."""

    def __init__(self, server: RunningServer) -> None:
        self._client = Client(f"127.0.0.1:{server.port}")
        self._stub = inspector_pb2_grpc.InspectorStub(self._client._channel)
        request = features_pb2.OptimizeFeaturesRequest(
            model="vit",
            features=[features_pb2.Feature(site="blocks.1.mlp.hidden", channel=0)],
            parameters=features_pb2.OptimizationParameters(steps=100_000),
            progress_every=1,
        )
        self._call = self._stub.OptimizeFeatures(request, timeout=120)
        next(self._call)  # a progress message: the optimisation holds the slot

    def release(self) -> None:
        self._call.cancel()
        self._client.close()


# Every kind of request: sites, token selections, reductions, output dtypes, predictions,
# several images, and one whose own token index is out of range.
REQUESTS: list[dict[str, Any]] = [
    {"sites": ["blocks.1.out"], "images": [0]},
    {"sites": ["blocks.0.mlp.hidden", "final"], "tokens": "indices", "indices": [0, 3, 5]},
    {"sites": ["blocks.1.out"], "reduction": "mean", "dtype": "float16", "images": [1, 2]},
    {"sites": ["blocks.1.mlp.hidden"], "reduction": "patch_map", "channels": [1, 4]},
    {"sites": ["blocks.0.out"], "reduction": "top_channels", "top_k": 3, "dtype": "bfloat16"},
    {"sites": ["embed"], "tokens": "positions", "positions": [(0, 1), (2, 2)]},
    {"sites": ["blocks.1.attn.out"], "top_predictions": 3, "images": [3]},
    {"sites": ["blocks.0.out", "blocks.1.out"], "tokens": "prefix", "top_predictions": 2},
    {"sites": ["blocks.1.out"], "tokens": "indices", "indices": [10_000]},
]
# Explicit attention probabilities change the kernel for every image: a batch of its own.
ATTENTION_REQUEST: dict[str, Any] = {"sites": ["blocks.1.attn.probs"], "images": [2]}


def _call(client: Client, spec: dict[str, Any]) -> Activations | Exception:
    kwargs = {k: v for k, v in spec.items() if k != "images"}
    images = [PHOTOS[i] for i in spec.get("images", [0])]
    try:
        return client.activations(images, model="vit", **kwargs)
    except InvalidArgumentError as exc:
        return exc


def _assert_same(alone: Activations | Exception, batched: Activations | Exception) -> None:
    """Bit for bit on the CPU; on a GPU, where kernels may depend on the batch size, within
    float32 rounding."""
    if isinstance(alone, Exception):
        assert type(batched) is type(alone) and str(batched) == str(alone)
        return
    assert isinstance(batched, Activations)
    assert batched.sites.keys() == alone.sites.keys()
    for name, site in alone.sites.items():
        other = batched.sites[name]
        assert other.values.dtype == site.values.dtype
        if DEVICE == "cpu":
            np.testing.assert_array_equal(other.values, site.values, err_msg=name)
        else:
            np.testing.assert_allclose(other.values, site.values, rtol=1e-3, atol=1e-4)
        assert other.token_indices == site.token_indices
        if site.channel_indices is not None and DEVICE == "cpu":
            np.testing.assert_array_equal(other.channel_indices, site.channel_indices)
    if DEVICE == "cpu":
        assert batched.predictions == alone.predictions
    else:
        for got, expected in zip(batched.predictions, alone.predictions, strict=True):
            assert [p.class_index for p in got] == [p.class_index for p in expected]


def _batches(server: RunningServer) -> tuple[float, float]:
    labels = {"method": "GetActivations", "model": "vit"}
    return (
        sample(server, "vitscope_batch_images_count", **labels),
        sample(server, "vitscope_batch_images_sum", **labels),
    )


def _run_queued(
    server: RunningServer, calls: list[Callable[[], Any]], while_queued: Callable[[], None]
) -> list[Any]:
    """Starts every call behind a held slot, runs while_queued once all wait, then releases."""
    holder = SlotHolder(server)
    with ThreadPoolExecutor(len(calls)) as pool:
        try:
            futures = [pool.submit(call) for call in calls]
            _wait_for_queued(server, len(calls))
            while_queued()
        finally:
            holder.release()
        return [f.result() for f in futures]


def test_mixed_requests_share_a_forward_and_match_running_alone(one_slot: RunningServer) -> None:
    specs = [*REQUESTS, ATTENTION_REQUEST]
    with Client(f"127.0.0.1:{one_slot.port}", timeout=60) as client:
        alone = [_call(client, spec) for spec in specs]
        count, images = _batches(one_slot)
        batched = _run_queued(one_slot, [lambda s=s: _call(client, s) for s in specs], lambda: None)
    for expected, got in zip(alone, batched, strict=True):
        _assert_same(expected, got)
    assert isinstance(alone[-2], InvalidArgumentError)
    new_count, new_images = _batches(one_slot)
    assert new_count - count == 2  # everything in one forward, the attention request in another
    assert new_images - images == sum(len(s.get("images", [0])) for s in specs)


def test_a_cancelled_request_leaves_the_queue_and_the_others_complete(
    one_slot: RunningServer,
) -> None:
    target = f"127.0.0.1:{one_slot.port}"
    specs = REQUESTS[:2]
    with Client(target, timeout=60) as client, Client(target) as raw:
        alone = [_call(client, spec) for spec in specs]
        stub = inspector_pb2_grpc.InspectorStub(raw._channel)
        request = pb.GetActivationsRequest(
            model="vit", sites=["embed"], images=[image_message(PHOTOS[0])]
        )
        doomed = stub.GetActivations(request, timeout=60)

        def consume() -> grpc.StatusCode:
            try:
                list(doomed)
            except grpc.RpcError as exc:
                return exc.code()  # type: ignore[no-any-return]
            return grpc.StatusCode.OK

        def cancel_one() -> None:
            doomed.cancel()
            _wait_for_queued(one_slot, len(specs))  # it left at once, not when the batch ran

        calls: list[Callable[[], Any]] = [lambda s=s: _call(client, s) for s in specs]
        *batched, code = _run_queued(one_slot, [*calls, consume], cancel_one)
    assert code is grpc.StatusCode.CANCELLED
    for expected, got in zip(alone, batched, strict=True):
        _assert_same(expected, got)


@pytest.mark.parametrize("compute_dtype", ["bfloat16", "float16"])
def test_reduced_precision_compute_is_close_to_float32(client: Client, compute_dtype: str) -> None:
    """Autocast keeps float32 accumulation in the matmuls: within 5% of the largest value."""
    sites = ["blocks.0.out", "blocks.1.mlp.hidden", "final"]
    exact = client.activations(PHOTOS[:2], sites, model="vit")
    reduced = client.activations(PHOTOS[:2], sites, model="vit", compute_dtype=compute_dtype)
    assert reduced.parameters["compute_dtype"] == f"DTYPE_{compute_dtype.upper()}"
    for site in sites:
        scale = float(np.abs(exact[site]).max())
        np.testing.assert_allclose(reduced[site], exact[site], atol=0.05 * scale, rtol=0.05)
        assert not np.array_equal(reduced[site], exact[site])


def test_compute_dtype_must_be_a_float_type(client: Client) -> None:
    stub = inspector_pb2_grpc.InspectorStub(client._channel)
    request = pb.GetActivationsRequest(
        model="vit",
        sites=["embed"],
        images=[image_message(PHOTOS[0])],
        compute_dtype=tensor_pb2.DTYPE_INT64,
    )
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.GetActivations(request))
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "compute_dtype" in str(caught.value.details())
