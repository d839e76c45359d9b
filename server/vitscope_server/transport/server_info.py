"""The handshake: what this server speaks and offers, for GetServerInfo."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

from vitscope.protocol import PROTOCOL, PROTOCOL_REVISION
from vitscope.v1 import inspector_pb2 as pb
from vitscope_server.core.provenance import library_versions
from vitscope_server.core.registry import ModelRegistry
from vitscope_server.transport import convert

_FAMILIES = {
    "ListModels": "models",
    "DescribeModel": "models",
    "GetActivations": "activations",
    "OptimizeFeatures": "features",
    "TopActivatingImages": "features",
    "ProjectToClassSpace": "projection",
    "ProjectMemories": "projection",
    "Invert": "inversion",
    "ListInverters": "inversion",
    "GetServerInfo": "server",
}
SERVICE = pb.DESCRIPTOR.services_by_name["Inspector"]


def method_family(name: str) -> str:
    """The family of an Inspector method; "other" for one this table does not know."""
    return _FAMILIES.get(name, "other")


def _package_version() -> str:
    try:
        return version("vitscope")
    except PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class ServerInfo:
    """Everything GetServerInfo reports that does not change while the server runs."""

    limits: pb.ServerLimits

    def response(self, registry: ModelRegistry) -> pb.GetServerInfoResponse:
        families = dict.fromkeys(method_family(m.name) for m in SERVICE.methods)
        return pb.GetServerInfoResponse(
            protocol=PROTOCOL,
            protocol_revision=PROTOCOL_REVISION,
            server_version=_package_version(),
            library_versions=library_versions(),
            models=[convert.model_summary(e, registry.default) for e in registry.entries()],
            methods=[f"{SERVICE.full_name}/{m.name}" for m in SERVICE.methods],
            method_families=list(families),
            limits=self.limits,
        )
