"""Every bad input gets the right status and a message naming the field; the server keeps serving."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from vitscope import (
    Client,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    VitscopeError,
)
from vitscope.v1 import activations_pb2, common_pb2, tensor_pb2
from vitscope.v1 import inspector_pb2_grpc as pb_grpc
from vitscope_server.transport.app import RunningServer

DIGIT = np.zeros((28, 28), dtype=np.uint8)


def good_image(client: Client) -> np.ndarray:
    return np.zeros(client.describe("vit").input_size, dtype=np.float32)


CASES = [
    # (description, kwargs for client.activations, expected error, words the message must contain)
    (
        "undecodable image",
        {"images": [b"not an image"]},
        InvalidArgumentError,
        ["images[0].encoded", "PNG"],
    ),
    ("unknown model", {"model": "nope"}, NotFoundError, ["nope", "served models"]),
    (
        "unknown site",
        {"sites": ["blocks.1.nothing"]},
        NotFoundError,
        ["sites[0]", "blocks.{i}.mlp.hidden"],
    ),
    ("block out of range", {"sites": ["blocks.99.out"]}, NotFoundError, ["block 99", "blocks 0.."]),
    ("no sites", {"sites": []}, InvalidArgumentError, ["sites"]),
    ("repeated site", {"sites": ["embed", "embed"]}, InvalidArgumentError, ["sites"]),
    (
        "one site under two spellings",
        {"sites": ["blocks.1.out", "blocks.01.out"]},
        InvalidArgumentError,
        ["each site may appear once"],
    ),
    (
        "more indices than tokens",
        {"tokens": "indices", "indices": [0] * 5000},
        InvalidArgumentError,
        ["tokens", "at most"],
    ),
    (
        "empty pixels",
        {"images": [np.zeros((0, 0), dtype=np.uint8)]},
        InvalidArgumentError,
        ["images[0].pixels", "empty"],
    ),
    (
        "token index out of range",
        {"tokens": "indices", "indices": [0, 4000]},
        InvalidArgumentError,
        ["tokens.indices", "4000", "allowed 0.."],
    ),
    (
        "position outside the grid",
        {"tokens": "positions", "positions": [(0, 99)]},
        InvalidArgumentError,
        ["tokens.positions", "cols 0.."],
    ),
    (
        "channel out of range",
        {"reduction": "patch_map", "channels": [1, 999]},
        InvalidArgumentError,
        ["channels", "999", "allowed 0.."],
    ),
    ("patch map without channels", {"reduction": "patch_map"}, InvalidArgumentError, ["channels"]),
    ("top_k missing", {"reduction": "top_channels"}, InvalidArgumentError, ["top_k", ">= 1"]),
    (
        "top_k too large",
        {"reduction": "top_channels", "top_k": 10_000},
        InvalidArgumentError,
        ["top_k"],
    ),
    ("too many predictions", {"top_predictions": 5000}, InvalidArgumentError, ["top_predictions"]),
    (
        "patch map of attention",
        {"sites": ["blocks.0.attn.probs"], "reduction": "patch_map", "channels": [0]},
        InvalidArgumentError,
        ["reduction", "attention"],
    ),
    (
        "preprocessed tensor of the wrong shape",
        {"images": [np.zeros((3, 10, 10), dtype=np.float32)]},
        InvalidArgumentError,
        ["images[0].preprocessed", "[3, 10, 10]", "expects"],
    ),
    (
        "pixels of the wrong shape",
        {"images": [np.zeros((4, 4, 5), dtype=np.uint8)]},
        InvalidArgumentError,
        ["images[0].pixels", "allowed"],
    ),
    (
        "non-finite preprocessed tensor",
        {"images": [np.full((3, 160, 160), np.nan, dtype=np.float32)]},
        InvalidArgumentError,
        ["NaN"],
    ),
    ("too many images", {"images": [DIGIT] * 65}, ResourceExhaustedError, ["images", "64"]),
]


@pytest.mark.parametrize(
    ("description", "kwargs", "error", "words"), CASES, ids=[c[0] for c in CASES]
)
def test_bad_activation_requests(
    client: Client, description: str, kwargs: dict, error: type[VitscopeError], words: list[str]
) -> None:
    request = {
        "images": [good_image(client)],
        "sites": ["blocks.1.mlp.hidden"],
        "model": "vit",
        **kwargs,
    }
    images, sites = request.pop("images"), request.pop("sites")
    with pytest.raises(error) as caught:
        client.activations(images, sites, **request)
    for word in words:
        assert word in caught.value.details, (
            f"{description}: {word!r} not in {caught.value.details!r}"
        )
    assert client.activations([good_image(client)], ["embed"], model="vit")["embed"].shape[0] == 1


def _raw_call(
    server: RunningServer, request: activations_pb2.GetActivationsRequest
) -> grpc.RpcError:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.InspectorStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.GetActivations(request, timeout=30))
    return caught.value


def test_tensor_bytes_that_do_not_fit_the_shape(server: RunningServer) -> None:
    tensor = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[3, 160, 160], data=b"\0" * 12)
    error = _raw_call(
        server,
        activations_pb2.GetActivationsRequest(
            model="vit", sites=["embed"], images=[common_pb2.Image(preprocessed=tensor)]
        ),
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "images[0].preprocessed" in error.details() and "12 bytes" in error.details()


def test_tensor_shape_whose_size_overflows(server: RunningServer) -> None:
    tensor = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_UINT8, shape=[2**32, 2**32], data=b"")
    request = activations_pb2.GetActivationsRequest(
        model="vit", sites=["embed"], images=[common_pb2.Image(pixels=tensor)]
    )
    error = _raw_call(server, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "images[0].pixels" in error.details()


def test_unsupported_tensor_dtype(server: RunningServer) -> None:
    tensor = tensor_pb2.Tensor(
        dtype=tensor_pb2.DTYPE_INT64, shape=[3, 160, 160], data=b"\0" * (8 * 3 * 160 * 160)
    )
    error = _raw_call(
        server,
        activations_pb2.GetActivationsRequest(
            model="vit", sites=["embed"], images=[common_pb2.Image(preprocessed=tensor)]
        ),
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "float32 or float16" in error.details()


def test_unknown_enum_values(server: RunningServer) -> None:
    image = common_pb2.Image(encoded=b"x")
    error = _raw_call(
        server,
        activations_pb2.GetActivationsRequest(
            model="vit", sites=["embed"], images=[image], reduction=42
        ),
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "reduction" in error.details() and "REDUCTION_MEAN" in error.details()
    error = _raw_call(
        server,
        activations_pb2.GetActivationsRequest(
            model="vit", sites=["embed"], images=[image], output_dtype=9
        ),
    )
    assert "output_dtype" in error.details() and "DTYPE_FLOAT16" in error.details()


def test_image_without_a_source(server: RunningServer) -> None:
    error = _raw_call(
        server,
        activations_pb2.GetActivationsRequest(
            model="vit", sites=["embed"], images=[common_pb2.Image()]
        ),
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "images[0]" in error.details() and "encoded, pixels or preprocessed" in error.details()


def test_request_over_the_max_message_size(server: RunningServer) -> None:
    oversized = common_pb2.Image(encoded=b"\0" * (65 << 20))
    with (
        grpc.insecure_channel(
            f"127.0.0.1:{server.port}", options=[("grpc.max_send_message_length", 128 << 20)]
        ) as channel,
        pytest.raises(grpc.RpcError) as caught,
    ):
        list(
            pb_grpc.InspectorStub(channel).GetActivations(
                activations_pb2.GetActivationsRequest(
                    model="vit", sites=["embed"], images=[oversized]
                ),
                timeout=60,
            )
        )
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_describe_unknown_model(client: Client) -> None:
    with pytest.raises(NotFoundError, match="served models"):
        client.describe("missing-model")
