"""What GetActivations costs over reading the same sites in-process, and how fast it streams.

Run as `HF_HUB_OFFLINE=1 .venv/bin/python bench/activations.py` (or `make bench`). Everything
runs in this one process on CPU: a real vitscope server on a loopback port serving
vit_base_patch16_224 (random init, seed 0), an identical timm model for the in-process
baseline, and a minimal raw-bytes gRPC stream server for the transfer baseline.

Fairness choices:
- Images: 8 skimage photos, preprocessed once with the served model's own transform and sent
  as float32 [3, 224, 224] tensors, so neither side pays for PNG decoding or resizing.
- Both sides run with the same torch thread count (--threads, default 2).
- The two (or three) sides of each comparison alternate call by call after one warm-up round,
  whose results are also checked to be equal. Each ratio is the median over rounds of that
  round's RPC time / in-process time: pairing neighbors cancels slow drift in machine load.
- transfer_gbps is result bytes / time from the header's arrival to the returned arrays
  (the client reassembles every chunk in that window); echo_gbps is the same bytes / time from
  a one-byte first message to the bytes sitting in one bytearray, streamed in chunks of the
  service's chunk size under the same message-size limits. GB is 1e9 bytes.
- Client and servers share this process and its GIL, so server-side and client-side copies of
  a stream do not overlap as they would across processes; the echo is handicapped alike.

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import timm
import torch
from photos import NAMES, photos
from torch import nn

from vitscope.client import DEFAULT_MAX_MESSAGE_BYTES, Client
from vitscope_server.core.model.registry import ModelState
from vitscope_server.settings import ServerSettings
from vitscope_server.transport.app import RunningServer, create_server

ARCHITECTURE = "vit_base_patch16_224"
MODEL = "vitb"
NUM_BLOCKS = 12
ONE_SITE_BLOCK = 11
ECHO_METHOD = "/vitscope.bench.Echo/Stream"
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TARGETS = {"ratio_one_site": 1.05, "ratio_all_sites_fp32": 1.15, "transfer_over_echo": 0.7}


def site_name(block: int) -> str:
    return f"blocks.{block}.mlp.hidden"


class TimedClient(Client):
    """The real client, noting when the first response (the header) arrives to time the stream."""

    header_at = 0.0

    def _stream(self, method: Any, request: Any, timeout: float | None) -> Iterator[Any]:
        for index, response in enumerate(super()._stream(method, request, timeout)):
            if index == 0:
                self.header_at = time.perf_counter()
            yield response


@dataclass
class Samples:
    """Seconds per repetition of one side of a comparison."""

    seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def ratios(self, other: Samples) -> list[float]:
        """Round-by-round self / other, sorted."""
        return sorted(a / b for a, b in zip(self.seconds, other.seconds, strict=True))


@dataclass
class RpcSamples:
    """An RPC side: total wall time, server compute time, and the stream after the header."""

    total: Samples = field(default_factory=Samples)
    compute: Samples = field(default_factory=Samples)
    stream: Samples = field(default_factory=Samples)


def start_server(threads: int, device: str) -> tuple[RunningServer, ServerSettings]:
    """The service as deployed, minus metrics HTTP and the built-in models."""
    settings = ServerSettings(
        host="127.0.0.1",
        port=0,
        metrics_port=-1,
        ui_port=-1,
        builtin_models=False,
        models=[f"{MODEL}=timm:{ARCHITECTURE}@random"],
        default_model=MODEL,
        device=device,
        torch_threads=threads,
        log_level="WARNING",
    )
    running = create_server(settings)
    running.registry.wait_until_settled()
    entry = running.registry.entry(MODEL)
    if entry.state is not ModelState.READY:
        raise RuntimeError(f"model {MODEL} did not load: {entry.error}")
    return running, settings


def build_inprocess_model(device: str) -> nn.Module:
    """Built exactly as the server's loader does (seed 0, random init, eval, no grad)."""
    torch.manual_seed(0)
    model: nn.Module = timm.create_model(ARCHITECTURE, pretrained=False)
    return model.to(device).eval().requires_grad_(False)


