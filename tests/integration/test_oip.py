"""inference.GRPCInferenceService on the server's own port, over a real channel.

Every output is checked against GetActivations (the same server, the same images), bit for
bit, and the logits against the model's own forward.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from PIL import Image
from support.servers import start

from vitscope import Client
from vitscope.errors import from_rpc_error
from vitscope.oip import grpc_predict_v2_pb2 as oip
from vitscope.oip import grpc_predict_v2_pb2_grpc as oip_grpc
from vitscope_server.builtin import DIGITS_NAME
from vitscope_server.settings import ServerSettings
from vitscope_server.transport.app import RunningServer, create_server

Outputs = oip.ModelInferRequest.InferRequestedOutputTensor


@pytest.fixture(scope="module")
def stub(server: RunningServer) -> Iterator[oip_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield oip_grpc.GRPCInferenceServiceStub(channel)


def _pixels(seed: int, size: int = 40) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size + 8, 3), dtype=np.uint8)


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _bytes_tensor(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def _string(value: str) -> oip.InferParameter:
    return oip.InferParameter(string_param=value)


def _output(response: oip.ModelInferResponse, name: str) -> np.ndarray:
    dtypes = {"FP32": "<f4", "FP16": "<f2", "BF16": "<u2"}
    for index, tensor in enumerate(response.outputs):
        if tensor.name == name:
            raw = response.raw_output_contents[index]
            return np.frombuffer(raw, dtype=dtypes[tensor.datatype]).reshape(tuple(tensor.shape))
    raise AssertionError(f"no output {name}")


def _pixels_request(
    model: str, images: list[np.ndarray], outputs: list[Outputs]
) -> oip.ModelInferRequest:
    batch = np.stack(images)
    return oip.ModelInferRequest(
        model_name=model,
        inputs=[
            oip.ModelInferRequest.InferInputTensor(
                name="PIXELS", datatype="UINT8", shape=list(batch.shape)
            )
        ],
        outputs=outputs,
        raw_input_contents=[batch.tobytes()],
    )


def test_server_and_model_metadata(stub: oip_grpc.GRPCInferenceServiceStub, client: Client) -> None:
    assert stub.ServerLive(oip.ServerLiveRequest()).live
    assert stub.ServerReady(oip.ServerReadyRequest()).ready
    assert stub.ServerMetadata(oip.ServerMetadataRequest()).name == "vitscope"
    assert stub.ModelReady(oip.ModelReadyRequest(name="deit")).ready
    described = client.describe("deit")
    metadata = stub.ModelMetadata(oip.ModelMetadataRequest(name="deit"))
    assert metadata.versions == [described.info.weights_identity]
    inputs = {t.name: (t.datatype, list(t.shape)) for t in metadata.inputs}
    assert inputs == {
        "IMAGE": ("BYTES", [-1]),
        "PIXELS": ("UINT8", [-1, -1, -1, 3]),
        "INPUT": ("FP32", [-1, *described.input_size]),
    }
    outputs = {t.name: list(t.shape) for t in metadata.outputs}
    assert outputs["logits"] == [-1, len(described.class_names)]
    for name, site in described.sites.items():
        assert outputs[name] == [-1, *[int(d) for d in site["shape"][1:]]], name


def test_infer_equals_get_activations_bit_for_bit(
    stub: oip_grpc.GRPCInferenceServiceStub, client: Client
) -> None:
    images = [_pixels(1), _pixels(2)]
    patches = {"tokens": _string("patches"), "reduction": _string("mean")}
    request = _pixels_request(
        "deit",
        images,
        [
            Outputs(name="blocks.1.mlp.hidden"),
            Outputs(name="blocks.0.attn.probs"),
            Outputs(name="logits"),
            Outputs(name="blocks.1.out", parameters=patches),
            Outputs(
                name="blocks.0.out",
                parameters={"tokens": _string("indices"), "token_indices": _string("0,5,9")},
            ),
            Outputs(
                name="final",
                parameters={
                    "reduction": _string("patch_map"),
                    "channels": _string("3,7"),
                    "datatype": _string("FP16"),
                },
            ),
        ],
    )
    response = stub.ModelInfer(request)
    assert [t.name for t in response.outputs] == [o.name for o in request.outputs]
    # One forward serves every output, so each equals what GetActivations reads when it asks
    # for all of these sites at once (blocks.0.attn.probs switches the attention kernel for
    # the whole forward): selections exactly, the patch mean to float rounding.
    sites = ["blocks.1.mlp.hidden", "blocks.0.attn.probs", "blocks.1.out", "blocks.0.out", "final"]
    together = client.activations(images, sites, model="deit")
    for site in ("blocks.1.mlp.hidden", "blocks.0.attn.probs"):
        np.testing.assert_array_equal(_output(response, site), together[site])
    anatomy = client.describe("deit")
    prefix, (height, width) = anatomy.prefix_token_count, anatomy.grid
    np.testing.assert_allclose(
        _output(response, "blocks.1.out"),
        together["blocks.1.out"][:, prefix:].mean(axis=1),
        rtol=1e-5,
        atol=1e-6,
    )
    np.testing.assert_array_equal(
        _output(response, "blocks.0.out"), together["blocks.0.out"][:, [0, 5, 9]]
    )
    got = _output(response, "final")
    assert got.dtype == np.float16 and response.outputs[-1].datatype == "FP16"
    maps = together["final"][:, prefix:, [3, 7]].transpose(0, 2, 1).reshape(2, 2, height, width)
    np.testing.assert_array_equal(got, maps.astype(np.float16))
    top = client.activations(images, ["embed"], model="deit", top_predictions=1).predictions
    logits = _output(response, "logits")
    assert logits.shape == (2, 7)
    for row, predictions in zip(logits, top, strict=True):
        assert int(row.argmax()) == predictions[0].class_index
        assert row.max() == pytest.approx(predictions[0].logit, rel=1e-6)


def test_every_input_kind_gives_the_same_result(
    stub: oip_grpc.GRPCInferenceServiceStub, client: Client
) -> None:
    images = [_pixels(3), _pixels(4)]
    outputs = [Outputs(name="blocks.0.mlp.out")]
    by_pixels = _output(
        stub.ModelInfer(_pixels_request("vit", images, outputs)), "blocks.0.mlp.out"
    )
    encoded = [_png(i) for i in images]
    image_tensor = oip.ModelInferRequest.InferInputTensor(name="IMAGE", datatype="BYTES", shape=[2])
    raw = oip.ModelInferRequest(
        model_name="vit",
        inputs=[image_tensor],
        outputs=outputs,
        raw_input_contents=[_bytes_tensor(encoded)],
    )
    typed_tensor = oip.ModelInferRequest.InferInputTensor(
        name="IMAGE",
        datatype="BYTES",
        shape=[2],
        contents=oip.InferTensorContents(bytes_contents=encoded),
    )
    typed = oip.ModelInferRequest(model_name="vit", inputs=[typed_tensor], outputs=outputs)
    for request in (raw, typed):
        np.testing.assert_array_equal(
            _output(stub.ModelInfer(request), "blocks.0.mlp.out"), by_pixels
        )
    uint_tensor = oip.ModelInferRequest.InferInputTensor(
        name="PIXELS",
        datatype="UINT8",
        shape=[2, *images[0].shape],
        contents=oip.InferTensorContents(uint_contents=np.stack(images).reshape(-1).tolist()),
    )
    typed_pixels = oip.ModelInferRequest(model_name="vit", inputs=[uint_tensor], outputs=outputs)
    np.testing.assert_array_equal(
        _output(stub.ModelInfer(typed_pixels), "blocks.0.mlp.out"), by_pixels
    )
    size = client.describe("vit").input_size
    preprocessed = torch.randn((2, *size), generator=torch.Generator().manual_seed(5)).numpy()
    expected = client.activations(list(preprocessed), ["blocks.0.mlp.out"], model="vit")
    float_tensor = oip.ModelInferRequest.InferInputTensor(
        name="INPUT", datatype="FP32", shape=list(preprocessed.shape)
    )
    by_input = oip.ModelInferRequest(
        model_name="vit",
        inputs=[float_tensor],
        outputs=outputs,
        raw_input_contents=[preprocessed.astype("<f4").tobytes()],
    )
    np.testing.assert_array_equal(
        _output(stub.ModelInfer(by_input), "blocks.0.mlp.out"), expected["blocks.0.mlp.out"]
    )


def test_no_requested_output_means_the_logits(stub: oip_grpc.GRPCInferenceServiceStub) -> None:
    response = stub.ModelInfer(_pixels_request("vit", [_pixels(6)], []))
    assert [t.name for t in response.outputs] == ["logits"]
    assert response.outputs[0].datatype == "FP32"
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(_pixels_request("clip", [_pixels(6)], []))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "outputs" in caught.value.details()


def _input(name: str, datatype: str, shape: list[int]) -> oip.ModelInferRequest.InferInputTensor:
    return oip.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape)


BAD_REQUESTS = [
    (
        "unknown model",
        oip.ModelInferRequest(model_name="nope"),
        grpc.StatusCode.NOT_FOUND,
        "nope",
    ),
    (
        "a model name too long to be one",
        oip.ModelInferRequest(model_name="nope" * 50_000),
        grpc.StatusCode.INVALID_ARGUMENT,
        "model_name",
    ),
    (
        "unknown version",
        oip.ModelInferRequest(model_name="vit", model_version="v9"),
        grpc.StatusCode.NOT_FOUND,
        "version",
    ),
    (
        "no input",
        oip.ModelInferRequest(model_name="vit"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "inputs",
    ),
    (
        "unknown input",
        oip.ModelInferRequest(model_name="vit", inputs=[_input("PICTURE", "BYTES", [1])]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "inputs[0].name",
    ),
    (
        "an input without a name",
        oip.ModelInferRequest(model_name="vit", inputs=[_input("", "BYTES", [1])]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "inputs[0].name",
    ),
    (
        "wrong datatype",
        oip.ModelInferRequest(
            model_name="vit",
            inputs=[_input("PIXELS", "FP32", [1, 4, 4, 3])],
            raw_input_contents=[b"\0" * 192],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "inputs[0].datatype",
    ),
    (
        "zero and huge dimensions",
        oip.ModelInferRequest(
            model_name="vit", inputs=[_input("PIXELS", "UINT8", [0, 1 << 40, 4, 3])]
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "inputs[0].shape",
    ),
    (
        "bytes that do not fit the shape",
        oip.ModelInferRequest(
            model_name="vit",
            inputs=[_input("PIXELS", "UINT8", [1, 4, 4, 3])],
            raw_input_contents=[b"\0" * 7],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "raw_input_contents[0]",
    ),
    (
        "broken BYTES framing",
        oip.ModelInferRequest(
            model_name="vit",
            inputs=[_input("IMAGE", "BYTES", [1])],
            raw_input_contents=[b"\xff\0\0\0ab"],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "raw_input_contents[0]",
    ),
]


@pytest.mark.parametrize(
    ("label", "request_", "code", "word"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS]
)
def test_bad_requests(
    stub: oip_grpc.GRPCInferenceServiceStub,
    label: str,
    request_: oip.ModelInferRequest,
    code: grpc.StatusCode,
    word: str,
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request_)
    assert caught.value.code() == code, label
    assert word in caught.value.details(), caught.value.details()
    assert len(caught.value.details()) < 1000
    assert stub.ServerLive(oip.ServerLiveRequest()).live


BAD_OUTPUTS = [
    ([Outputs(name="blocks.99.out")], grpc.StatusCode.NOT_FOUND, "blocks.99.out"),
    (
        [Outputs(name="blocks.0.out", parameters={"color": _string("red")})],
        grpc.StatusCode.INVALID_ARGUMENT,
        "outputs[0].parameters",
    ),
    (
        [Outputs(name="blocks.0.out", parameters={"reduction": _string("top_channels")})],
        grpc.StatusCode.INVALID_ARGUMENT,
        'outputs[0].parameters["reduction"]',
    ),
    (
        [Outputs(name="blocks.0.out", parameters={"datatype": _string("INT8")})],
        grpc.StatusCode.INVALID_ARGUMENT,
        'outputs[0].parameters["datatype"]',
    ),
    (
        [Outputs(name="blocks.0.out", parameters={"token_indices": _string("1,x")})],
        grpc.StatusCode.INVALID_ARGUMENT,
        'outputs[0].parameters["token_indices"]',
    ),
    (
        [Outputs(name="blocks.0.out"), Outputs(name="blocks.0.out")],
        grpc.StatusCode.INVALID_ARGUMENT,
        "outputs",
    ),
    # Checked against the model before any decode, named by the output that asked.
    (
        [Outputs(name="blocks.0.out"), Outputs(name="blocks.99.out")],
        grpc.StatusCode.NOT_FOUND,
        "outputs[1].name",
    ),
    (
        [
            Outputs(name="blocks.0.out"),
            Outputs(
                name="blocks.1.out",
                parameters={"reduction": _string("patch_map"), "channels": _string("1,5000")},
            ),
        ],
        grpc.StatusCode.INVALID_ARGUMENT,
        'outputs[1].parameters["channels"]',
    ),
    (
        [
            Outputs(
                name="blocks.0.out",
                parameters={"tokens": _string("indices"), "token_indices": _string("0,900")},
            )
        ],
        grpc.StatusCode.INVALID_ARGUMENT,
        'outputs[0].parameters["token_indices"]',
    ),
    (
        [
            Outputs(
                name="blocks.0.attn.probs",
                parameters={"reduction": _string("patch_map"), "channels": _string("0")},
            )
        ],
        grpc.StatusCode.INVALID_ARGUMENT,
        'outputs[0].parameters["reduction"]',
    ),
    # Numeric-looking texts that int() would take, or choke on: the grammar refuses them.
    *[
        (
            [Outputs(name="blocks.0.out", parameters={key: _string(text)})],
            grpc.StatusCode.INVALID_ARGUMENT,
            f'outputs[0].parameters["{key}"]',
        )
        for key, text in [
            ("positions", "--1:2"),
            ("positions", "1:--2"),
            ("positions", "\u00b2:0"),
            ("positions", "1:2:3"),
            ("positions", "0:0,"),
            ("token_indices", "-1"),
            ("token_indices", "\u0661"),
            ("token_indices", "1_000"),
            ("channels", "1e3"),
            ("channels", "9999999999"),
        ]
    ],
]


@pytest.mark.parametrize(("outputs", "code", "word"), BAD_OUTPUTS)
def test_bad_outputs(
    stub: oip_grpc.GRPCInferenceServiceStub,
    outputs: list[Outputs],
    code: grpc.StatusCode,
    word: str,
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(_pixels_request("vit", [_pixels(8)], outputs))
    assert caught.value.code() == code
    assert word in caught.value.details(), caught.value.details()


def test_a_request_level_parameter_is_named_where_it_was_set(
    stub: oip_grpc.GRPCInferenceServiceStub,
) -> None:
    request = _pixels_request("vit", [_pixels(8)], [Outputs(name="blocks.1.out")])
    request.parameters["reduction"].string_param = "patch_map"
    request.parameters["channels"].string_param = "1,5000"
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = from_rpc_error(caught.value)
    assert [v.field for v in error.field_violations] == ['parameters["channels"]']


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
def test_an_undecodable_image_is_named_by_the_input_that_holds_it(
    stub: oip_grpc.GRPCInferenceServiceStub, raw: bool
) -> None:
    items = [_png(_pixels(9)), b"not an image"]
    request = oip.ModelInferRequest(
        model_name="vit", inputs=[_input("IMAGE", "BYTES", [2])], outputs=[Outputs(name="logits")]
    )
    if raw:
        request.raw_input_contents.append(_bytes_tensor(items))
    else:
        request.inputs[0].contents.bytes_contents.extend(items)
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    expected = (
        "raw_input_contents[0]: image 1: " if raw else "inputs[0].contents.bytes_contents[1]: "
    )
    assert caught.value.details().startswith(expected), caught.value.details()
    error = from_rpc_error(caught.value)
    assert [v.field for v in error.field_violations] == [expected.split(":")[0]]


def test_model_ready_for_unknown_model_and_version(stub: oip_grpc.GRPCInferenceServiceStub) -> None:
    assert not stub.ModelReady(oip.ModelReadyRequest(name="vit", version="other")).ready
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelReady(oip.ModelReadyRequest(name="absent"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_metrics_and_auth_cover_the_protocol() -> None:
    """The same interceptor authenticates and counts both services."""
    running = create_server(
        ServerSettings(host="127.0.0.1", port=0, metrics_port=-1, auth_token="s3cret")
    )
    try:
        assert running.registry.wait_until_settled(timeout=120)
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = oip_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.RpcError) as caught:
                stub.ServerMetadata(oip.ServerMetadataRequest())
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            token = [("authorization", "Bearer s3cret")]
            assert stub.ModelReady(oip.ModelReadyRequest(name=""), metadata=token).ready
        counted = running.metrics.requests.labels("ModelReady", "vitscope-digits", "OK")
        assert counted._value.get() == 1
    finally:
        running.stop(0)


def test_a_response_over_the_message_limit_is_refused_by_name(tmp_path: Path) -> None:
    """Every output of ModelInfer travels in one message: one that would not fit is refused
    as RESULT_TOO_LARGE on `outputs`, and a reduced request on the same server is served."""
    running = start(tmp_path, [], default_model=DIGITS_NAME, max_message_bytes=1 << 16)
    batch = np.random.default_rng(3).standard_normal((4, 3, 28, 28)).astype(np.float32)
    hidden = "blocks.0.mlp.hidden"

    def request(parameters: dict[str, oip.InferParameter]) -> oip.ModelInferRequest:
        return oip.ModelInferRequest(
            model_name=DIGITS_NAME,
            inputs=[
                oip.ModelInferRequest.InferInputTensor(
                    name="INPUT", datatype="FP32", shape=list(batch.shape)
                )
            ],
            outputs=[Outputs(name=hidden, parameters=parameters)],
            raw_input_contents=[batch.tobytes()],
        )

    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = oip_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                stub.ModelInfer(request({}))
            assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            error = from_rpc_error(refused.value)
            assert error.reason == "RESULT_TOO_LARGE", error.details
            assert error.details.startswith("outputs: the response would take")
            reduced = stub.ModelInfer(request({"reduction": _string("mean")}))
            assert _output(reduced, hidden).shape[0] == 4
    finally:
        running.stop(0)
