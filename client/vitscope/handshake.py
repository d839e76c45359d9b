"""The version and capability handshake: what a server speaks and offers, and whether
this client can use it."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version

from vitscope.errors import IncompatibleServerError
from vitscope.protocol import PROTOCOL, REQUIRED_REVISION
from vitscope.v1 import models_pb2, server_info_pb2


@dataclass(frozen=True)
class ServerLimits:
    """Bounds every request must stay within (server settings)."""

    max_message_bytes: int
    max_batch: int
    max_image_pixels: int
    max_result_bytes: int
    chunk_bytes: int
    max_running: int
    max_queue: int


@dataclass(frozen=True)
class ServerInfo:
    protocol: str
    protocol_revision: int
    server_version: str
    library_versions: dict[str, str]
    models: list[str]
    default_model: str
    methods: list[str]
    method_families: list[str]
    limits: ServerLimits
    model_states: dict[str, str] = field(default_factory=dict)


def client_version() -> str:
    try:
        return version("vitscope")
    except PackageNotFoundError:
        return "unknown"


def parse_server_info(response: server_info_pb2.GetServerInfoResponse) -> ServerInfo:
    limits = response.limits
    return ServerInfo(
        protocol=response.protocol,
        protocol_revision=response.protocol_revision,
        server_version=response.server_version,
        library_versions=dict(response.library_versions),
        models=[m.name for m in response.models],
        default_model=next((m.name for m in response.models if m.is_default), ""),
        methods=list(response.methods),
        method_families=list(response.method_families),
        limits=ServerLimits(
            max_message_bytes=limits.max_message_bytes,
            max_batch=limits.max_batch,
            max_image_pixels=limits.max_image_pixels,
            max_result_bytes=limits.max_result_bytes,
            chunk_bytes=limits.chunk_bytes,
            max_running=limits.max_running,
            max_queue=limits.max_queue,
        ),
        model_states={
            m.name: models_pb2.ModelState.Name(m.state).removeprefix("MODEL_STATE_").lower()
            for m in response.models
        },
    )


def ours() -> str:
    return f"this client (vitscope {client_version()}) needs {PROTOCOL} revision >= {REQUIRED_REVISION}"


def require_compatible(info: ServerInfo) -> ServerInfo:
    """The info unchanged when this client can use the server; otherwise an error naming both
    sides' versions."""
    if info.protocol != PROTOCOL or info.protocol_revision < REQUIRED_REVISION:
        theirs = (
            f"the server (vitscope {info.server_version}) speaks {info.protocol or '?'} "
            f"revision {info.protocol_revision}"
        )
        raise IncompatibleServerError(f"{theirs}; {ours()}; upgrade the server")
    return info


def predates_handshake() -> IncompatibleServerError:
    """For a server without GetServerInfo (UNIMPLEMENTED): older than revision 2."""
    return IncompatibleServerError(
        f"the server predates the version handshake ({PROTOCOL} revision < 2); "
        f"{ours()}; upgrade the server"
    )


def describe(info: ServerInfo) -> str:
    """Lines for a person (`vitscope info`)."""
    libraries = ", ".join(f"{k} {v}" for k, v in sorted(info.library_versions.items()))
    limits = ", ".join(f"{k}={v}" for k, v in info.limits.__dict__.items())
    models = ", ".join(
        f"{name}{'*' if name == info.default_model else ''} ({info.model_states.get(name, '?')})"
        for name in info.models
    )
    return "\n".join(
        [
            f"protocol: {info.protocol} revision {info.protocol_revision}",
            f"server: vitscope {info.server_version}; client: vitscope {client_version()}",
            f"libraries: {libraries}",
            f"models: {models}",
            f"method families: {', '.join(info.method_families)}",
            f"methods: {len(info.methods)}",
            f"limits: {limits}",
        ]
    )
