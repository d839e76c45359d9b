"""Open Inference Protocol tensors and parameters <-> core types.

Inputs: IMAGE (BYTES [N], encoded PNG/JPEG/WebP), PIXELS (UINT8 [N, H, W, 3], the model's
own transform applied) or INPUT (FP32 [N, 3, H, W], already preprocessed), as raw contents
or typed contents. Outputs: `logits` and any site GetActivations reads, each shaped by the
parameters of its requested output (declared in transport/fields/oip.py).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from vitscope.oip import grpc_predict_v2_pb2 as oip
from vitscope.tensors import length_delimited_field
from vitscope_server.core.activations.compute import ActivationQuery, TensorDType, check_query
from vitscope_server.core.model.images import ImageInput
from vitscope_server.core.model.loading import LoadedModel
from vitscope_server.core.model.sites import sae_sites
from vitscope_server.core.model.tokens import TokenMode
from vitscope_server.core.runtime.errors import (
    InvalidArgument,
    Reason,
    ResourceExhausted,
    VitscopeError,
    quote,
    refiled,
)
from vitscope_server.transport.fields.oip import (
    INPUTS,
    LOGITS,
    OUTPUT_DTYPES,
    OUTPUT_PARAMETERS,
    REDUCTIONS,
    TOKEN_MODES,
)
from vitscope_server.transport.fields.rules import (
    Choice,
    Text,
    parameter_path,
    parameter_text,
)

WIRE_DATATYPES = {
    TensorDType.FLOAT32: "FP32",
    TensorDType.FLOAT16: "FP16",
    TensorDType.BFLOAT16: "BF16",
    TensorDType.INT64: "INT64",
}
_NUMPY: dict[str, np.dtype] = {"UINT8": np.dtype("<u1"), "FP32": np.dtype("<f4")}
_TYPED_FIELD = {"BYTES": "bytes_contents", "UINT8": "uint_contents", "FP32": "fp32_contents"}
_LENGTH = struct.Struct("<I")
_VOCABULARIES: dict[str, Mapping[str, Any]] = {
    "tokens": TOKEN_MODES,
    "reduction": REDUCTIONS,
    "datatype": OUTPUT_DTYPES,
}


@dataclass(frozen=True)
class OutputGroup:
    """Requested outputs that share parameters, read from one query."""

    names: tuple[str, ...]
    query: ActivationQuery


def _text(parameters: Mapping[str, oip.InferParameter], key: str) -> str:
    """A parameter's text as its declaration checked it ("" when absent)."""
    return (parameter_text(parameters[key]) or "").strip() if key in parameters else ""


def _choice(parameters: Mapping[str, oip.InferParameter], key: str, default: str, path: str) -> Any:
    """The value a choice parameter names, by its declared spelling."""
    rule = OUTPUT_PARAMETERS[key].rule
    assert isinstance(rule, Choice)
    text = _text(parameters, key)
    rule.refuse(text, parameter_path(path, key))
    return _VOCABULARIES[key][rule.normal(text) or default]


def _parsed(parameters: Mapping[str, oip.InferParameter], key: str, path: str) -> Any:
    """A list parameter parsed by its declared grammar (empty when absent)."""
    text = _text(parameters, key)
    rule = OUTPUT_PARAMETERS[key].rule
    assert isinstance(rule, Text) and rule.grammar is not None
    return rule.grammar.parse(text, parameter_path(path, key)) if text else ()


def _defaults(parameters: Mapping[str, oip.InferParameter]) -> dict[str, oip.InferParameter]:
    """Request-level parameters that apply to every requested output (for clients that
    cannot set parameters per output); the protocol's own request keys are left out."""
    return {key: value for key, value in parameters.items() if key in OUTPUT_PARAMETERS}


def _site_query(
    output: oip.ModelInferRequest.InferRequestedOutputTensor,
    defaults: Mapping[str, oip.InferParameter],
    field: str,
) -> ActivationQuery:
    """The query an output's parameters ask for, without its site (outputs group by it).
    The parameters were checked against their declarations (fields.oip) on arrival."""
    parameters = {**defaults, **output.parameters}
    path = f"{field}.parameters"
    tokens = _text(parameters, "tokens")
    return ActivationQuery(
        sites=(),
        token_mode=_choice(parameters, "tokens", "", path) if tokens else TokenMode.UNSPECIFIED,
        token_indices=_parsed(parameters, "token_indices", path),
        positions=_parsed(parameters, "positions", path),
        reduction=_choice(parameters, "reduction", "none", path),
        channels=_parsed(parameters, "channels", path),
        output_dtype=_choice(parameters, "datatype", "FP32", path),
    )


