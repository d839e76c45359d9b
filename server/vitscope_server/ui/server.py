"""Runs the explorer's HTTP server (uvicorn) on a thread of the server's process."""

from __future__ import annotations

import socket
import threading
from typing import Any

import uvicorn
from fastapi import FastAPI

from vitscope_server.settings import ServerSettings
from vitscope_server.transport.progress import StreamPolicy
from vitscope_server.ui.app import create_app
from vitscope_server.ui.explorer import Explorer

_STOP_SECONDS = 5.0


def _listening_socket(host: str, port: int) -> socket.socket:
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.setblocking(False)
    return sock


class UiServer:
    """The explorer bound to host:port (0 picks a free one) and serving until stop()."""

    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        self._socket = _listening_socket(host, port)
        self.port = int(self._socket.getsockname()[1])
        config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, name="ui", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(_STOP_SECONDS)
        self._socket.close()


class RunningExplorer:
    """The explorer's HTTP server and what its endpoints share; stop() cancels its jobs."""

    def __init__(self, http: UiServer, explorer: Explorer) -> None:
        self.http, self.explorer = http, explorer

    @property
    def port(self) -> int:
        return self.http.port

    def stop(self) -> None:
        self.explorer.jobs.cancel_all()
        self.http.stop()
        self.explorer.close()


def start_explorer(settings: ServerSettings, inspector: Any, health: Any) -> RunningExplorer | None:
    """The explorer on settings.ui_port beside the gRPC server (None when ui_port is -1),
    calling `inspector`, the servicer the RPCs run, in process."""
    if settings.ui_port < 0:
        return None
    explorer = Explorer.create(
        inspector,
        health,
        StreamPolicy(
            settings.stream_buffer_messages,
            settings.slow_reader_seconds,
            settings.stream_buffer_bytes,
        ),
        settings.image_roots,
        settings.max_message_bytes,
        workers=settings.max_running + settings.max_queue,
    )
    app = create_app(explorer, settings.token())
    return RunningExplorer(UiServer(app, settings.host, settings.ui_port), explorer)
