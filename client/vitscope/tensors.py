"""Tensors on the wire: dtype + shape + little-endian row-major bytes.

Shared by client and server (numpy only, no torch). bfloat16 travels as the
upper 16 bits of float32; numpy has no bfloat16, so it decodes to float32.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from vitscope.v1 import tensor_pb2

_NUMPY_BY_DTYPE: dict[tensor_pb2.Dtype.ValueType, np.dtype] = {
    tensor_pb2.DTYPE_FLOAT32: np.dtype("<f4"),
    tensor_pb2.DTYPE_FLOAT16: np.dtype("<f2"),
    tensor_pb2.DTYPE_BFLOAT16: np.dtype("<u2"),
    tensor_pb2.DTYPE_UINT8: np.dtype("u1"),
    tensor_pb2.DTYPE_INT64: np.dtype("<i8"),
}
_DTYPE_BY_NUMPY: dict[np.dtype, tensor_pb2.Dtype.ValueType] = {
    np.dtype("<f4"): tensor_pb2.DTYPE_FLOAT32,
    np.dtype("<f2"): tensor_pb2.DTYPE_FLOAT16,
    np.dtype("u1"): tensor_pb2.DTYPE_UINT8,
    np.dtype("<i8"): tensor_pb2.DTYPE_INT64,
}


MAX_DIMENSIONS = 8
MAX_ELEMENTS = 1 << 40
"""No real tensor is larger; the product of the non-zero dimensions is held to it."""


class TensorDecodeError(ValueError):
    """The bytes do not match the declared dtype and shape."""


def dtype_name(dtype: tensor_pb2.Dtype.ValueType) -> str:
    return str(tensor_pb2.Dtype.Name(dtype)).removeprefix("DTYPE_").lower()


def wire_numpy_dtype(dtype: tensor_pb2.Dtype.ValueType) -> np.dtype:
    """The numpy dtype whose bytes match the wire layout of `dtype`."""
    try:
        return _NUMPY_BY_DTYPE[dtype]
    except KeyError:
        allowed = ", ".join(dtype_name(d) for d in _NUMPY_BY_DTYPE)
        raise TensorDecodeError(f"dtype {dtype} is not supported; allowed: {allowed}") from None


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def to_proto(array: np.ndarray) -> tensor_pb2.Tensor:
    """Encodes a numpy array (float32, float16, uint8 or int64) as a Tensor."""
    contiguous = np.ascontiguousarray(array)
    wire = (
        contiguous.dtype.newbyteorder("<")
        if contiguous.dtype.byteorder == ">"
        else contiguous.dtype
    )
    contiguous = contiguous.astype(wire, copy=False)
    try:
        dtype = _DTYPE_BY_NUMPY[contiguous.dtype]
    except KeyError:
        raise TensorDecodeError(f"numpy dtype {array.dtype} has no wire dtype") from None
    return tensor_pb2.Tensor(dtype=dtype, shape=list(contiguous.shape), data=contiguous.tobytes())


def expected_nbytes(dtype: tensor_pb2.Dtype.ValueType, shape: list[int] | tuple[int, ...]) -> int:
    """Bytes of a tensor of this shape; refuses shapes no array can have, including an
    empty one whose other dimensions alone would overflow (numpy checks them too)."""
    if (
        len(shape) > MAX_DIMENSIONS
        or any(d < 0 for d in shape)
        or math.prod(d for d in shape if d) > MAX_ELEMENTS
    ):
        raise TensorDecodeError(
            f"shape {list(shape[: MAX_DIMENSIONS + 1])}: at most {MAX_DIMENSIONS} dimensions, "
            f"none negative, at most {MAX_ELEMENTS} elements"
        )
    return math.prod(shape) * wire_numpy_dtype(dtype).itemsize


def from_proto(tensor: tensor_pb2.Tensor, decode_bfloat16: bool = True) -> np.ndarray:
    """Decodes a Tensor; bfloat16 becomes float32 unless decode_bfloat16 is False."""
    return _from_buffer(tensor.dtype, list(tensor.shape), tensor.data, decode_bfloat16)


def _from_buffer(
    dtype: tensor_pb2.Dtype.ValueType,
    shape: list[int],
    data: bytes | np.ndarray,
    decode_bfloat16: bool,
) -> np.ndarray:
    nbytes = expected_nbytes(dtype, shape)
    if len(data) != nbytes:
        raise TensorDecodeError(
            f"{len(data)} bytes do not fit shape {shape} of {dtype_name(dtype)} ({nbytes} bytes expected)"
        )
    array = np.frombuffer(data, dtype=wire_numpy_dtype(dtype)).reshape(shape)
    if dtype == tensor_pb2.DTYPE_BFLOAT16 and decode_bfloat16:
        return bfloat16_bits_to_float32(array)
    return array


def chunk_spans(total_bytes: int, chunk_bytes: int) -> Iterator[tuple[int, int]]:
    """[start, end) byte ranges of at most chunk_bytes covering a tensor (one, if it is empty)."""
    offset = 0
    while True:
        end = min(total_bytes, offset + chunk_bytes)
        yield offset, end
        offset = end
        if offset >= total_bytes:
            return


_LENGTH_DELIMITED = 2
_CHUNK_DATA_FIELD = tensor_pb2.TensorChunk.DESCRIPTOR.fields_by_name["data"].number


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def length_delimited_field(number: int, length: int) -> bytes:
    """The tag and length that precede a bytes or message field of `length` bytes."""
    return _varint(number << 3 | _LENGTH_DELIMITED) + _varint(length)


def encode_chunk(
    name: str,
    role: str,
    dtype: tensor_pb2.Dtype.ValueType,
    shape: tuple[int, ...],
    payload: memoryview,
    span: tuple[int, int],
) -> list[bytes | memoryview]:
    """One chunk's serialized TensorChunk, as parts whose concatenation is the message.

    The small fields go through protobuf; the data field is framed by hand so the
    tensor's bytes are copied once, when the parts are joined, instead of three times.
    """
    head = tensor_pb2.TensorChunk(
        name=name, role=role, dtype=dtype, shape=shape, total_bytes=len(payload), offset=span[0]
    ).SerializeToString()
    data = payload[span[0] : span[1]]
    return [head, length_delimited_field(_CHUNK_DATA_FIELD, len(data)), data]


def read_varint(view: memoryview, position: int) -> tuple[int, int]:
    """The varint at position and the position after it."""
    value = shift = 0
    while True:
        if position >= len(view):
            raise TensorDecodeError("truncated message")
        byte = view[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7


def split_chunk(serialized: memoryview) -> tuple[tensor_pb2.TensorChunk, memoryview]:
    """Parses a serialized TensorChunk without copying its data: the small fields go
    through protobuf, the data comes back as a view into `serialized`."""
    head: list[memoryview] = []
    data = serialized[0:0]
    position = 0
    while position < len(serialized):
        start = position
        key, position = read_varint(serialized, position)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, position = read_varint(serialized, position)
        elif wire_type == 1:
            position += 8
        elif wire_type == 5:
            position += 4
        elif wire_type == _LENGTH_DELIMITED:
            length, position = read_varint(serialized, position)
            if number == _CHUNK_DATA_FIELD:
                data = serialized[position : position + length]
                position += length
                continue
            position += length
        else:
            raise TensorDecodeError(f"unsupported wire type {wire_type} in a tensor chunk")
        head.append(serialized[start:position])
    if position != len(serialized):
        raise TensorDecodeError("truncated tensor chunk")
    return tensor_pb2.TensorChunk.FromString(b"".join(head)), data


def encode_tensor_messages(
    field: int,
    name: str,
    role: str,
    dtype: tensor_pb2.Dtype.ValueType,
    array: np.ndarray,
    chunk_bytes: int,
) -> Iterator[bytes]:
    """Serialized messages each holding one TensorChunk of `array` in field number `field`
    (a response's `chunk`), framed by hand so the tensor's bytes are copied once."""
    payload = memoryview(array.reshape(-1).view(np.uint8).data)
    for span in chunk_spans(len(payload), chunk_bytes):
        chunk = encode_chunk(name, role, dtype, array.shape, payload, span)
        size = sum(len(part) for part in chunk)
        yield b"".join([length_delimited_field(field, size), *chunk])


def decode_tensor_message(
    field: int, serialized: bytes
) -> tuple[tensor_pb2.TensorChunk, memoryview] | None:
    """The TensorChunk of a message holding only field number `field`, and a view of its data
    (no copy); None for any other message, which protobuf parses as usual."""
    view = memoryview(serialized)
    if not view:
        return None
    key, start = read_varint(view, 0)
    if key != field << 3 | _LENGTH_DELIMITED:
        return None
    length, start = read_varint(view, start)
    if start + length != len(view):
        return None
    return split_chunk(view[start:])


def chunk_count(total_bytes: int, chunk_bytes: int) -> int:
    return max(1, -(-total_bytes // chunk_bytes))


@dataclass
class _PartialTensor:
    dtype: tensor_pb2.Dtype.ValueType
    shape: list[int]
    # np.empty leaves pages untouched until the chunks are copied in: one pass, not two.
    buffer: np.ndarray
    received: int = 0


@dataclass
class ChunkAssembler:
    """Reassembles streamed TensorChunks bit-exactly, keyed by (name, role)."""

    decode_bfloat16: bool = True
    _partial: dict[tuple[str, str], _PartialTensor] = field(default_factory=dict)

    def add(self, chunk: tensor_pb2.TensorChunk, data: memoryview | bytes | None = None) -> None:
        """Adds a chunk; `data`, when given, replaces chunk.data (a view that avoids a copy)."""
        payload = chunk.data if data is None else data
        key = (chunk.name, chunk.role)
        partial = self._partial.get(key)
        if partial is None:
            nbytes = expected_nbytes(chunk.dtype, list(chunk.shape))
            if nbytes != chunk.total_bytes:
                raise TensorDecodeError(
                    f"chunk of {key} declares {chunk.total_bytes} bytes, shape needs {nbytes}"
                )
            partial = _PartialTensor(chunk.dtype, list(chunk.shape), np.empty(nbytes, np.uint8))
            self._partial[key] = partial
        elif (chunk.dtype, list(chunk.shape)) != (partial.dtype, partial.shape):
            raise TensorDecodeError(f"chunks of {key} disagree on dtype or shape")
        end = chunk.offset + len(payload)
        if (
            chunk.offset < 0
            or end > len(partial.buffer)
            or partial.received + len(payload) > len(partial.buffer)
        ):
            raise TensorDecodeError(
                f"chunk of {key} at offset {chunk.offset} overruns {len(partial.buffer)} bytes"
            )
        partial.buffer[chunk.offset : end] = np.frombuffer(payload, dtype=np.uint8)
        partial.received += len(payload)

    def result(self) -> dict[tuple[str, str], np.ndarray]:
        """All tensors; raises if any is incomplete."""
        out: dict[tuple[str, str], np.ndarray] = {}
        for key, partial in self._partial.items():
            if partial.received != len(partial.buffer):
                raise TensorDecodeError(
                    f"tensor {key} incomplete: {partial.received} of {len(partial.buffer)} bytes"
                )
            out[key] = _from_buffer(
                partial.dtype, partial.shape, partial.buffer, self.decode_bfloat16
            )
        return out
