"""The handshake: what this server speaks and offers, for GetServerInfo."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

from vitscope.oip import grpc_predict_v2_pb2 as oip
from vitscope.protocol import PROTOCOL, PROTOCOL_REVISION
from vitscope.v1 import inspector_pb2, server_info_pb2
from vitscope_server.core.model.provenance import library_versions
from vitscope_server.core.model.registry import ModelRegistry
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
    "Explain": "explain",
    "Intervene": "interventions",
    "GetServerInfo": "server",
    "EvaluateSae": "sae",
}
SERVICE = inspector_pb2.DESCRIPTOR.services_by_name["Inspector"]
INFERENCE = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"]
"""The Open Inference Protocol, served beside the Inspector: the "inference" family."""


def method_family(name: str) -> str:
    """The family of an Inspector method; "other" for one this table does not know."""
    return _FAMILIES.get(name, "other")


def _offered() -> tuple[list[str], list[str]]:
    """Full method names of both services, and their families in order."""
    methods = [f"{SERVICE.full_name}/{m.name}" for m in SERVICE.methods]
    methods += [f"{INFERENCE.full_name}/{m.name}" for m in INFERENCE.methods]
    families = [method_family(m.name) for m in SERVICE.methods] + ["inference"]
    return methods, list(dict.fromkeys(families))


def _package_version() -> str:
    try:
        return version("vitscope")
    except PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class ServerInfo:
    """Everything GetServerInfo reports that does not change while the server runs."""

    limits: server_info_pb2.ServerLimits

    def response(self, registry: ModelRegistry) -> server_info_pb2.GetServerInfoResponse:
        methods, families = _offered()
        return server_info_pb2.GetServerInfoResponse(
            protocol=PROTOCOL,
            protocol_revision=PROTOCOL_REVISION,
            server_version=_package_version(),
            library_versions=library_versions(),
            models=[convert.model_summary(e, registry.default) for e in registry.entries()],
            methods=methods,
            method_families=families,
            limits=self.limits,
        )
