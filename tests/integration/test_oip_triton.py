"""The Open Inference Protocol as the official Triton client speaks it.

tritonclient runs from its own virtualenv (tests/support/external_clients.py), against the
session's server; what it receives must equal GetActivations from this project's client.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from support.external_clients import run_external

from vitscope import Client
from vitscope_server.transport.app import RunningServer

MODEL = "vit"


@pytest.fixture(scope="module")
def triton_run(
    server: RunningServer, client: Client, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict[str, Any], Any, dict[str, Any]]:
    folder = tmp_path_factory.mktemp("triton")
    rng = np.random.default_rng(11)
    pixels = rng.integers(0, 256, (2, 36, 44, 3), dtype=np.uint8)
    pngs = []
    for image in pixels:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        pngs.append(np.frombuffer(buffer.getvalue(), dtype=np.uint8))
    size = client.describe(MODEL).input_size
    preprocessed = torch.randn((2, *size), generator=torch.Generator().manual_seed(3)).numpy()
    inputs = {"pixels": pixels, "preprocessed": preprocessed}
    encoded = {f"png{i}": png for i, png in enumerate(pngs)}
    np.savez(folder / "inputs.npz", **encoded, **inputs)
    result = run_external(
        "triton_calls.py",
        f"127.0.0.1:{server.port}",
        MODEL,
        str(folder / "inputs.npz"),
        str(folder),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((folder / "results.json").read_text())
    arrays = np.load(folder / "results.npz")
    return report, arrays, {"pngs": [bytes(p) for p in pngs], **inputs}


def test_metadata(triton_run: tuple[dict[str, Any], Any, dict[str, Any]], client: Client) -> None:
    report, _, _ = triton_run
    assert report["server_live"] and report["server_ready"] and report["model_ready"]
    assert report["server"]["name"] == "vitscope"
    model = report["model"]
    assert model["name"] == MODEL
    assert {i["name"] for i in model["inputs"]} == {"IMAGE", "PIXELS", "INPUT"}
    outputs = {o["name"]: o for o in model["outputs"]}
    assert set(client.describe(MODEL).sites) | {"logits"} == set(outputs)
    assert outputs["logits"]["datatype"] == "FP32" and outputs["logits"]["shape"][0] == "-1"


def test_infer_with_each_input_kind_equals_get_activations(
    triton_run: tuple[dict[str, Any], Any, dict[str, Any]], client: Client
) -> None:
    report, arrays, inputs = triton_run
    from_png = client.activations(
        inputs["pngs"], ["blocks.0.mlp.hidden"], model=MODEL, top_predictions=1
    )
    np.testing.assert_array_equal(
        arrays["image/blocks.0.mlp.hidden"], from_png["blocks.0.mlp.hidden"]
    )
    logits = arrays["image/logits"]
    assert report["datatypes"]["image/logits"] == "FP32"
    assert [int(row.argmax()) for row in logits] == [p[0].class_index for p in from_png.predictions]
    means = client.activations(
        list(inputs["pixels"]),
        ["blocks.1.out", "blocks.0.attn.out"],
        model=MODEL,
        tokens="patches",
        reduction="mean",
    )
    for site in ("blocks.1.out", "blocks.0.attn.out"):
        np.testing.assert_array_equal(arrays[f"pixels/{site}"], means[site])
    half = client.activations(list(inputs["preprocessed"]), ["final"], model=MODEL, dtype="float16")
    assert report["datatypes"]["input/final"] == "FP16"
    np.testing.assert_array_equal(arrays["input/final"], half["final"])


def test_errors_for_unknown_model_input_and_output(
    triton_run: tuple[dict[str, Any], Any, dict[str, Any]],
) -> None:
    errors = triton_run[0]["errors"]
    assert (
        "NOT_FOUND" in errors["unknown_model"]["status"]
        and "absent" in errors["unknown_model"]["message"]
    )
    assert "INVALID_ARGUMENT" in errors["unknown_input"]["status"]
    assert "PICTURE" in errors["unknown_input"]["message"]
    assert "NOT_FOUND" in errors["unknown_output"]["status"]
    assert "blocks.99.out" in errors["unknown_output"]["message"]
