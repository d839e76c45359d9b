"""Shutdown: health turns NOT_SERVING while calls are still accepted for the drain delay."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vitscope import Client, UnavailableError
from vitscope_server.settings import ServerSettings
from vitscope_server.transport.app import create_server

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _health(target: str) -> int | None:
    with grpc.insecure_channel(target) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=2
            )
        except grpc.RpcError:
            return None
    return int(response.status)


def test_health_says_not_serving_while_calls_are_still_accepted() -> None:
    settings = ServerSettings(
        host="127.0.0.1",
        port=0,
        metrics_port=-1,
        builtin_models=False,
        models=["tiny=timm:test_vit@random"],
    )
    running = create_server(settings)
    assert running.registry.wait_until_settled(120)
    target = f"127.0.0.1:{running.port}"
    stopped = threading.Event()

    def stop() -> None:
        running.stop(grace=5, drain_delay=8)
        stopped.set()

    threading.Thread(target=stop).start()
    deadline = time.monotonic() + 8
    while _health(target) != NOT_SERVING:
        assert time.monotonic() < deadline, "health never said NOT_SERVING"
        time.sleep(0.02)
    assert not stopped.is_set()
    with Client(target, timeout=5) as c:
        assert [m.name for m in c.list_models()] == ["tiny"]
    assert stopped.wait(60)
    with Client(target, timeout=3, retries=1) as c, pytest.raises(UnavailableError):
        c.list_models()
