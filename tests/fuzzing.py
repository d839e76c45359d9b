"""Hypothesis strategies for any request message, built from its protobuf descriptor.

Values lean towards what reaches deep into the server: real model and site names, valid
images and tensors, enum values just outside their range, extreme and non-finite numbers.
"""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import numpy as np
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st
from PIL import Image

from vitscope.v1 import inspector_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["Inspector"]
MAX_DEPTH = 4
INT32_EDGES = [0, -1, 1, 2, 3, 7, 64, 2**31 - 1, -(2**31), 65_536]
FLOAT_EDGES = [0.0, -0.0, 1e-45, 1e30, 3.4e38, 1e300, -1e300, float("inf"), float("nan")]
MODELS = ["", "tiny", "vitscope-digits", "vitscope-digits-gap", "nope", "m" * 300]
SITES = [
    "blocks.0.out",
    "blocks.1.attn.probs",
    "blocks.0.mlp.hidden",
    "blocks.1.attn.out",
    "embed",
    "final",
    "blocks.99.out",
    "",
    "s" * 300,
]


def _png(width: int, height: int, mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, (width, height)).save(out, format="PNG")
    return out.getvalue()


def _declared_png(width: int, height: int) -> bytes:
    """A PNG header claiming width x height with no pixel data behind it."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + header
    crc = struct.pack(">I", zlib.crc32(chunk))
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(header)) + chunk + crc


IMAGES = [
    _png(28, 28),
    _png(160, 160),
    _png(1, 1),
    _png(1, 100_000),
    _png(64, 64, "L"),
    _png(64, 64, "RGBA"),
    _png(32, 32, "I;16"),
    _declared_png(100_000, 100_000),
    _declared_png(0, 0),
    b"GIF89a",
    b"",
]

_DTYPES = {1: np.float32, 2: np.float16, 3: np.uint16, 4: np.uint8, 5: np.int64}


@st.composite
def _tensor(draw: st.DrawFn, message_type: Any) -> Message:
    """A tensor whose data matches its dtype and shape, or one that does not."""
    tensor = message_type()
    dtype = draw(st.sampled_from([0, *_DTYPES, 99]))
    tensor.dtype = dtype
    shape = draw(
        st.one_of(
            st.lists(st.integers(0, 40), max_size=4),
            st.lists(st.sampled_from([0, 1, 3, 28, 160, 2**31, -1, 2**62]), max_size=4),
        )
    )
    tensor.shape.extend(shape)
    numpy_type = _DTYPES.get(dtype, np.float32)
    count = int(np.prod(shape)) if shape and all(0 <= d < 10_000 for d in shape) else 0
    if draw(st.booleans()) and count <= 200_000:
        values = draw(st.sampled_from(["zeros", "random", "nonfinite"]))
        array = np.zeros(count, numpy_type)
        if values == "random":
            array = np.random.default_rng(count).integers(0, 255, count).astype(numpy_type)
        elif values == "nonfinite" and np.issubdtype(numpy_type, np.floating):
            array = np.full(count, np.nan, numpy_type)
        tensor.data = array.tobytes()
    else:
        tensor.data = draw(st.binary(max_size=64))
    return tensor


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    kind = field.type
    name = field.name
    if kind == FieldDescriptor.TYPE_STRING:
        if name == "model":
            return st.sampled_from(MODELS)
        if name in ("site", "sites"):
            return st.sampled_from(SITES)
        if name == "image_folder":
            return st.sampled_from(["", "nope", "../..", "/", "\x00"])
        return st.one_of(
            st.text(max_size=20), st.sampled_from(["cat", "a photo of a {}", "x" * 5000])
        )
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.one_of(st.sampled_from(IMAGES), st.binary(max_size=64))
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_ENUM:
        values = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(values), st.integers(-3, 40))
    if kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        edges = FLOAT_EDGES if kind == FieldDescriptor.TYPE_DOUBLE else FLOAT_EDGES[:5]
        return st.one_of(
            st.floats(-10, 10), st.sampled_from(edges), st.floats(allow_nan=True, width=32)
        )
    if kind in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return st.one_of(st.integers(0, 50), st.sampled_from([0, 1, 2**32 - 1]))
    if kind in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return st.one_of(st.integers(0, 50), st.sampled_from([0, 1, 2**64 - 1]))
    if kind in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64):
        return st.one_of(st.integers(-3, 50), st.sampled_from([2**63 - 1, -(2**63), 2**40]))
    return st.one_of(st.integers(-3, 50), st.sampled_from(INT32_EDGES))


def _value(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        if field.message_type.full_name == "vitscope.v1.Tensor":
            return _tensor(field.message_type._concrete_class)
        return message(field.message_type, depth + 1)
    return _scalar(field)


@st.composite
def _message(draw: st.DrawFn, descriptor: Descriptor, depth: int) -> Message:
    result = descriptor._concrete_class()
    if depth > MAX_DEPTH:
        return result
    for field in descriptor.fields:
        if not draw(st.booleans()):
            continue
        if field.is_repeated:
            size = draw(st.one_of(st.integers(0, 3), st.sampled_from([0, 8, 70])))
            values = [draw(_value(field, depth)) for _ in range(size)]
            target = getattr(result, field.name)
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                for value in values:
                    target.add().CopyFrom(value)
            else:
                target.extend(values)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            getattr(result, field.name).CopyFrom(draw(_value(field, depth)))
        else:
            setattr(result, field.name, draw(_value(field, depth)))
    return result


def message(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Any message of this type, down to MAX_DEPTH levels of nesting."""
    return _message(descriptor, depth)
