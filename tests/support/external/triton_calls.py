"""Calls a vitscope server with the official Triton client (tritonclient[grpc]).

Run with the external-clients virtualenv (tritonclient pins protobuf below 7).
Arguments: TARGET MODEL INPUTS.npz OUT_DIR; INPUTS.npz holds png0, png1, ... (encoded
images as uint8), pixels and preprocessed. Writes OUT_DIR/results.npz (every output of
every inference, keyed "<call>/<output>") and OUT_DIR/results.json (metadata, datatypes,
shapes and the errors the server answered).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException


def infer(
    client: triton.InferenceServerClient,
    model: str,
    name: str,
    array: np.ndarray,
    datatype: str,
    outputs: list[str],
    parameters: dict[str, str] | None = None,
) -> triton.InferResult:
    tensor = triton.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    requested = [triton.InferRequestedOutput(o) for o in outputs]
    return client.infer(model, [tensor], outputs=requested, parameters=parameters)


def error_of(call) -> dict[str, str]:  # type: ignore[no-untyped-def]
    try:
        call()
    except InferenceServerException as exc:
        return {"status": str(exc.status()), "message": str(exc.message())}
    return {"status": "OK", "message": ""}


def main() -> None:
    target, model, inputs_path, out = sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])
    inputs = np.load(inputs_path)
    pngs = [inputs[k].tobytes() for k in sorted(inputs.files) if k.startswith("png")]
    client = triton.InferenceServerClient(target)
    report: dict[str, object] = {
        "server_live": client.is_server_live(),
        "server_ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(model),
        "server": client.get_server_metadata(as_json=True),
        "model": client.get_model_metadata(model, as_json=True),
    }
    arrays: dict[str, np.ndarray] = {}
    calls = {
        "image": infer(
            client,
            model,
            "IMAGE",
            np.array(pngs, dtype=np.object_),
            "BYTES",
            ["logits", "blocks.0.mlp.hidden"],
        ),
        "pixels": infer(
            client,
            model,
            "PIXELS",
            inputs["pixels"],
            "UINT8",
            ["blocks.1.out", "blocks.0.attn.out"],
            {"tokens": "patches", "reduction": "mean"},
        ),
        "input": infer(
            client,
            model,
            "INPUT",
            inputs["preprocessed"],
            "FP32",
            ["final"],
            {"datatype": "FP16"},
        ),
    }
    datatypes = {}
    for call, result in calls.items():
        for output in result.get_response().outputs:
            arrays[f"{call}/{output.name}"] = result.as_numpy(output.name)
            datatypes[f"{call}/{output.name}"] = output.datatype
    report["datatypes"] = datatypes
    pixels = inputs["pixels"]
    report["errors"] = {
        "unknown_model": error_of(
            lambda: infer(client, "absent", "PIXELS", pixels, "UINT8", ["logits"])
        ),
        "unknown_input": error_of(
            lambda: infer(client, model, "PICTURE", pixels, "UINT8", ["logits"])
        ),
        "unknown_output": error_of(
            lambda: infer(client, model, "PIXELS", pixels, "UINT8", ["blocks.99.out"])
        ),
    }
    np.savez(out / "results.npz", **arrays)
    (out / "results.json").write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