def output_groups(request: oip.ModelInferRequest, has_classifier: bool) -> list[OutputGroup]:
    """Requested outputs grouped by their parameters, so that each group is one query.

    No requested outputs means `logits`, the protocol's usual answer for a classifier."""
    outputs = request.outputs
    defaults = _defaults(request.parameters)
    names = [o.name for o in outputs]
    if len(set(names)) != len(names):
        raise InvalidArgument(
            "outputs", f"each output may be requested once; got {len(names)} names"
        )
    if not outputs:
        if not has_classifier:
            raise InvalidArgument(
                "outputs", "this model has no classifier, so name the sites to return"
            )
        return [OutputGroup((LOGITS,), ActivationQuery(sites=(), logits=True))]
    groups: dict[ActivationQuery, list[str]] = {}
    wants_logits = False
    for index, output in enumerate(outputs):
        if output.name == LOGITS:
            if output.parameters:
                raise InvalidArgument(f"outputs[{index}].parameters", "logits take no parameters")
            wants_logits = True
            continue
        query = _site_query(output, defaults, f"outputs[{index}]")
        groups.setdefault(query, []).append(output.name)
    result = [
        OutputGroup(tuple(sites), replace(query, sites=tuple(sites)))
        for query, sites in groups.items()
    ]
    if wants_logits:
        if result:
            first = result[0]
            result[0] = OutputGroup((*first.names, LOGITS), replace(first.query, logits=True))
        else:
            result.append(OutputGroup((LOGITS,), ActivationQuery(sites=(), logits=True)))
    return result


def check_outputs(
    loaded: LoadedModel, request: oip.ModelInferRequest, groups: Sequence[OutputGroup]
) -> None:
    """Every requested site against the model and its parameters, before any decode or
    forward, with errors naming the output (`outputs[i].name`, `outputs[i].parameters`)."""
    index = {output.name: i for i, output in enumerate(request.outputs)}
    for group in groups:
        for name in group.query.sites:
            try:
                check_query(loaded, replace(group.query, sites=(name,), logits=False))
            except VitscopeError as exc:
                raise _output_error(exc, request, index[name]) from None


def _output_error(
    error: VitscopeError, request: oip.ModelInferRequest, output: int
) -> VitscopeError:
    """A GetActivations field of a query as the ModelInfer field that set it: the output, or
    the request-level parameter the output took its value from."""
    path = f"outputs[{output}]"
    if error.field.startswith("sites"):
        return refiled(error, f"{path}.name")
    parameter = next(
        (name for prefix, name in _QUERY_PARAMETERS if error.field.startswith(prefix)), ""
    )
    if not parameter:
        return refiled(error, path)
    if parameter not in request.outputs[output].parameters and parameter in request.parameters:
        return refiled(error, parameter_path("parameters", parameter))
    return refiled(error, parameter_path(f"{path}.parameters", parameter))


# A query's fields, as the output parameters that set them.
_QUERY_PARAMETERS = (
    ("tokens.indices", "token_indices"),
    ("tokens.positions", "positions"),
    ("tokens", "tokens"),
    ("channels", "channels"),
    ("reduction", "reduction"),
    ("output_dtype", "datatype"),
)


def input_field(request: oip.ModelInferRequest, image: int) -> tuple[str, str]:
    """Where a request's `image`-th image lies: the field, and which of its items (when the
    field holds every image)."""
    if request.raw_input_contents:
        return "raw_input_contents[0]", f"image {image}: "
    if request.inputs and request.inputs[0].datatype == "BYTES":
        return f"inputs[0].contents.bytes_contents[{image}]", ""
    return "inputs[0].contents", f"image {image}: "


def _check_shape(shape: Sequence[int], rank: int, field: str, max_elements: int) -> int:
    if len(shape) != rank:
        raise InvalidArgument(f"{field}.shape", f"{list(shape)[:8]} must have {rank} dimensions")
    if any(d <= 0 for d in shape):
        raise InvalidArgument(
            f"{field}.shape", f"every dimension must be positive, got {list(shape)}"
        )
    elements = 1
    for dimension in shape:
        elements *= dimension
        if elements > max_elements:
            raise InvalidArgument(
                f"{field}.shape",
                f"{list(shape)} holds more than the {max_elements} elements a request may carry",
            )
    return elements


def _split_bytes(raw: bytes, count: int, field: str) -> list[bytes]:
    items, position = [], 0
    for _ in range(count):
        if position + _LENGTH.size > len(raw):
            raise InvalidArgument(field, "BYTES elements must each be a 4-byte length and data")
        (length,) = _LENGTH.unpack_from(raw, position)
        position += _LENGTH.size
        if position + length > len(raw):
            raise InvalidArgument(field, "a BYTES element runs past the end of the contents")
        items.append(raw[position : position + length])
        position += length
    if position != len(raw):
        raise InvalidArgument(field, f"{len(raw) - position} bytes after the last element")
    return items