def load_images(running: RunningServer) -> list[np.ndarray]:
    """Real photos through the served model's own preprocessing, as float32 [3, 224, 224]."""
    adapter = running.registry.get(MODEL).adapter
    images = []
    for photo in photos():
        images.append(adapter.preprocess(photo).numpy().astype(np.float32))
    return images


def compute_seconds(running: RunningServer) -> float:
    """Total time the server has held a compute slot for GetActivations (its own metric)."""
    value = running.metrics.registry.get_sample_value(
        "vitscope_compute_seconds_sum", {"method": "GetActivations", "model": MODEL}
    )
    return value or 0.0


def rpc_call(
    client: TimedClient,
    running: RunningServer,
    images: list[np.ndarray],
    blocks: Sequence[int],
    dtype: str,
    samples: RpcSamples,
    compute_dtype: str,
) -> list[np.ndarray]:
    """One GetActivations through the public client; records total, compute and stream times."""
    before = compute_seconds(running)
    started = time.perf_counter()
    sites = [site_name(b) for b in blocks]
    result = client.activations(images, sites, dtype=dtype, compute_dtype=compute_dtype)
    ended = time.perf_counter()
    samples.total.seconds.append(ended - started)
    samples.compute.seconds.append(compute_seconds(running) - before)
    samples.stream.seconds.append(ended - client.header_at)
    return [result[site_name(b)] for b in blocks]


def inprocess_call(
    model: nn.Module,
    images: list[np.ndarray],
    blocks: Sequence[int],
    dtype: str,
    samples: Samples,
    compute_dtype: str,
) -> list[np.ndarray]:
    """The baseline: plain forward hooks on mlp.act (under autocast for a reduced compute
    dtype, as the server runs it), conversion to the dtype, numpy."""
    captured: dict[int, torch.Tensor] = {}

    def hook_for(block: int) -> Callable[[nn.Module, Any, torch.Tensor], None]:
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            captured[block] = output

        return hook

    started = time.perf_counter()
    modules = [model.get_submodule(f"blocks.{b}.mlp.act") for b in blocks]
    handles = [m.register_forward_hook(hook_for(b)) for m, b in zip(modules, blocks, strict=True)]
    device = next(model.parameters()).device
    precision = torch.autocast(device.type, dtype=COMPUTE_DTYPES[compute_dtype])
    try:
        with torch.inference_mode(), precision if compute_dtype != "float32" else nullcontext():
            model(torch.from_numpy(np.stack(images)).to(device))
            arrays = [captured[b].to(TORCH_DTYPES[dtype]).cpu().numpy() for b in blocks]
    finally:
        for handle in handles:
            handle.remove()
    samples.seconds.append(time.perf_counter() - started)
    return arrays


def start_echo_server(settings: ServerSettings, payload: bytes) -> tuple[grpc.Server, int]:
    """Raw bytes, no protobuf: a one-byte first message, then payload in service-sized chunks."""
    chunk_bytes = settings.effective_chunk_bytes

    def stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield b"h"
        for offset in range(0, len(payload), chunk_bytes):
            yield payload[offset : offset + chunk_bytes]

    handler = grpc.method_handlers_generic_handler(
        "vitscope.bench.Echo", {"Stream": grpc.unary_stream_rpc_method_handler(stream)}
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.max_workers),
        handlers=[handler],
        options=[
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ],
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def echo_call(stream: grpc.UnaryStreamMultiCallable, nbytes: int, samples: Samples) -> None:
    """Times the chunks after the first message into one buffer, as the client's assembler does."""
    responses = stream(b"")
    next(responses)
    started = time.perf_counter()
    buffer = bytearray(nbytes)
    offset = 0
    for chunk in responses:
        buffer[offset : offset + len(chunk)] = chunk
        offset += len(chunk)
    samples.seconds.append(time.perf_counter() - started)
    if offset != nbytes:
        raise RuntimeError(f"echo streamed {offset} bytes, expected {nbytes}")


