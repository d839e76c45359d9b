"""ModelInfer (Open Inference Protocol) against GetActivations for the same site, same run.

Run as `HF_HUB_OFFLINE=1 .venv/bin/python bench/oip.py [--reps N] [--threads T]` (or
`make bench-oip`). One real server on a loopback port serves vit_base_patch16_224 (random
init, CPU unless --device says otherwise); a batch of 8 skimage photos, preprocessed once with the model's own transform,
goes as float32 to both: GetActivations through the project's client, ModelInfer through the
protocol's generated stub with INPUT (FP32) as raw contents, both asking for
blocks.11.mlp.hidden. The two alternate call by call after a checked warm-up; the ratio is the
median of per-round ModelInfer / GetActivations times. It also times the encoding of one such
response alone: framed by hand as the server does, against the same response built as a protobuf
message and serialized (what it did before). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import grpc
import numpy as np
from photos import photos

from vitscope.client import DEFAULT_MAX_MESSAGE_BYTES, Client
from vitscope.oip import grpc_predict_v2_pb2 as oip
from vitscope.oip import grpc_predict_v2_pb2_grpc as oip_grpc
from vitscope_server.core.model.readout import TensorDType
from vitscope_server.settings import ServerSettings
from vitscope_server.transport.app import create_server
from vitscope_server.transport.convert_oip import framed_infer_response, output_tensor

ARCHITECTURE = "vit_base_patch16_224"
MODEL = "vitb"
SITE = "blocks.11.mlp.hidden"
TARGET = 1.05


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=12, help="timed rounds (default 12)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    return parser.parse_args()


def infer_request(batch: np.ndarray) -> oip.ModelInferRequest:
    return oip.ModelInferRequest(
        model_name=MODEL,
        inputs=[
            oip.ModelInferRequest.InferInputTensor(
                name="INPUT", datatype="FP32", shape=list(batch.shape)
            )
        ],
        outputs=[oip.ModelInferRequest.InferRequestedOutputTensor(name=SITE)],
        raw_input_contents=[batch.astype("<f4").tobytes()],
    )


def infer_values(stub: oip_grpc.GRPCInferenceServiceStub, batch: np.ndarray) -> np.ndarray:
    response = stub.ModelInfer(infer_request(batch))
    tensor = response.outputs[0]
    return np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(tuple(tensor.shape))


def encode_seconds(values: np.ndarray, rounds: int) -> tuple[float, float]:
    """Median seconds to serialize a response holding `values`: framed by hand, and built
    as a protobuf message (the two give the same bytes)."""

    def framed() -> bytes:
        head = oip.ModelInferResponse(model_name=MODEL)
        tensor, raw = output_tensor(SITE, values, TensorDType.FLOAT32)
        head.outputs.append(tensor)
        return framed_infer_response(head, [raw], 1 << 30)

    def built() -> bytes:
        response = oip.ModelInferResponse(model_name=MODEL)
        tensor, raw = output_tensor(SITE, values, TensorDType.FLOAT32)
        response.outputs.append(tensor)
        response.raw_output_contents.append(raw.tobytes())
        return response.SerializeToString()

    if framed() != built():
        raise SystemExit("the framed response differs from protobuf's")
    times: dict[str, list[float]] = {"framed": [], "built": []}
    for _ in range(rounds):
        for name, encode in (("framed", framed), ("built", built)):
            started = time.perf_counter()
            encode()
            times[name].append(time.perf_counter() - started)
    return statistics.median(times["framed"]), statistics.median(times["built"])


def main() -> None:
    args = parse_args()
    running = create_server(
        ServerSettings(
            host="127.0.0.1",
            port=0,
            metrics_port=-1,
            ui_port=-1,
            builtin_models=False,
            models=[f"{MODEL}=timm:{ARCHITECTURE}@random"],
            default_model=MODEL,
            device=args.device,
            torch_threads=args.threads,
            log_level="WARNING",
        )
    )
    running.registry.wait_until_settled()
    adapter = running.registry.get(MODEL).adapter
    images = [adapter.preprocess(p).numpy().astype(np.float32) for p in photos()]
    batch = np.stack(images)
    target = f"127.0.0.1:{running.port}"
    options = [
        ("grpc.max_send_message_length", DEFAULT_MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", DEFAULT_MAX_MESSAGE_BYTES),
    ]
    native_seconds: list[float] = []
    oip_seconds: list[float] = []
    try:
        with Client(target) as client, grpc.insecure_channel(target, options=options) as channel:
            stub = oip_grpc.GRPCInferenceServiceStub(channel)
            native = client.activations(images, [SITE], model=MODEL)[SITE]
            if not np.array_equal(infer_values(stub, batch), native):
                raise SystemExit("ModelInfer and GetActivations disagree")
            for _ in range(args.reps):
                started = time.perf_counter()
                client.activations(images, [SITE], model=MODEL)
                native_seconds.append(time.perf_counter() - started)
                started = time.perf_counter()
                infer_values(stub, batch)
                oip_seconds.append(time.perf_counter() - started)
    finally:
        running.stop(0)
    ratios = sorted(o / n for o, n in zip(oip_seconds, native_seconds, strict=True))
    framed, built = encode_seconds(native, max(args.reps, 5))
    report = {
        "ratio_oip_vs_native": round(statistics.median(ratios), 4),
        "ratio_range": [round(ratios[0], 4), round(ratios[-1], 4)],
        "oip_ms": round(1000 * statistics.median(oip_seconds), 2),
        "native_ms": round(1000 * statistics.median(native_seconds), 2),
        "encode_framed_ms": round(1000 * framed, 2),
        "encode_protobuf_ms": round(1000 * built, 2),
        "ratio_encode_framed_vs_protobuf": round(framed / built, 4),
        "site": SITE,
        "batch": len(images),
        "reps": args.reps,
        "target": TARGET,
    }
    print(f"ModelInfer {report['oip_ms']} ms, GetActivations {report['native_ms']} ms (median)")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
