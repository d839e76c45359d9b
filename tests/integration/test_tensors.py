"""The wire format: exact round trips, chunking and reassembly, bfloat16."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support.servers import start

from vitscope import Client
from vitscope import tensors as wire
from vitscope.v1 import activations_pb2, tensor_pb2
from vitscope_server.transport.app import RunningServer


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.uint8, np.int64])
def test_round_trip(dtype: type) -> None:
    array = (np.random.default_rng(0).standard_normal((2, 3, 5)) * 50).astype(dtype)
    decoded = wire.from_proto(wire.to_proto(array))
    assert decoded.dtype == array.dtype
    np.testing.assert_array_equal(decoded, array)


def test_big_endian_input_is_sent_little_endian() -> None:
    array = np.arange(6, dtype=">f4").reshape(2, 3)
    message = wire.to_proto(array)
    assert message.data == np.arange(6, dtype="<f4").tobytes()


def test_bfloat16_decodes_like_torch() -> None:
    values = torch.randn(1000) * 100
    bits = values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(
        wire.bfloat16_bits_to_float32(bits), values.to(torch.bfloat16).float().numpy()
    )


def test_bytes_that_do_not_fit_are_refused() -> None:
    bad = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[4], data=b"\0" * 15)
    with pytest.raises(wire.TensorDecodeError, match="15 bytes"):
        wire.from_proto(bad)
    with pytest.raises(wire.TensorDecodeError, match="not supported"):
        wire.from_proto(tensor_pb2.Tensor(dtype=99, shape=[1], data=b"\0"))


def _chunks(array: np.ndarray, chunk_bytes: int) -> list[tensor_pb2.TensorChunk]:
    payload = memoryview(array).cast("B")
    chunks = []
    for span in wire.chunk_spans(len(payload), chunk_bytes):
        parts = wire.encode_chunk(
            "s", "values", tensor_pb2.DTYPE_FLOAT32, array.shape, payload, span
        )
        chunks.append(tensor_pb2.TensorChunk.FromString(b"".join(parts)))
    return chunks


def test_hand_framed_chunk_equals_protobufs_encoding() -> None:
    array = np.arange(300, dtype=np.float32)
    payload = memoryview(array).cast("B")
    parts = wire.encode_chunk(
        "blocks.0.out", "values", tensor_pb2.DTYPE_FLOAT32, (300,), payload, (400, 1200)
    )
    expected = tensor_pb2.TensorChunk(
        name="blocks.0.out",
        role="values",
        dtype=tensor_pb2.DTYPE_FLOAT32,
        shape=[300],
        total_bytes=1200,
        offset=400,
        data=payload[400:1200].tobytes(),
    )
    assert b"".join(parts) == expected.SerializeToString()


def test_split_chunk_reads_fields_in_any_order_without_copying_data() -> None:
    data = np.arange(50, dtype=np.float32).tobytes()
    full = tensor_pb2.TensorChunk(
        name="n",
        role="values",
        dtype=tensor_pb2.DTYPE_FLOAT32,
        shape=[5, 10],
        total_bytes=400,
        offset=200,
        data=data,
    )
    without_data = tensor_pb2.TensorChunk()
    without_data.CopyFrom(full)
    without_data.ClearField("data")
    head = without_data.SerializeToString()
    data_field = wire.length_delimited_field(7, len(data)) + data
    for serialized in (full.SerializeToString(), data_field + head):
        raw = memoryview(serialized)
        chunk, view = wire.split_chunk(raw)
        assert chunk.name == "n" and list(chunk.shape) == [5, 10] and chunk.offset == 200
        assert view.tobytes() == data and view.obj is raw.obj
    with pytest.raises(wire.TensorDecodeError, match="truncated"):
        wire.split_chunk(memoryview(full.SerializeToString()[:-3]))


def test_chunks_reassemble_bit_exactly_in_any_order() -> None:
    array = np.random.default_rng(1).standard_normal((7, 333)).astype(np.float32)
    chunks = _chunks(array, 1000)
    assert len(chunks) == wire.chunk_count(array.nbytes, 1000) > 1
    assembler = wire.ChunkAssembler()
    for chunk in reversed(chunks):
        assembler.add(chunk)
    result = assembler.result()[("s", "values")]
    assert result.tobytes() == array.tobytes()


def test_incomplete_tensor_is_reported() -> None:
    array = np.zeros(1000, dtype=np.float32)
    chunks = _chunks(array, 512)
    assembler = wire.ChunkAssembler()
    for chunk in chunks[:-1]:
        assembler.add(chunk)
    with pytest.raises(wire.TensorDecodeError, match="incomplete"):
        assembler.result()


def test_result_larger_than_the_max_message_streams_in_chunks(
    tmp_path_factory: pytest.TempPathFactory, client: Client, server: RunningServer
) -> None:
    small = start(
        tmp_path_factory.mktemp("small"),
        default_model="vit",
        max_message_bytes=256 << 10,
        chunk_bytes=64 << 10,
    )
    try:
        images = [
            np.random.default_rng(i).integers(0, 255, (100, 100, 3), dtype=np.uint8)
            for i in range(4)
        ]
        sites = ["blocks.0.mlp.hidden", "blocks.5.mlp.hidden", "blocks.1.attn.probs", "final"]
        with Client(f"127.0.0.1:{small.port}", max_message_bytes=256 << 10) as narrow:
            chunked = narrow.activations(images, sites, model="vit")
        whole = client.activations(images, sites, model="vit")
        hidden = chunked["blocks.0.mlp.hidden"]
        assert hidden.nbytes > 256 << 10
        for site in sites:
            assert chunked[site].tobytes() == whole[site].tobytes(), site
    finally:
        small.stop(0)


def test_tensor_messages_round_trip_through_the_response_framing() -> None:
    """What the server frames as GetActivationsResponse.chunk, protobuf and the client's
    zero-copy reader both read back bit-exactly."""
    field = activations_pb2.GetActivationsResponse.DESCRIPTOR.fields_by_name["chunk"].number
    array = np.random.default_rng(0).standard_normal((3, 5, 7)).astype(np.float32)
    messages = list(
        wire.encode_tensor_messages(field, "site", "values", tensor_pb2.DTYPE_FLOAT32, array, 64)
    )
    assert len(messages) == wire.chunk_count(array.nbytes, 64)
    by_protobuf, by_view = wire.ChunkAssembler(), wire.ChunkAssembler()
    for message in messages:
        by_protobuf.add(activations_pb2.GetActivationsResponse.FromString(message).chunk)
        decoded = wire.decode_tensor_message(field, message)
        assert decoded is not None
        by_view.add(*decoded)
    for assembler in (by_protobuf, by_view):
        np.testing.assert_array_equal(assembler.result()[("site", "values")], array)
    header = activations_pb2.GetActivationsResponse(header=activations_pb2.ActivationHeader())
    assert wire.decode_tensor_message(field, header.SerializeToString()) is None
