"""Hypothesis strategies for any request message, built from its protobuf descriptor and
the server's declaration of each field (vitscope_server.transport.fields).

Values lean towards what reaches deep into the server: real model and site names, valid
images and tensors, enum values just outside their range, each declared range's bounds and
the values just past them, texts its grammar matches, extreme finite numbers (the largest
double, the smallest subnormal), non-finite ones, and numeric-looking strings (signs doubled,
other scripts' digits) that a loose parser would take for numbers.
Besides wholly generated messages, `requests` mutates a valid request of each method in a
few fields, so that most of the request passes validation and the odd field reaches the
code behind it.
"""

from __future__ import annotations

import io
import math
import struct
import sys
import zlib
from typing import Any

import numpy as np
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st
from PIL import Image

from vitscope.oip import grpc_predict_v2_pb2 as oip
from vitscope.v1 import activations_pb2 as apb
from vitscope.v1 import common_pb2
from vitscope.v1 import explain_pb2 as epb
from vitscope.v1 import features_pb2 as fpb
from vitscope.v1 import inspector_pb2 as pb
from vitscope.v1 import interventions_pb2 as vpb
from vitscope.v1 import inversion_pb2 as ipb
from vitscope.v1 import models_pb2 as mpb
from vitscope.v1 import projection_pb2 as ppb
from vitscope.v1 import sae_pb2 as sae_pb
from vitscope.v1 import server_info_pb2 as spb
from vitscope_server.transport import fields
from vitscope_server.transport.fields.oip import OUTPUT_PARAMETERS, REQUEST_KEYS
from vitscope_server.transport.fields.rules import Choice, Range, Repeated, Rule, Text

SERVICES = [
    pb.DESCRIPTOR.services_by_name["Inspector"],
    oip.DESCRIPTOR.services_by_name["GRPCInferenceService"],
]
MAX_DEPTH = 4
MODEL = "tiny"
INT32_EDGES = [0, -1, 1, 2, 3, 7, 64, 2**31 - 1, -(2**31), 65_536]
MAX_DOUBLE = sys.float_info.max
SUBNORMAL = 5e-324
FLOAT_EDGES = [0.0, -0.0, 1e-45, 1e30, 3.4e38, 1e300, -1e300, float("inf"), float("nan")]
FLOAT_EDGES += [MAX_DOUBLE, -MAX_DOUBLE, SUBNORMAL, -SUBNORMAL, float("-inf"), 1e308]
# Texts that look like numbers to a loose parser: doubled signs, other scripts' digits
# (superscripts, Arabic-Indic, full-width), exponents, separators, and valid lists.
NUMERIC_TEXTS = ["0", "-1", "--1", "+1", "1e3", "1.5", "0x10", "1_000", "9" * 20, "NaN"]
NUMERIC_TEXTS += ["--1:2", "1:--2", "\u00b2:0", "\u0661\u0662", "\uff13", "\u221e", "1,,2", "0:0:0"]
NUMERIC_TEXTS += ["0:0,3:2", "0,5,9", " 1 , 2 ", "1:", ":1", ",", "0:0,"]
MODELS = ["", "tiny", "vitscope-digits", "vitscope-digits-gap", "nope", "m" * 300]
SITES = [
    "blocks.0.out",
    "blocks.3.out@sae:resid3-topk",
    "blocks.3.out@sae:resid3-topk.error",
    "blocks.0.out@sae:nope",
    "blocks.1.attn.probs",
    "blocks.0.mlp.hidden",
    "blocks.1.attn.out",
    "embed",
    "final",
    "blocks.99.out",
    "",
    "s" * 300,
]

# Keys of parameter maps (the inference protocol's): known ones, unknown ones, long ones.
MAP_KEYS = [*OUTPUT_PARAMETERS, *REQUEST_KEYS, "binary_data_size", "nope", "k" * 300]


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


_INTEGER_LIMITS = {
    FieldDescriptor.CPPTYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.CPPTYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.CPPTYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.CPPTYPE_UINT64: (0, 2**64 - 1),
}


def edges(rule: Range, field: FieldDescriptor) -> list[float]:
    """A range's bounds and the values just past them, as far as the field's type holds."""
    limits = _INTEGER_LIMITS.get(field.cpp_type)
    if limits is None:
        low, high = float(rule.low), float(rule.high)
        return [low, high, math.nextafter(low, -math.inf), math.nextafter(high, math.inf)]
    low, high = int(rule.low), int(rule.high)
    values = [low, high, low - 1, high + 1]
    return [v for v in values if limits[0] <= v <= limits[1]]


