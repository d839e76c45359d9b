"""What serving many callers costs: one call against the same capture in-process, and many
concurrent single-image callers against one in-process batch.

Run as `HF_HUB_OFFLINE=1 .venv/bin/python bench/serving.py [--seconds S] [--threads T]
[--profile]`.
The server runs in a child process, as it would in deployment (clients and server do not
share a GIL); the clients and the in-process baselines run in this process, on the same
device and torch thread count as the server.

- ratio_single_call: one GetActivations of one image at one site (the built-in model
  vitscope-digits, blocks.5.out, image sent preprocessed) / the same capture in-process
  (a plain forward hook on an identically loaded model, the tensor copied to numpy).
  After a checked warm-up, blocks of calls alternate with blocks of the baseline (client
  and server share these cores, and each side's torch threads spin on after its own
  work); the ratio is the median of per-block ratios of medians.
  ratio_single_call_concurrent_model is the same measure on --concurrent-model (one image
  at 224 px, fewer blocks), where the forward rather than the call dominates.
- ratio_concurrent_vs_batched: images/s reached by 16 threads, each with its own client
  calling one image at a time, / images/s of the in-process capture of the same 16 images as
  one batch; --rounds windows of the 16 clients alternate with the in-process batch, and the
  ratio is the median of per-window ratios. Measured on --concurrent-model (default vit_tiny_patch16_224 at
  224 px, random init), where the forward, not Python's per-call work, is what is shared.
- ratio_single_call_vs_floor: the single call's p50 / (the in-process capture's p50 + the
  bare gRPC stream's p50 below): what the service adds beyond the model and the transport.
- profile_ms (--profile): the server's own mean time per stage of the single call (decode,
  preprocess, queue wait, forward, reduce, device to host, encode, send, and the whole
  request), from its Prometheus histograms, scraped before and after the single calls.
- grpc_floor: the p50 of a two-message stream of the single call's sizes from a bare gRPC
  Python server in the same child process, and the ratio_single_call that a service with
  no work of its own beyond the forward would reach: (in-process + floor) / in-process.
- p50/p95 latency at 1, 4 and 16 clients on that model; mean_batch_size is images per
  forward over the 16-client run, from the server's vitscope_batch_images histogram.

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import grpc.experimental
import numpy as np
import torch
from torch import nn

from vitscope.client import Client
from vitscope_server.builtin import DIGITS_NAME, builtin_specs
from vitscope_server.core.model.loading import LoadedModel, load_model
from vitscope_server.core.model.specs import parse_model_flag
from vitscope_server.model_selection import resolve_device
from vitscope_server.settings import ServerSettings
from vitscope_server.transport.app import create_server

SINGLE_SITE = "blocks.5.out"
# The pause before each in-process capture of the after-idle baseline: about what a call's
# transport and client take between two of the server's forwards.
IDLE_SECONDS = 0.003
CONCURRENT_MODEL = "vit_tiny_patch16_224"
CONCURRENT_SITE = "blocks.11.out"
CLIENT_COUNTS = (1, 4, 16)
BATCH = 16
SINGLE_BLOCK = 25
# The single call's sizes on the wire: one 3x28x28 float32 image with its framing, and the
# responses (header; blocks.5.out of 50 tokens x 64 channels in float32).
FLOOR_REQUEST_BYTES = 9500
FLOOR_HEADER_BYTES = 400
FLOOR_CHUNK_BYTES = 12900
TARGETS = {"ratio_single_call_vs_floor": 1.15, "ratio_concurrent_vs_batched": 0.95}
# The server's own stages of a call, in order (vitscope_<stage>_seconds; the queue is
# vitscope_queue_wait_seconds), and the whole call (vitscope_request_duration_seconds).
STAGES = (
    "decode",
    "preprocess",
    "queue_wait",
    "forward",
    "reduce",
    "device_to_host",
    "encode",
    "send",
    "request_duration",
)


def serve(args: argparse.Namespace) -> None:
    """Child process: a server with the built-ins and the concurrent model; prints its ports."""
    settings = ServerSettings(
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        ui_port=-1,
        models=[f"concurrent=timm:{args.concurrent_model}@random"],
        device=args.device,
        torch_threads=args.threads,
        log_level="WARNING",
        **{
            key: value
            for key, value in (
                ("batch_delay_ms", args.batch_delay_ms),
                ("batch_max_images", args.batch_max_images),
                ("max_running", args.max_running),
            )
            if value is not None
        },
    )
    running = create_server(settings)
    running.registry.wait_until_settled()
    floor = _bare_server()
    ports = {"port": running.port, "metrics_port": running.metrics_port, "floor_port": floor[1]}
    print(json.dumps(ports), flush=True)
    sys.stdin.read()
    floor[0].stop(0)
    running.stop(0)


def _bare_server() -> tuple[grpc.Server, int]:
    """A gRPC Python server with one server-streaming method and nothing else: it answers
    any request with two messages the sizes of the single call's header and chunk. Its
    round trip is the floor under any gRPC Python service's call."""

    def respond(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield bytes(FLOOR_HEADER_BYTES)
        yield bytes(FLOOR_CHUNK_BYTES)

    handler = grpc.method_handlers_generic_handler(
        "floor.Bare", {"Stream": grpc.unary_stream_rpc_method_handler(respond)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def floor_call_ms(floor_port: int, request_bytes: int, calls: int) -> float:
    """p50 of the bare server's two-message stream, read as the client reads GetActivations."""
    options = [(grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1)]
    with grpc.insecure_channel(f"127.0.0.1:{floor_port}", options) as channel:
        stream = channel.unary_stream("/floor.Bare/Stream")
        request = bytes(request_bytes)
        seconds = _timed(lambda: list(stream(request)), calls)
    return round(statistics.median(seconds) * 1e3, 3)


def start_child(args: argparse.Namespace) -> tuple[subprocess.Popen[str], dict[str, int]]:
    command = [sys.executable, __file__, "--serve", *sys.argv[1:]]
    child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    line = child.stdout.readline()
    if not line:
        raise RuntimeError("the server process exited before serving")
    return child, json.loads(line)


def hooked(model: nn.Module, path: str) -> Callable[[torch.Tensor], np.ndarray]:
    """The in-process capture: a forward hook on the site's module, copied to numpy."""
    module = model.get_submodule(path)
    captured: list[torch.Tensor] = []
    module.register_forward_hook(lambda _m, _a, output: captured.append(output))

    def capture(pixels: torch.Tensor) -> np.ndarray:
        captured.clear()
        with torch.inference_mode():
            model(pixels)
            return captured[0].float().cpu().numpy()

    return capture


def single_call(args: argparse.Namespace, target: str) -> dict[str, Any]:
    """ratio_single_call on the built-in model, and the same measure on the concurrent model,
    whose forward is long enough for the per-call overhead to show in proportion."""
    spec = next(s for s in builtin_specs() if s.name == DIGITS_NAME)
    digits = load_model(spec, resolve_device(args.device))  # float32 exactly as the server
    image = np.random.default_rng(0).standard_normal((3, 28, 28)).astype(np.float32)
    ratio, timings = _single_call(args, target, (DIGITS_NAME, digits), SINGLE_SITE, image, 1)
    bigger = load_model(
        parse_model_flag(f"c=timm:{args.concurrent_model}@random"), resolve_device(args.device)
    )
    size = bigger.adapter.data_config.input_size
    image = np.random.default_rng(2).standard_normal(size).astype(np.float32)
    bigger_ratio, bigger_timings = _single_call(
        args, target, ("concurrent", bigger), CONCURRENT_SITE, image, SINGLE_BLOCK
    )
    return {
        "ratio_single_call": ratio,
        "single_call_ms": timings,
        "ratio_single_call_concurrent_model": bigger_ratio,
        "single_call_concurrent_model_ms": bigger_timings,
    }


def _single_call(
    args: argparse.Namespace,
    target: str,
    model: tuple[str, LoadedModel],
    site: str,
    image: np.ndarray,
    blocks_divisor: int,
) -> tuple[float, dict[str, float]]:
    """Blocks of calls alternating with blocks of the in-process capture: the median of
    per-block ratios of medians, and the p50 of each side."""
    name, loaded = model
    capture = hooked(loaded.adapter.root, site.removesuffix(".out"))
    pixels = torch.from_numpy(image[None]).to(args.device)
    rpc_s: list[float] = []
    local_s: list[float] = []
    idle_s: list[float] = []
    ratios = []
    with Client(target) as client:
        remote = client.activations([image], [site], model=name)[site]
        np.testing.assert_allclose(remote, capture(pixels), rtol=1e-5, atol=1e-5)

        def call() -> None:
            client.activations([image], [site], model=name)

        for _ in range(max(args.pairs // SINGLE_BLOCK // blocks_divisor, 1)):
            remote_block = _timed(call, SINGLE_BLOCK)
            local_block = _timed(lambda: capture(pixels), SINGLE_BLOCK)
            idle_s += _timed(lambda: capture(pixels), SINGLE_BLOCK, idle=IDLE_SECONDS)
            ratios.append(statistics.median(remote_block) / statistics.median(local_block))
            rpc_s += remote_block
            local_s += local_block
    rpc, local = statistics.median(rpc_s), statistics.median(local_s)
    timings = {
        "rpc_p50": round(rpc * 1e3, 3),
        "inprocess_p50": round(local * 1e3, 3),
        "overhead_p50": round((rpc - local) * 1e3, 3),
        "inprocess_after_idle_p50": round(statistics.median(idle_s) * 1e3, 3),
    }
    return round(statistics.median(ratios), 3), timings


def _timed(call: Callable[[], object], count: int, idle: float = 0.0) -> list[float]:
    """Seconds of each of `count` calls after as many unmeasured ones: the other side's
    torch threads, still spinning from its own block, have settled by then. With `idle`,
    each measured call follows that many seconds of sleep (not counted)."""
    for _ in range(count):
        call()
    seconds = []
    for _ in range(count):
        if idle:
            time.sleep(idle)
        started = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - started)
    return seconds


def stage_totals(metrics_port: int, method: str, model: str) -> dict[str, tuple[float, float]]:
    """(sum, count) of each stage histogram of the server for one method and model."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
    labels = (f'method="{method}"', f'model="{model}"')
    totals = {stage: [0.0, 0.0] for stage in STAGES}
    for line in text.splitlines():
        name, _, rest = line.partition("{")
        if not all(label in rest for label in labels):
            continue
        for stage in STAGES:
            for index, suffix in enumerate(("_sum", "_count")):
                if name == f"vitscope_{stage}_seconds{suffix}":
                    totals[stage][index] += float(line.rsplit(" ", 1)[1])
    return {stage: (values[0], values[1]) for stage, values in totals.items()}


def stage_profile(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]
) -> dict[str, float]:
    """Mean milliseconds per call in each stage between two scrapes."""
    profile = {}
    for stage in STAGES:
        calls = after[stage][1] - before[stage][1]
        if calls:
            profile[stage] = round((after[stage][0] - before[stage][0]) / calls * 1e3, 4)
    return profile


def batch_images_per_forward(metrics_port: int) -> tuple[float, float]:
    """(sum, count) of the server's vitscope_batch_images for the concurrent model."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
    values = {"sum": 0.0, "count": 0.0}
    for line in text.splitlines():
        for key in values:
            if line.startswith(f"vitscope_batch_images_{key}{{") and 'model="concurrent"' in line:
                values[key] = float(line.rsplit(" ", 1)[1])
    return values["sum"], values["count"]


def run_clients(target: str, images: list[np.ndarray], clients: int, seconds: float) -> list[float]:
    """Each thread calls one image at a time until the time is up; returns every latency."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    start = threading.Barrier(clients)

    def work(index: int) -> None:
        with Client(target) as client:
            image = images[index % len(images)]
            client.activations([image], [CONCURRENT_SITE], model="concurrent")
            start.wait()
            stop_at = time.perf_counter() + seconds
            while (now := time.perf_counter()) < stop_at:
                client.activations([image], [CONCURRENT_SITE], model="concurrent")
                latencies[index].append(time.perf_counter() - now)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [x for per_client in latencies for x in per_client]


def inprocess_rate(
    capture: Callable[[torch.Tensor], np.ndarray], pixels: torch.Tensor, reps: int
) -> float:
    """Images/s of the in-process capture of the whole batch (median of reps)."""
    seconds = []
    for _ in range(reps):
        started = time.perf_counter()
        capture(pixels)
        seconds.append(time.perf_counter() - started)
    return len(pixels) / statistics.median(seconds)


def concurrent(args: argparse.Namespace, target: str, metrics_port: int) -> dict[str, Any]:
    """Latency per client count; at 16 clients, rounds alternate with the in-process batch
    so that each round's ratio compares neighbors in time (machine load drifts)."""
    loaded = load_model(
        parse_model_flag(f"c=timm:{args.concurrent_model}@random"), resolve_device(args.device)
    )
    size = loaded.adapter.data_config.input_size
    rng = np.random.default_rng(1)
    images = [rng.standard_normal(size).astype(np.float32) for _ in range(BATCH)]
    capture = hooked(loaded.adapter.root, CONCURRENT_SITE.removesuffix(".out"))
    pixels = torch.from_numpy(np.stack(images)).to(args.device)
    capture(pixels)
    report: dict[str, Any] = {"latency_ms": {}, "images_per_s": {}}
    for clients in CLIENT_COUNTS:
        rounds = args.rounds if clients == BATCH else 1
        window = args.seconds / rounds
        before = batch_images_per_forward(metrics_port)
        latencies: list[float] = []
        ratios, local_rates = [], []
        for _ in range(rounds):
            local_rates.append(inprocess_rate(capture, pixels, args.batch_rounds))
            served = run_clients(target, images, clients, window)
            latencies += served
            ratios.append(len(served) / window / local_rates[-1])
        after = batch_images_per_forward(metrics_port)
        latencies.sort()
        report["latency_ms"][str(clients)] = {
            "p50": round(latencies[len(latencies) // 2] * 1e3, 2),
            "p95": round(latencies[int(len(latencies) * 0.95)] * 1e3, 2),
        }
        report["images_per_s"][str(clients)] = round(len(latencies) / args.seconds, 1)
        if clients == BATCH:
            forwards = after[1] - before[1]
            report["mean_batch_size"] = round((after[0] - before[0]) / max(forwards, 1), 2)
            report["ratio_concurrent_vs_batched"] = round(statistics.median(ratios), 3)
            report["ratio_concurrent_range"] = [round(min(ratios), 3), round(max(ratios), 3)]
            report["images_per_s"]["inprocess_batch16"] = round(statistics.median(local_rates), 1)
    return report


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="GetActivations under one and many callers.")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, both sides")
    parser.add_argument("--pairs", type=int, default=300, help="single-call pairs measured")
    parser.add_argument("--seconds", type=float, default=6.0, help="per client count")
    parser.add_argument("--batch-rounds", type=int, default=5, help="in-process reps per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternations at 16 clients")
    parser.add_argument("--concurrent-model", default=CONCURRENT_MODEL)
    parser.add_argument("--batch-delay-ms", type=float, default=None, help="server setting")
    parser.add_argument(
        "--batch-max-images", type=int, default=None, help="server setting; 0: no batching"
    )
    parser.add_argument("--max-running", type=int, default=None, help="server setting")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="print the server's own time per stage of the single call (from its metrics)",
    )
    return parser.parse_args()


def print_profile(profile: dict[str, float]) -> None:
    print("server stages of one GetActivations on the built-in model, mean ms per call:")
    for stage, ms in profile.items():
        print(f"  {stage:<18} {ms:8.4f}")


def main() -> None:
    args = parse_args()
    if args.serve:
        serve(args)
        return
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    child, ports = start_child(args)
    target = f"127.0.0.1:{ports['port']}"
    try:
        before = stage_totals(ports["metrics_port"], "GetActivations", DIGITS_NAME)
        report = single_call(args, target)
        after = stage_totals(ports["metrics_port"], "GetActivations", DIGITS_NAME)
        floor_ms = floor_call_ms(ports["floor_port"], FLOOR_REQUEST_BYTES, args.pairs)
        inprocess_ms = report["single_call_ms"]["inprocess_p50"]
        call_ms = report["single_call_ms"]["rpc_p50"]
        report["grpc_floor"] = {
            "bare_stream_p50_ms": floor_ms,
            "ratio_single_call_at_floor": round((inprocess_ms + floor_ms) / inprocess_ms, 3),
        }
        report["ratio_single_call_vs_floor"] = round(call_ms / (inprocess_ms + floor_ms), 3)
        idle_ms = report["single_call_ms"]["inprocess_after_idle_p50"]
        report["ratio_single_call_vs_floor_after_idle"] = round(call_ms / (idle_ms + floor_ms), 3)
        if args.profile:
            report["profile_ms"] = stage_profile(before, after)
            print_profile(report["profile_ms"])
        report.update(concurrent(args, target, ports["metrics_port"]))
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(30)
    report.update(
        device=args.device,
        torch_threads=args.threads,
        concurrent_model=args.concurrent_model,
        wall_seconds=round(time.perf_counter() - started, 1),
    )
    for key, target_value in TARGETS.items():
        better = (
            report[key] <= target_value
            if key.startswith("ratio_single_call")
            else report[key] >= target_value
        )
        print(f"{key} {report[key]} (target {target_value}: {'met' if better else 'MISSED'})")
    print(f"latency ms {report['latency_ms']}, images/s {report['images_per_s']}")
    summary = {
        k: report[k]
        for k in (
            "ratio_single_call_vs_floor",
            "ratio_single_call",
            "ratio_concurrent_vs_batched",
            "mean_batch_size",
        )
    }
    print(json.dumps({**summary, **report}))


if __name__ == "__main__":
    main()