def result_bytes(running: RunningServer, batch: int, blocks: Sequence[int], itemsize: int) -> int:
    """Result bytes from the server's probed site shapes (batch of one); sizes the echo."""
    shapes = running.registry.get(MODEL).site_shapes
    return sum(batch * int(np.prod(shapes[site_name(b)][1:])) * itemsize for b in blocks)


def check_same(rpc: list[np.ndarray], inprocess: list[np.ndarray], compute_dtype: str) -> None:
    """Warm-up guard: both sides must have computed the same activations in the same dtype
    (to bfloat16's or float16's precision when the forward ran in it)."""
    tolerance = 1e-3 if compute_dtype == "float32" else 5e-2
    for remote, local in zip(rpc, inprocess, strict=True):
        if remote.dtype != local.dtype or remote.shape != local.shape:
            raise RuntimeError(f"rpc {remote.dtype}{remote.shape} vs {local.dtype}{local.shape}")
        np.testing.assert_allclose(remote, local, rtol=tolerance, atol=tolerance)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="GetActivations vs in-process capture and echo.")
    parser.add_argument("--reps", type=int, default=5, help="measured rounds per comparison")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on both sides")
    parser.add_argument("--device", default="cpu", help="cpu or cuda, both sides")
    parser.add_argument(
        "--compute-dtype",
        default="float32",
        choices=sorted(COMPUTE_DTYPES),
        help="the forward's precision on both sides (autocast below float32)",
    )
    return parser.parse_args()


def print_table(report: dict[str, Any]) -> None:
    """Medians per case, then the transfer rates, each against the issue's target."""
    print(
        f"{'case':<16}{'rpc s':>8}{'compute s':>11}{'stream s':>10}{'inproc s':>10}"
        f"{'ratio':>8}{'range':>16}"
    )
    keys = {
        "one site fp32": "ratio_one_site",
        "all sites fp32": "ratio_all_sites_fp32",
        "all sites fp16": "ratio_all_sites_fp16",
    }
    ranges = report["ratio_ranges"]
    for case, seconds in report["seconds"].items():
        ratio = report[keys[case]]
        target = TARGETS.get(keys[case])
        verdict = "" if target is None else f"  target <= {target}: {verdict_of(ratio <= target)}"
        print(
            f"{case:<16}{seconds['rpc']:>8.3f}{seconds['rpc_server_compute']:>11.3f}"
            f"{seconds['rpc_stream_after_header']:>10.3f}{seconds['inprocess']:>10.3f}"
            f"{ratio:>8.3f}{'-'.join(f'{r:.3f}' for r in ranges[case]):>16}{verdict}"
        )
    ratio = report["transfer_over_echo"]
    print(
        f"transfer {report['transfer_gbps']:.3f} GB/s, echo {report['echo_gbps']:.3f} GB/s, "
        f"ratio {ratio:.3f} ({'-'.join(f'{r:.3f}' for r in ranges['transfer over echo'])})  "
        f"target >= 0.7: {verdict_of(ratio >= TARGETS['transfer_over_echo'])}"
    )


def verdict_of(ok: bool) -> str:
    return "met" if ok else "MISSED"


CASES = {
    "one site fp32": ([ONE_SITE_BLOCK], "float32"),
    "all sites fp32": (list(range(NUM_BLOCKS)), "float32"),
    "all sites fp16": (list(range(NUM_BLOCKS)), "float16"),
}
TRANSFER_CASE = "all sites fp32"


@dataclass
class Measurements:
    rpc: dict[str, RpcSamples] = field(default_factory=dict)
    inprocess: dict[str, Samples] = field(default_factory=dict)
    echo: Samples = field(default_factory=Samples)
    transfer_bytes: int = 0


