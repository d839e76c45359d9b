"""What produced a result: model, weights, library versions, device, seed."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import PackageNotFoundError, version

from vitscope_server.core.model.loading import LoadedModel

_LIBRARIES = ("vitscope", "torch", "timm", "open_clip_torch", "numpy")


@cache
def library_versions() -> dict[str, str]:
    found = {}
    for name in _LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


@dataclass(frozen=True)
class Provenance:
    model: str
    weights_identity: str
    device: str
    seed: int = 0
    libraries: dict[str, str] = field(default_factory=library_versions)


def provenance_of(loaded: LoadedModel, seed: int = 0) -> Provenance:
    return Provenance(loaded.spec.name, loaded.weights_identity, str(loaded.device), seed)
