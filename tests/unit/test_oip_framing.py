"""ModelInfer's response framed by hand parses as the message protobuf would build."""

from __future__ import annotations

import numpy as np
import pytest

from vitscope.oip import grpc_predict_v2_pb2 as oip
from vitscope_server.core.model.readout import TensorDType
from vitscope_server.core.runtime.errors import Reason, ResourceExhausted
from vitscope_server.transport.convert_oip import framed_infer_response, output_tensor

ARRAYS = {
    "float32": (np.arange(24, dtype=np.float32).reshape(2, 3, 4), TensorDType.FLOAT32),
    "float16": (np.linspace(-2, 2, 6, dtype=np.float16).reshape(2, 3), TensorDType.FLOAT16),
    "bfloat16 bits": (np.arange(5, dtype=np.uint16) * 977, TensorDType.BFLOAT16),
    "empty": (np.zeros((0, 7), dtype=np.float32), TensorDType.FLOAT32),
    "big-endian input": (np.arange(6, dtype=">f4").reshape(3, 2), TensorDType.FLOAT32),
    "transposed": (np.arange(12, dtype=np.float32).reshape(3, 4).T, TensorDType.FLOAT32),
}


@pytest.mark.parametrize("names", [list(ARRAYS), ["float32"], []], ids=["all", "one", "none"])
def test_the_framed_response_parses_as_protobuf_s_own(names: list[str]) -> None:
    head = oip.ModelInferResponse(model_name="m", model_version="v", id="request-1")
    built = oip.ModelInferResponse(model_name="m", model_version="v", id="request-1")
    contents = []
    for name in names:
        array, dtype = ARRAYS[name]
        tensor, raw = output_tensor(name, array, dtype)
        head.outputs.append(tensor)
        contents.append(raw)
        built.outputs.append(tensor)
        built.raw_output_contents.append(array.astype(array.dtype.newbyteorder("<")).tobytes())
    parsed = oip.ModelInferResponse.FromString(framed_infer_response(head, contents, 1 << 20))
    assert parsed == built
    for name, raw in zip(names, parsed.raw_output_contents, strict=True):
        array, _ = ARRAYS[name]
        little = array.dtype.newbyteorder("<")
        np.testing.assert_array_equal(np.frombuffer(raw, little).reshape(array.shape), array)


def test_the_limit_counts_every_byte_of_the_message() -> None:
    """The head's own bytes count too: a response whose raw contents alone fit, but not with
    many long output names, is refused by name rather than left to gRPC."""
    values = np.zeros(1000, dtype=np.float32)
    head = oip.ModelInferResponse(model_name="m", id="x" * 1000)
    tensor, raw = output_tensor("n" * 250, values, TensorDType.FLOAT32)
    head.outputs.extend([tensor] * 4)
    framed = framed_infer_response(head, [raw] * 4, 1 << 20)
    assert len(framed) == oip.ModelInferResponse.FromString(framed).ByteSize()
    with pytest.raises(ResourceExhausted) as refused:
        framed_infer_response(head, [raw] * 4, len(framed) - 1)
    assert refused.value.reason is Reason.RESULT_TOO_LARGE and refused.value.field == "outputs"
    assert framed_infer_response(head, [raw] * 4, len(framed)) == framed
