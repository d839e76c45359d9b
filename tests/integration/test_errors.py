"""Every bad input gets the right status and reason, a field violation naming the field, and
the server keeps serving."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from vitscope import (
    Client,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    VitscopeError,
)
from vitscope.errors import from_rpc_error
from vitscope.v1 import activations_pb2, common_pb2, tensor_pb2
from vitscope.v1 import inspector_pb2_grpc as pb_grpc
from vitscope_server.transport.app import RunningServer

DIGIT = np.zeros((28, 28), dtype=np.uint8)


def good_image(client: Client) -> np.ndarray:
    return np.zeros(client.describe("vit").input_size, dtype=np.float32)


CASES = [
    # (description, kwargs for client.activations, error, reason, field at fault)
    (
        "undecodable image",
        {"images": [b"not an image"]},
        InvalidArgumentError,
        "IMAGE_UNDECODABLE",
        "images[0].encoded",
    ),
    ("unknown model", {"model": "nope"}, NotFoundError, "MODEL_NOT_FOUND", "model"),
    (
        "unknown site",
        {"sites": ["blocks.1.nothing"]},
        NotFoundError,
        "SITE_NOT_FOUND",
        "sites[0]",
    ),
    (
        "block out of range",
        {"sites": ["blocks.99.out"]},
        NotFoundError,
        "SITE_NOT_FOUND",
        "sites[0]",
    ),
    ("no sites", {"sites": []}, InvalidArgumentError, "FIELD_REQUIRED", "sites"),
    (
        "repeated site",
        {"sites": ["embed", "embed"]},
        InvalidArgumentError,
        "INVALID_FIELD",
        "sites",
    ),
    (
        "one site under two spellings",
        {"sites": ["blocks.1.out", "blocks.01.out"]},
        InvalidArgumentError,
        "INVALID_FIELD",
        "sites",
    ),
    (
        "more indices than tokens",
        {"tokens": "indices", "indices": [0] * 5000},
        InvalidArgumentError,
        "INVALID_FIELD",
        "tokens",
    ),
    (
        "indices mode with no indices",
        {"tokens": "indices"},
        InvalidArgumentError,
        "FIELD_REQUIRED",
        "tokens.indices",
    ),
    (
        "positions mode with no positions",
        {"tokens": "positions"},
        InvalidArgumentError,
        "FIELD_REQUIRED",
        "tokens.positions",
    ),
    (
        "empty pixels",
        {"images": [np.zeros((0, 0), dtype=np.uint8)]},
        InvalidArgumentError,
        "INVALID_FIELD",
        "images[0].pixels",
    ),
    (
        "token index out of range",
        {"tokens": "indices", "indices": [0, 4000]},
        InvalidArgumentError,
        "INVALID_FIELD",
        "tokens.indices[1]",
    ),
    (
        "position outside the grid",
        {"tokens": "positions", "positions": [(0, 0), (1, 1), (0, 99)]},
        InvalidArgumentError,
        "INVALID_FIELD",
        "tokens.positions[2]",
    ),
    (
        "channel out of range",
        {"reduction": "patch_map", "channels": [1, 999]},
        InvalidArgumentError,
        "INVALID_FIELD",
        "channels[1]",
    ),
    (
        "patch map without channels",
        {"reduction": "patch_map"},
        InvalidArgumentError,
        "FIELD_REQUIRED",
        "channels",
    ),
    (
        "top_k missing",
        {"reduction": "top_channels"},
        InvalidArgumentError,
        "INVALID_FIELD",
        "top_k",
    ),
    (
        "top_k too large",
        {"reduction": "top_channels", "top_k": 10_000},
        InvalidArgumentError,
        "INVALID_FIELD",
        "top_k",
    ),
    (
        "too many predictions",
        {"top_predictions": 5000},
        InvalidArgumentError,
        "INVALID_FIELD",
        "top_predictions",
    ),
    (
        "predictions of a model without a classifier",
        {"model": "clip", "top_predictions": 1},
        FailedPreconditionError,
        "NO_CLASSIFIER",
        "top_predictions",
    ),
    (
        "patch map of attention",
        {"sites": ["blocks.0.attn.probs"], "reduction": "patch_map", "channels": [0]},
        InvalidArgumentError,
        "INVALID_FIELD",
        "reduction",
    ),
    (
        "preprocessed tensor of the wrong shape",
        {"images": [np.zeros((3, 10, 10), dtype=np.float32)]},
        InvalidArgumentError,
        "INVALID_FIELD",
        "images[0].preprocessed",
    ),
    (
        "pixels of the wrong shape",
        {"images": [np.zeros((4, 4, 5), dtype=np.uint8)]},
        InvalidArgumentError,
        "INVALID_FIELD",
        "images[0].pixels",
    ),
    (
        "non-finite preprocessed tensor",
        {"images": [np.full((3, 160, 160), np.nan, dtype=np.float32)]},
        InvalidArgumentError,
        "INVALID_FIELD",
        "images[0].preprocessed",
    ),
    (
        "too many images",
        {"images": [DIGIT] * 65},
        ResourceExhaustedError,
        "BATCH_TOO_LARGE",
        "images",
    ),
]


@pytest.mark.parametrize(
    ("description", "kwargs", "error", "reason", "field"), CASES, ids=[c[0] for c in CASES]
)
def test_bad_activation_requests(
    client: Client,
    description: str,
    kwargs: dict,
    error: type[VitscopeError],
    reason: str,
    field: str,
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
    assert caught.value.reason == reason, caught.value.details
    assert caught.value.metadata["field"] == field
    assert caught.value.metadata["model"] == request["model"]
    if error is InvalidArgumentError:
        assert [v.field for v in caught.value.field_violations] == [field]
        assert caught.value.field_violations[0].description
    assert client.activations([good_image(client)], ["embed"], model="vit")["embed"].shape[0] == 1


def _raw_call(
    server: RunningServer, request: activations_pb2.GetActivationsRequest
) -> VitscopeError:
    """The typed error of a request sent as built, past the client's own checks."""
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.InspectorStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.GetActivations(request, timeout=30))
    return from_rpc_error(caught.value)


