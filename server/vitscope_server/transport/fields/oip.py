"""Declarations of the Open Inference Protocol's request fields (package `inference`), with
the vocabularies of its inputs and parameters that the conversion reads."""

from __future__ import annotations

from vitscope_server.core.activations.compute import Reduction, TensorDType
from vitscope_server.core.model.tokens import TokenMode
from vitscope_server.transport.fields.grammars import (
    INDEX_LIST,
    MODEL_NAME,
    MODEL_VERSION,
    POSITION_LIST,
    SITE,
)
from vitscope_server.transport.fields.rules import (
    Choice,
    Nested,
    Parameter,
    Parameters,
    Range,
    Repeated,
    Rule,
    Text,
    Unchecked,
    Unused,
)

LOGITS = "logits"
TOKEN_MODES = {mode.value: mode for mode in TokenMode if mode is not TokenMode.UNSPECIFIED}
REDUCTIONS = {r.value: r for r in (Reduction.NONE, Reduction.MEAN, Reduction.PATCH_MAP)}
OUTPUT_DTYPES = {
    "FP32": TensorDType.FLOAT32,
    "FP16": TensorDType.FLOAT16,
    "BF16": TensorDType.BFLOAT16,
}
# Input name -> (datatype, rank, what it holds).
INPUTS = {
    "IMAGE": ("BYTES", 1, "encoded PNG, JPEG or WebP images, shape [N]"),
    "PIXELS": ("UINT8", 4, "uint8 RGB pixels [N, H, W, 3], the model's own transform applied"),
    "INPUT": ("FP32", 4, "float32 [N, 3, H, W], already resized and normalized"),
}
_LIST_CHARS = 1 << 16

OUTPUT_PARAMETERS: dict[str, Parameter] = {
    "tokens": Parameter(
        Choice(tuple(TOKEN_MODES), any_case=True),
        "default: all, or patches under a reduction",
    ),
    "token_indices": Parameter(
        Text(_LIST_CHARS, INDEX_LIST),
        "token indices, with tokens=indices",
    ),
    "positions": Parameter(
        Text(_LIST_CHARS, POSITION_LIST),
        "patch positions, with tokens=positions",
    ),
    "reduction": Parameter(Choice(tuple(REDUCTIONS), any_case=True), "default: none"),
    "channels": Parameter(
        Text(_LIST_CHARS, INDEX_LIST),
        "channels, with reduction=patch_map",
    ),
    "datatype": Parameter(Choice(tuple(OUTPUT_DTYPES), any_case=True), "default: FP32"),
}
"""Requested-output parameters; set on the request, they apply to every requested output."""
_PROTOCOL_KEY = Parameter(None, "the protocol's own request key; accepted and not read")
REQUEST_KEYS: tuple[str, ...] = ("sequence_id", "sequence_start", "sequence_end", "priority")
REQUEST_KEYS += ("timeout", "binary_data_output")
_PARAMETER = Unchecked("read through the key of its parameters map, as declared there")
_INT32 = 2**31 - 1

FIELDS: dict[str, Rule] = {
    "inference.ModelReadyRequest.name": Text(256, MODEL_NAME),
    "inference.ModelReadyRequest.version": Text(256, MODEL_VERSION),
    "inference.ModelMetadataRequest.name": Text(256, MODEL_NAME),
    "inference.ModelMetadataRequest.version": Text(256, MODEL_VERSION),
    "inference.ModelInferRequest.model_name": Text(256, MODEL_NAME),
    "inference.ModelInferRequest.model_version": Text(256, MODEL_VERSION),
    "inference.ModelInferRequest.id": Text(1024),
    "inference.ModelInferRequest.parameters": Parameters(
        {**OUTPUT_PARAMETERS, **dict.fromkeys(REQUEST_KEYS, _PROTOCOL_KEY)}
    ),
    "inference.ModelInferRequest.inputs": Repeated(Nested(), 1),
    "inference.ModelInferRequest.outputs": Repeated(Nested(), 1024),
    "inference.ModelInferRequest.raw_input_contents": Repeated(
        Unchecked("bytes matching the input's datatype and shape"), 1
    ),
    "inference.ModelInferRequest.InferInputTensor.name": Choice(tuple(INPUTS)),
    "inference.ModelInferRequest.InferInputTensor.datatype": Choice(
        tuple(sorted({datatype for datatype, _, _ in INPUTS.values()}))
    ),
    "inference.ModelInferRequest.InferInputTensor.shape": Repeated(Range(1, _INT32), 4),
    "inference.ModelInferRequest.InferInputTensor.parameters": Parameters(
        {}, others=Parameter(None, "accepted and not read (e.g. binary_data_size)")
    ),
    "inference.ModelInferRequest.InferInputTensor.contents": Nested(),
    "inference.ModelInferRequest.InferRequestedOutputTensor.name": Text(256, SITE),
    "inference.ModelInferRequest.InferRequestedOutputTensor.parameters": Parameters(
        OUTPUT_PARAMETERS
    ),
    "inference.InferTensorContents.bool_contents": Unused("no input is BOOL"),
    "inference.InferTensorContents.int_contents": Unused("no input is INT8, INT16 or INT32"),
    "inference.InferTensorContents.int64_contents": Unused("no input is INT64"),
    "inference.InferTensorContents.uint64_contents": Unused("no input is UINT64"),
    "inference.InferTensorContents.fp64_contents": Unused("no input is FP64"),
    "inference.InferTensorContents.uint_contents": Repeated(Range(0, 255), 1 << 28),
    "inference.InferTensorContents.fp32_contents": Repeated(
        Range(-3.4028234663852886e38, 3.4028234663852886e38), 1 << 28
    ),
    "inference.InferTensorContents.bytes_contents": Repeated(
        Unchecked("encoded PNG, JPEG or WebP images"), 1 << 16
    ),
    "inference.InferParameter.bool_param": _PARAMETER,
    "inference.InferParameter.int64_param": _PARAMETER,
    "inference.InferParameter.string_param": _PARAMETER,
    "inference.InferParameter.double_param": _PARAMETER,
    "inference.InferParameter.uint64_param": _PARAMETER,
}
