"""Shutdown: health turns NOT_SERVING while calls are still accepted for the drain delay."""

from __future__ import annotations

import threading

import pytest
from grpc_health.v1 import health_pb2
from support.server_process import health
from support.waiting import wait_until

from vitscope import Client, UnavailableError
from vitscope_server.settings import ServerSettings
from vitscope_server.transport.app import create_server

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


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
    wait_until(lambda: health(target) == NOT_SERVING, "health to say NOT_SERVING", 8)
    assert not stopped.is_set()
    with Client(target, timeout=5) as c:
        assert [m.name for m in c.list_models()] == ["tiny"]
    assert stopped.wait(60)
    with Client(target, timeout=3, retries=1) as c, pytest.raises(UnavailableError):
        c.list_models()
