"""A real server in its own process, so that a crash or an out-of-memory kill shows as such."""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from support.waiting import wait_until

SERVING = health_pb2.HealthCheckResponse.SERVING
START_SECONDS = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def health(target: str, service: str = "") -> int | None:
    with grpc.insecure_channel(target) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2
            )
        except grpc.RpcError:
            return None
    return int(response.status)


def address_space_limit(nbytes: int) -> Callable[[], None]:
    """A preexec_fn that caps the child's address space (RLIMIT_AS)."""

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (nbytes, nbytes))

    return apply


class ServerProcess:
    def __init__(self, process: subprocess.Popen[bytes], target: str, log_path: Path) -> None:
        self.process, self.target, self.log_path = process, target, log_path

    def alive(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def server_process(
    log_dir: Path,
    models: list[str],
    env: dict[str, str] | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> Iterator[ServerProcess]:
    """`vitscope serve` on a free loopback port with these models; settings from VITSCOPE_*."""
    port = free_port()
    command = [sys.executable, "-m", "vitscope_server.cli", "serve", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--metrics-port", "-1"]
    for model in models:
        command += ["--models", model]
    base = {k: v for k, v in os.environ.items() if not k.startswith("VITSCOPE_")}
    log_path = log_dir / f"server-{port}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            command,
            env={**base, "HF_HUB_OFFLINE": "1", **(env or {})},
            stdout=log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=preexec_fn,
        )
    running = ServerProcess(process, f"127.0.0.1:{port}", log_path)
    names = ["", *(model.split("=")[0] for model in models)]

    def serving() -> bool:
        assert running.alive(), f"server exited:\n{running.log()}"
        return all(health(running.target, name) == SERVING for name in names)

    try:
        wait_until(serving, "the server and its models to be SERVING", START_SECONDS)
        yield running
    finally:
        if running.alive():
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
