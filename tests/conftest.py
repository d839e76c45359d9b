"""Shared fixtures: a real server on an ephemeral port serving small real models."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
# Test servers bind free ports; the explorer's default port (8080) is left alone, and a test
# that wants the explorer asks for it (ui_port=0).
os.environ.setdefault("VITSCOPE_UI_PORT", "-1")

from collections.abc import Iterator

import pytest
import torch
from support.servers import DEVICE, start

from vitscope import Client
from vitscope_server.transport.app import RunningServer

torch.set_num_threads(2)

# tests/unit: no server; tests/integration: a real server on a real port; tests/system: the
# deployment, the demo, the model zoo and the fuzz, each as a user or an operator runs them.
KINDS = ("unit", "integration", "system")


def pytest_report_header() -> str:
    return f"vitscope test device: {DEVICE}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Marks each test with its kind, from its folder (`-m unit`, `-m "not system"`)."""
    for item in items:
        kind = item.path.parent.name
        assert kind in KINDS, f"{item.nodeid}: tests live in tests/{{{','.join(KINDS)}}}/"
        item.add_marker(getattr(pytest.mark, kind))


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start(tmp_path_factory.mktemp("server"), default_model="vit", max_running=3)
    yield running
    running.stop(0)


@pytest.fixture(scope="session")
def client(server: RunningServer) -> Iterator[Client]:
    with Client(f"127.0.0.1:{server.port}", timeout=60) as c:
        yield c


@pytest.fixture(scope="session")
def loaded(server: RunningServer):  # type: ignore[no-untyped-def]
    """name -> LoadedModel held by the server (for shapes only; references are built independently)."""
    return {e.spec.name: server.registry.get(e.spec.name) for e in server.registry.entries()}
