"""Cross-request batching of GetActivations on a real server: requests queued behind a busy
compute slot run as one forward, and each caller gets exactly what it gets alone."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from skimage import data as skdata
from support.queueing import batches, run_queued, run_queued_cancelling_one
from support.servers import DEVICE, start

from vitscope import Client, InvalidArgumentError
from vitscope.client import Activations, image_message
from vitscope.v1 import activations_pb2 as pb
from vitscope.v1 import inspector_pb2_grpc, tensor_pb2
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


# Every kind of request: sites, token selections, reductions, output dtypes, predictions,
# several images, and one whose token index is out of range at a raw module path (whose
# shape only the forward shows, so it fails in the batch without failing the others).
REQUESTS: list[dict[str, Any]] = [
    {"sites": ["blocks.1.out"], "images": [0]},
    {"sites": ["blocks.0.mlp.hidden", "final"], "tokens": "indices", "indices": [0, 3, 5]},
    {"sites": ["blocks.1.out"], "reduction": "mean", "dtype": "float16", "images": [1, 2]},
    {"sites": ["blocks.1.mlp.hidden"], "reduction": "patch_map", "channels": [1, 4]},
    {"sites": ["blocks.0.out"], "reduction": "top_channels", "top_k": 3, "dtype": "bfloat16"},
    {"sites": ["embed"], "tokens": "positions", "positions": [(0, 1), (2, 2)]},
    {"sites": ["blocks.1.attn.out"], "top_predictions": 3, "images": [3]},
    {"sites": ["blocks.0.out", "blocks.1.out"], "tokens": "prefix", "top_predictions": 2},
    {"sites": ["blocks.1.mlp.fc1"], "tokens": "indices", "indices": [10_000]},
]
# The same mistake at a canonical site is refused before it queues: the probe measured it.
EARLY_MISTAKE: dict[str, Any] = {
    "sites": ["blocks.1.out"],
    "tokens": "indices",
    "indices": [10_000],
}
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


def test_mixed_requests_share_a_forward_and_match_running_alone(one_slot: RunningServer) -> None:
    specs = [*REQUESTS, ATTENTION_REQUEST]
    with Client(f"127.0.0.1:{one_slot.port}", timeout=60) as client:
        alone = [_call(client, spec) for spec in specs]
        count, images = batches(one_slot, "GetActivations", "vit")
        refused: list[Activations | Exception] = []
        batched = run_queued(
            one_slot,
            [lambda s=s: _call(client, s) for s in specs],
            lambda: refused.append(_call(client, EARLY_MISTAKE)),
        )
    for expected, got in zip(alone, batched, strict=True):
        _assert_same(expected, got)
    assert isinstance(alone[-2], InvalidArgumentError)
    # Answered while the only slot was held and ten requests queued: it never waited.
    assert isinstance(refused[0], InvalidArgumentError) and "tokens.indices" in str(refused[0])
    new_count, new_images = batches(one_slot, "GetActivations", "vit")
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
        calls: list[Callable[[], Any]] = [lambda s=s: _call(client, s) for s in specs]
        batched, code = run_queued_cancelling_one(
            one_slot, calls, lambda: stub.GetActivations(request, timeout=60)
        )
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
