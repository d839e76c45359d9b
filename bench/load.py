"""Sustained load: N clients call every RPC in a realistic mix on the built-in model.

Run as `HF_HUB_OFFLINE=1 .venv/bin/python bench/load.py [--clients 16] [--seconds 300]`.
It starts `vitscope-server serve` on a free loopback port in its own process (its RSS is what is
measured), waits for the built-in `vitscope-digits` model, then runs --clients threads, each
with its own channel, for --seconds. Each picks the next call by weight (GetActivations most,
optimizations least, every RPC some) with held-out digits as images.

It prints errors by status code, p50/p95/p99 latency and calls per RPC, throughput, and the
server's RSS at start, after one minute (or half the run when shorter) and at the end. The
last line is one JSON object with `errors`, `rss_growth` (end / after one minute) and
`calls_per_s`. Traffic goes only to 127.0.0.1; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from vitscope import Client, VitscopeError
from vitscope_server.builtin import DIGITS_NAME
from vitscope_server.builtin.digits_data import digits_split

MAX_CALLS_PER_CLIENT = 1_000_000
START_SECONDS = 300
CALL_TIMEOUT = 120.0

Call = Callable[[Client, random.Random], Any]


def _digits(count: int) -> list[np.ndarray]:
    return [np.asarray(d, dtype=np.uint8) for d in digits_split()[2][:count]]


def _mix(images: list[np.ndarray]) -> dict[str, tuple[int, Call]]:
    """RPC -> (weight, call). Batches and steps are small, as interactive callers send them."""
    model = DIGITS_NAME

    def some(rng: random.Random, most: int) -> list[np.ndarray]:
        return rng.sample(images, rng.randint(1, most))

    return {
        "ListModels": (4, lambda c, rng: c.list_models()),
        "DescribeModel": (4, lambda c, rng: c.describe(model)),
        "ListInverters": (3, lambda c, rng: c.list_inverters(model)),
        "GetActivations": (
            30,
            lambda c, rng: c.activations(
                some(rng, 8),
                [f"blocks.{rng.randrange(6)}.out", "blocks.5.attn.probs"],
                model=model,
                reduction=rng.choice(["none", "mean"]),
                top_predictions=3,
            ),
        ),
        "ProjectToClassSpace": (
            15,
            lambda c, rng: c.project(some(rng, 4), model=model, top_k=3, importance_maps=True),
        ),
        "ProjectMemories": (
            10,
            lambda c, rng: c.project_memories(rng.randrange(6), model=model, top_k=5),
        ),
        "TopActivatingImages": (
            10,
            lambda c, rng: c.top_activating_images(
                "blocks.3.mlp.hidden", [rng.randrange(64)], images=some(rng, 32), model=model
            ),
        ),
        "Invert": (
            12,
            lambda c, rng: (
                c.invert(some(rng, 4), [rng.randint(1, 6)], model=model)
                if rng.random() < 0.8
                else c.invert(some(rng, 2), [2], method="optimization", steps=10, model=model)
            ),
        ),
        "OptimizeFeatures": (
            6,
            lambda c, rng: c.optimize_features(
                [(f"blocks.{rng.randrange(6)}.mlp.hidden", rng.randrange(64))],
                model=model,
                steps=8,
            ),
        ),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def _start_server(port: int, threads: int) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "vitscope_server.cli", "serve", "--host", "127.0.0.1"]
    command += [
        "--port",
        str(port),
        "--metrics-port",
        "-1",
        "--ui-port",
        "-1",
        "--log-level",
        "WARNING",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VITSCOPE_TORCH_THREADS": str(threads)}
    process = subprocess.Popen(command, env=env)
    deadline = time.monotonic() + START_SECONDS
    with Client(f"127.0.0.1:{port}", timeout=5) as c:
        while True:
            if process.poll() is not None:
                raise RuntimeError("the server exited while starting")
            try:
                if c.health(DIGITS_NAME) == "SERVING":
                    return process
            except VitscopeError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not become SERVING")
            time.sleep(0.5)


class Tally:
    """Latencies and errors from every client thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.errors: Counter[str] = Counter()
        self.error_examples: dict[str, str] = {}

    def record(self, rpc: str, seconds: float, error: VitscopeError | None) -> None:
        with self.lock:
            self.latencies[rpc].append(seconds)
            if error is not None:
                self.errors[error.code] += 1
                self.error_examples.setdefault(error.code, f"{rpc}: {error}"[:300])


def _client_loop(
    target: str, mix: dict[str, tuple[int, Call]], seed: int, until: float, tally: Tally
) -> None:
    rng = random.Random(seed)
    names = list(mix)
    weights = [mix[n][0] for n in names]
    with Client(target, timeout=CALL_TIMEOUT) as client:
        for _ in range(MAX_CALLS_PER_CLIENT):
            if time.monotonic() >= until:
                return
            rpc = rng.choices(names, weights)[0]
            started = time.perf_counter()
            error = None
            try:
                mix[rpc][1](client, rng)
            except VitscopeError as exc:
                error = exc
            tally.record(rpc, time.perf_counter() - started, error)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _report(tally: Tally, seconds: float, rss: dict[str, int]) -> dict[str, Any]:
    total = sum(len(v) for v in tally.latencies.values())
    print(f"{'rpc':<22}{'calls':>7}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}")
    for rpc, values in sorted(tally.latencies.items()):
        p50, p95, p99 = (1000 * _percentile(values, q) for q in (0.5, 0.95, 0.99))
        print(f"{rpc:<22}{len(values):>7}{p50:>10.1f}{p95:>10.1f}{p99:>10.1f}")
    print("errors by code:", dict(tally.errors) or "none")
    for code, example in tally.error_examples.items():
        print(f"  e.g. {code}: {example}")
    print(f"throughput: {total / seconds:.2f} calls/s over {seconds:.0f} s")
    print("server RSS MiB:", {k: round(v / (1 << 20), 1) for k, v in rss.items()})
    return {
        "errors": sum(tally.errors.values()),
        "errors_by_code": dict(tally.errors),
        "rss_growth": round(rss["end"] / rss["after_one_minute"], 4),
        "calls_per_s": round(total / seconds, 3),
        "calls": total,
        "seconds": round(seconds, 1),
        "rss_mib": {k: round(v / (1 << 20), 1) for k, v in rss.items()},
        "p50_ms": {
            rpc: round(1000 * statistics.median(v), 1) for rpc, v in tally.latencies.items()
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    port = _free_port()
    server = _start_server(port, args.threads)
    try:
        target = f"127.0.0.1:{port}"
        mix = _mix(_digits(64))
        rss = {"start": _rss(server.pid)}
        tally = Tally()
        started = time.monotonic()
        until = started + args.seconds
        workers = [
            threading.Thread(
                target=_client_loop, args=(target, mix, args.seed + i, until, tally), daemon=True
            )
            for i in range(args.clients)
        ]
        for worker in workers:
            worker.start()
        checkpoint = started + min(60.0, args.seconds / 2)
        threading.Event().wait(max(0.0, checkpoint - time.monotonic()))
        rss["after_one_minute"] = _rss(server.pid)
        for worker in workers:
            worker.join(timeout=max(0.0, until - time.monotonic()) + CALL_TIMEOUT + 30)
        elapsed = time.monotonic() - started
        rss["end"] = _rss(server.pid)
        summary = _report(tally, elapsed, rss)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