def image_inputs(request: oip.ModelInferRequest, max_request_bytes: int) -> list[ImageInput]:
    """The one input tensor of a request as core image inputs."""
    if len(request.inputs) != 1:
        raise InvalidArgument(
            "inputs",
            f"exactly one input is required (one of {sorted(INPUTS)}); got {len(request.inputs)}",
        )
    raw = list(request.raw_input_contents)
    if raw and len(raw) != 1:
        raise InvalidArgument("raw_input_contents", "one entry per input is required")
    tensor = request.inputs[0]  # a name it sets, its datatype and contents were checked on arrival
    if not tensor.name:
        raise InvalidArgument(
            "inputs[0].name",
            f"required: one of {sorted(INPUTS)}",
            reason=Reason.FIELD_REQUIRED,
        )
    datatype, rank, _ = INPUTS[tensor.name]
    if tensor.datatype != datatype:
        raise InvalidArgument(
            "inputs[0].datatype", f"{tensor.name} is {datatype}, got {quote(tensor.datatype)}"
        )
    count = _check_shape(tensor.shape, rank, "inputs[0]", max_request_bytes)
    typed = getattr(tensor.contents, _TYPED_FIELD[datatype])
    if raw and len(typed):
        raise InvalidArgument("inputs[0].contents", "send raw_input_contents or contents, not both")
    if datatype == "BYTES":
        items = _split_bytes(raw[0], count, "raw_input_contents[0]") if raw else list(typed)
        if len(items) != count:
            raise InvalidArgument(
                "inputs[0].contents", f"{len(items)} elements for shape {list(tensor.shape)}"
            )
        return [ImageInput(encoded=item) for item in items]
    array = _numeric(datatype, tensor.shape, count, raw[0] if raw else None, typed)
    if tensor.name == "PIXELS":
        return [ImageInput(pixels=image) for image in array]
    return [ImageInput(preprocessed=image) for image in array]


def _numeric(
    datatype: str, shape: Sequence[int], count: int, raw: bytes | None, typed: Sequence[float]
) -> np.ndarray:
    dtype = _NUMPY[datatype]
    if raw is not None:
        if len(raw) != count * dtype.itemsize:
            raise InvalidArgument(
                "raw_input_contents[0]",
                f"{len(raw)} bytes; shape {list(shape)} of {datatype} needs "
                f"{count * dtype.itemsize}",
            )
        array = np.frombuffer(raw, dtype=dtype)
    else:
        if len(typed) != count:
            raise InvalidArgument(
                "inputs[0].contents", f"{len(typed)} elements for shape {list(shape)}"
            )
        array = np.asarray(typed).astype(dtype)
    return array.astype(dtype.newbyteorder("="), copy=False).reshape(tuple(shape))


def output_tensor(
    name: str, array: np.ndarray, dtype: TensorDType
) -> tuple[oip.ModelInferResponse.InferOutputTensor, np.ndarray]:
    """A result array as an output tensor and its raw contents: contiguous little-endian."""
    wire = np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<"), copy=False))
    tensor = oip.ModelInferResponse.InferOutputTensor(
        name=name, datatype=WIRE_DATATYPES[dtype], shape=list(array.shape)
    )
    return tensor, wire


_RAW_OUTPUT_FIELD = oip.ModelInferResponse.DESCRIPTOR.fields_by_name["raw_output_contents"].number


def framed_infer_response(
    head: oip.ModelInferResponse, contents: Sequence[np.ndarray], max_bytes: int
) -> bytes:
    """The serialized response: `head` (every field but the raw contents) through protobuf,
    each raw content framed by hand, so that the outputs' bytes are copied once, when the
    parts are joined, rather than into a message and again by its serialization. A response
    over `max_bytes` (one message's limit) is refused by name rather than left to gRPC."""
    parts: list[bytes | memoryview] = [head.SerializeToString()]
    for array in contents:
        raw = memoryview(array.reshape(-1).view(np.uint8).data)
        parts += [length_delimited_field(_RAW_OUTPUT_FIELD, len(raw)), raw]
    size = sum(len(part) for part in parts)
    if size > max_bytes:
        raise ResourceExhausted(
            f"outputs: the response would take {size} bytes, over the {max_bytes} bytes one "
            'message may carry; ask for fewer outputs or images, a "reduction" or "tokens" '
            'parameter, "datatype": "FP16", or use GetActivations, which streams',
            reason=Reason.RESULT_TOO_LARGE,
            field="outputs",
        )
    return b"".join(parts)


def model_metadata(loaded: LoadedModel) -> oip.ModelMetadataResponse:
    """The inputs, and every output ModelInfer can return with its shape for any batch (-1)."""
    adapter = loaded.adapter
    channels, height, width = adapter.data_config.input_size
    meta = oip.ModelMetadataResponse.TensorMetadata
    inputs = [
        meta(name="IMAGE", datatype="BYTES", shape=[-1]),
        meta(name="PIXELS", datatype="UINT8", shape=[-1, -1, -1, 3]),
        meta(name="INPUT", datatype="FP32", shape=[-1, channels, height, width]),
    ]
    outputs = []
    if adapter.has_classifier:
        outputs.append(meta(name=LOGITS, datatype="FP32", shape=[-1, len(adapter.class_names)]))
    for site in [*adapter.canonical_sites(), *sae_sites(adapter)]:
        shape = loaded.site_shapes.get(site.name)
        if shape:
            outputs.append(meta(name=site.name, datatype="FP32", shape=[-1, *shape[1:]]))
    return oip.ModelMetadataResponse(
        name=loaded.spec.name,
        versions=[loaded.weights_identity],
        platform=f"vitscope_{loaded.spec.family}",
        inputs=inputs,
        outputs=outputs,
    )