def _declared(field: FieldDescriptor) -> st.SearchStrategy[Any] | None:
    """Values at the edges of the field's declaration: range bounds and just past them,
    texts its grammar matches, its allowed choices."""
    rule: Rule | None = fields.FIELDS.get(field.full_name)
    if isinstance(rule, Repeated):
        rule = rule.each
    if isinstance(rule, Range):
        return st.sampled_from(edges(rule, field))
    if isinstance(rule, Text) and rule.grammar is not None:
        return st.from_regex(rule.grammar.compiled, fullmatch=True)
    if isinstance(rule, Choice):
        return st.sampled_from([*rule.allowed, *(a.swapcase() for a in rule.allowed)])
    return None


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    generic = _generic(field)
    declared = _declared(field)
    return generic if declared is None else st.one_of(declared, generic)


def _generic(field: FieldDescriptor) -> st.SearchStrategy[Any]:
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
            st.text(max_size=20),
            st.sampled_from(["cat", "a photo of a {}", "x" * 5000, *NUMERIC_TEXTS]),
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


def _extend(draw: st.DrawFn, container: Any, field: FieldDescriptor, depth: int, size: int) -> None:
    """Adds `size` drawn entries to a repeated or map field."""
    entry = field.message_type
    if entry is not None and entry.GetOptions().map_entry:
        key, value = entry.fields_by_name["key"], entry.fields_by_name["value"]
        keys = st.one_of(st.sampled_from(MAP_KEYS), _scalar(key))
        for _ in range(size):
            name, drawn = draw(keys), draw(_value(value, depth))
            if value.type == FieldDescriptor.TYPE_MESSAGE:
                container[name].CopyFrom(drawn)
            else:
                container[name] = drawn
        return
    values = [draw(_value(field, depth)) for _ in range(size)]
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        for drawn in values:
            container.add().CopyFrom(drawn)
    else:
        container.extend(values)


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
            _extend(draw, getattr(result, field.name), field, depth, size)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            getattr(result, field.name).CopyFrom(draw(_value(field, depth)))
        else:
            setattr(result, field.name, draw(_value(field, depth)))
    return result