def _field(error: VitscopeError) -> str:
    assert isinstance(error, InvalidArgumentError), error
    (violation,) = error.field_violations
    return violation.field


def _with_tensor(**image: tensor_pb2.Tensor) -> activations_pb2.GetActivationsRequest:
    return activations_pb2.GetActivationsRequest(
        model="vit", sites=["embed"], images=[common_pb2.Image(**image)]
    )


def test_tensor_bytes_that_do_not_fit_the_shape(server: RunningServer) -> None:
    tensor = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[3, 160, 160], data=b"\0" * 12)
    error = _raw_call(server, _with_tensor(preprocessed=tensor))
    assert error.reason == "INVALID_FIELD" and _field(error) == "images[0].preprocessed"


@pytest.mark.parametrize(
    "shape",
    [[2**32, 2**32], [0, 2**62], [2**62, 0, 2**62], [0, 2**40, 3], [1] * 9],
    ids=["overflowing", "empty-and-huge", "huge-around-empty", "empty-image", "too-many-dims"],
)
def test_tensor_shapes_no_array_can_have(server: RunningServer, shape: list[int]) -> None:
    tensor = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_UINT8, shape=shape, data=b"")
    error = _raw_call(server, _with_tensor(pixels=tensor))
    assert error.reason == "INVALID_FIELD" and _field(error).startswith("images[0].pixels")
    error = _raw_call(server, _with_tensor(preprocessed=tensor))
    assert error.reason == "INVALID_FIELD" and _field(error).startswith("images[0].preprocessed")


def test_unsupported_tensor_dtype(server: RunningServer) -> None:
    tensor = tensor_pb2.Tensor(
        dtype=tensor_pb2.DTYPE_INT64, shape=[3, 160, 160], data=b"\0" * (8 * 3 * 160 * 160)
    )
    error = _raw_call(server, _with_tensor(preprocessed=tensor))
    assert error.reason == "INVALID_FIELD" and _field(error) == "images[0].preprocessed"


def test_unknown_enum_values(server: RunningServer) -> None:
    image = common_pb2.Image(encoded=b"x")
    request = activations_pb2.GetActivationsRequest(
        model="vit", sites=["embed"], images=[image], reduction=42
    )
    error = _raw_call(server, request)
    assert error.reason == "INVALID_FIELD" and _field(error) == "reduction"
    assert "REDUCTION_MEAN" in error.field_violations[0].description  # says what is allowed
    request = activations_pb2.GetActivationsRequest(
        model="vit", sites=["embed"], images=[image], output_dtype=9
    )
    assert _field(_raw_call(server, request)) == "output_dtype"


def test_image_without_a_source(server: RunningServer) -> None:
    error = _raw_call(
        server,
        activations_pb2.GetActivationsRequest(
            model="vit", sites=["embed"], images=[common_pb2.Image()]
        ),
    )
    assert error.reason == "FIELD_REQUIRED" and _field(error) == "images[0]"


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
    with pytest.raises(NotFoundError) as caught:
        client.describe("missing-model")
    assert caught.value.reason == "MODEL_NOT_FOUND"
    assert caught.value.resource == ("model", "missing-model")