def measure(
    reps: int, running: RunningServer, settings: ServerSettings, compute_dtype: str
) -> Measurements:
    """Per case: a checked warm-up round, then `reps` rounds of RPC, in-process (and echo)."""
    model = build_inprocess_model(settings.device)
    images = load_images(running)
    client = TimedClient(f"127.0.0.1:{running.port}", max_message_bytes=settings.max_message_bytes)
    blocks, _ = CASES[TRANSFER_CASE]
    nbytes = result_bytes(running, len(images), blocks, itemsize=4)
    echo_server, echo_port = start_echo_server(settings, np.random.bytes(nbytes))
    channel = grpc.insecure_channel(
        f"127.0.0.1:{echo_port}",
        options=[
            ("grpc.max_send_message_length", DEFAULT_MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", DEFAULT_MAX_MESSAGE_BYTES),
        ],
    )
    echo_stream = channel.unary_stream(ECHO_METHOD)
    out = Measurements(transfer_bytes=nbytes)
    try:
        for case, (blocks, dtype) in CASES.items():
            out.rpc[case], out.inprocess[case] = RpcSamples(), Samples()
            for round_index in range(reps + 1):
                warm_up = round_index == 0
                remote_samples = RpcSamples() if warm_up else out.rpc[case]
                local_samples = Samples() if warm_up else out.inprocess[case]
                remote = rpc_call(
                    client, running, images, blocks, dtype, remote_samples, compute_dtype
                )
                local = inprocess_call(model, images, blocks, dtype, local_samples, compute_dtype)
                if warm_up:
                    check_same(remote, local, compute_dtype)
                del remote, local
                if case == TRANSFER_CASE:
                    echo_call(echo_stream, nbytes, Samples() if warm_up else out.echo)
    finally:
        channel.close()
        client.close()
        echo_server.stop(0).wait()
    return out


def build_report(m: Measurements, args: argparse.Namespace) -> dict[str, Any]:
    """Issue keys first (ratios are medians of per-round ratios), then what explains them."""
    nbytes = m.transfer_bytes
    ratios = {case: m.rpc[case].total.ratios(m.inprocess[case]) for case in CASES}
    stream = m.rpc[TRANSFER_CASE].stream
    # Echo seconds / stream seconds for the same bytes is the transfer rate over the echo rate.
    rate_ratios = m.echo.ratios(stream)
    return {
        "ratio_one_site": round(statistics.median(ratios["one site fp32"]), 4),
        "ratio_all_sites_fp32": round(statistics.median(ratios["all sites fp32"]), 4),
        "ratio_all_sites_fp16": round(statistics.median(ratios["all sites fp16"]), 4),
        "transfer_gbps": round(nbytes / stream.median / 1e9, 3),
        "echo_gbps": round(nbytes / m.echo.median / 1e9, 3),
        "transfer_over_echo": round(statistics.median(rate_ratios), 3),
        "ratio_ranges": {
            case: [round(r[0], 4), round(r[-1], 4)]
            for case, r in {**ratios, "transfer over echo": rate_ratios}.items()
        },
        "seconds": {
            case: {
                "rpc": round(m.rpc[case].total.median, 4),
                "rpc_server_compute": round(m.rpc[case].compute.median, 4),
                "rpc_stream_after_header": round(m.rpc[case].stream.median, 4),
                "inprocess": round(m.inprocess[case].median, 4),
            }
            for case in CASES
        },
        "echo_stream_seconds": round(m.echo.median, 4),
        "transfer_bytes": nbytes,
        "images": f"{len(NAMES)} skimage photos sent preprocessed as float32 [3,224,224]",
        "torch_threads": args.threads,
        "device": args.device,
        "compute_dtype": args.compute_dtype,
        "reps": args.reps,
    }


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    running, settings = start_server(args.threads, args.device)
    try:
        measurements = measure(args.reps, running, settings, args.compute_dtype)
    finally:
        running.stop(0)
    report = build_report(measurements, args)
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    print_table(report)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