def message(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Any message of this type, down to MAX_DEPTH levels of nesting."""
    return _message(descriptor, depth)


def _seeds() -> dict[str, list[Message]]:
    """Valid requests of every method, on the fuzzed server's models."""
    image = common_pb2.Image(encoded=_png(28, 28))
    gradients = epb.ExplanationMethodRequest(
        method=epb.EXPLANATION_METHOD_INTEGRATED_GRADIENTS,
        integrated_gradients=epb.IntegratedGradientsParameters(
            steps=2, baseline=epb.ATTRIBUTION_BASELINE_BLURRED, blur_sigma=2.0
        ),
    )
    rollout = epb.ExplanationMethodRequest(method=epb.EXPLANATION_METHOD_ROLLOUT)
    feature_map = epb.ExplanationMethodRequest(
        method=epb.EXPLANATION_METHOD_FEATURE_MAP,
        feature_map=epb.FeatureMapParameters(site="blocks.0.mlp.hidden", channel=1),
    )
    positions = oip.ModelInferRequest.InferRequestedOutputTensor(
        name="blocks.0.out",
        parameters={
            "tokens": oip.InferParameter(string_param="positions"),
            "positions": oip.InferParameter(string_param="0:0,1:2"),
        },
    )
    return {
        "GetServerInfo": [spb.GetServerInfoRequest()],
        "ServerLive": [oip.ServerLiveRequest()],
        "ServerReady": [oip.ServerReadyRequest()],
        "ServerMetadata": [oip.ServerMetadataRequest()],
        "ModelReady": [oip.ModelReadyRequest(name=MODEL)],
        "ModelMetadata": [oip.ModelMetadataRequest(name=MODEL)],
        "Explain": [
            epb.ExplainRequest(
                model=MODEL,
                images=[image],
                methods=[gradients],
                faithfulness=epb.FaithfulnessParameters(patches_per_step=20, blur_sigma=3.0),
            ),
            epb.ExplainRequest(model=MODEL, images=[image], methods=[rollout, feature_map]),
        ],
        "ListModels": [mpb.ListModelsRequest()],
        "DescribeModel": [mpb.DescribeModelRequest(model=MODEL)],
        "ListInverters": [ipb.ListInvertersRequest()],
        "GetActivations": [
            apb.GetActivationsRequest(model=MODEL, images=[image], sites=["blocks.0.out"])
        ],
        "OptimizeFeatures": [
            fpb.OptimizeFeaturesRequest(
                model=MODEL,
                features=[fpb.Feature(site="blocks.1.out", channel=1)],
                parameters=fpb.OptimizationParameters(steps=2, copies=1, image_size=64),
                progress_every=1,
            )
        ],
        "TopActivatingImages": [
            apb.TopActivatingImagesRequest(
                model=MODEL, site="blocks.0.out", channels=[1], top_k=2, images=[image]
            )
        ],
        "ProjectToClassSpace": [ppb.ProjectToClassSpaceRequest(images=[image], top_k=2)],
        "ProjectMemories": [ppb.ProjectMemoriesRequest(block=0, top_k=2)],
        "ModelInfer": [
            oip.ModelInferRequest(
                model_name=MODEL,
                inputs=[
                    oip.ModelInferRequest.InferInputTensor(
                        name="IMAGE",
                        datatype="BYTES",
                        shape=[1],
                        contents=oip.InferTensorContents(bytes_contents=[image.encoded]),
                    )
                ],
                outputs=[oip.ModelInferRequest.InferRequestedOutputTensor(name="blocks.0.out")],
            ),
            oip.ModelInferRequest(
                model_name=MODEL,
                inputs=[
                    oip.ModelInferRequest.InferInputTensor(
                        name="PIXELS",
                        datatype="UINT8",
                        shape=[1, 8, 8, 3],
                        contents=oip.InferTensorContents(uint_contents=[7] * 192),
                    )
                ],
                outputs=[positions],
                parameters={"datatype": oip.InferParameter(string_param="fp16")},
            ),
        ],
        "Intervene": [
            vpb.InterveneRequest(
                model=MODEL,
                images=[image],
                variants=[
                    vpb.Variant(
                        edits=[
                            vpb.Edit(
                                site="blocks.0.out",
                                operation=vpb.EDIT_OPERATION_SCALE,
                                factor=0.5,
                                selection=vpb.EditSelection(channels=[1, 2]),
                            )
                        ]
                    )
                ],
                outputs=vpb.InterventionOutputs(top_k=2, sites=["blocks.1.out"]),
            ),
            vpb.InterveneRequest(
                model=MODEL,
                images=[image],
                source_images=[image],
                sweep=vpb.Sweep(kind=vpb.SWEEP_KIND_PATCH_POSITIONS, part="out", blocks=[0]),
            ),
        ],
        "Invert": [
            ipb.InvertRequest(images=[image], depths=[1], method=ipb.INVERSION_METHOD_LEARNED),
            ipb.InvertRequest(
                images=[image],
                depths=[2],
                method=ipb.INVERSION_METHOD_OPTIMIZATION,
                optimization=ipb.InversionOptimization(steps=2, progress_every=1),
            ),
        ],
        "EvaluateSae": [
            sae_pb.EvaluateSaeRequest(
                model="vitscope-digits", sae="resid3-topk", images=[image], batch=1, labels=[3]
            ),
        ],
    }


SEEDS = _seeds()


@st.composite
def _mutation(draw: st.DrawFn, seed: Message) -> Message:
    """The seed with one to three fields, at any depth, replaced or cleared."""
    result = type(seed)()
    result.CopyFrom(seed)
    if not seed.DESCRIPTOR.fields:
        return result
    for _ in range(draw(st.integers(1, 3))):
        target: Any = result
        while True:
            field = draw(st.sampled_from(list(target.DESCRIPTOR.fields)))
            nested = field.type == FieldDescriptor.TYPE_MESSAGE and bool(field.message_type.fields)
            if nested and not field.is_repeated and draw(st.booleans()):
                target = getattr(target, field.name)
                continue
            values = getattr(target, field.name) if field.is_repeated else None
            is_map = nested and field.message_type.GetOptions().map_entry
            if nested and values and not is_map and draw(st.booleans()):
                target = values[draw(st.integers(0, len(values) - 1))]
                continue
            break
        if draw(st.integers(0, 4)) == 0:
            target.ClearField(field.name)
        elif field.is_repeated:
            _extend(draw, getattr(target, field.name), field, 1, draw(st.integers(0, 3)))
        elif nested:
            getattr(target, field.name).CopyFrom(draw(_value(field, 1)))
        else:
            setattr(target, field.name, draw(_value(field, 1)))
    return result


def requests(method: Any) -> st.SearchStrategy[Message]:
    """Mostly mutated valid requests of the method, sometimes wholly generated ones."""
    generated = message(method.input_type)
    if method.name not in SEEDS:
        return generated
    mutated = st.sampled_from(SEEDS[method.name]).flatmap(_mutation)
    return st.one_of(mutated, mutated, mutated, generated)
