"""Which trained inverters the server offers: the built-in ones plus an operator's store folder.

A store is offered for a served model only when its model name, architecture, weights
identity and geometry (width, heads, token grid, input size, normalization) all match the
loaded model; anything else is logged once, with the reason, and left out. A weights identity
such as `random:seed=0` does not pin the model's constructor arguments, hence the geometry.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch

from vitscope_server.core.inversion.modules import geometry_of
from vitscope_server.core.inversion.store import Manifest, load_modules, read_manifest
from vitscope_server.core.model.loading import LoadedModel
from vitscope_server.core.runtime.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Reason,
)

log = logging.getLogger(__name__)


def scan_stores(root: Path) -> list[Manifest]:
    """Manifests of `root` itself when it is a store, else of its immediate subfolders."""
    if not root.is_dir():
        log.warning("inverters folder %s does not exist; no inverters from it", root)
        return []
    candidates = [root, *sorted(p for p in root.iterdir() if p.is_dir())]
    found = []
    for folder in candidates:
        try:
            manifest = read_manifest(folder)
        except ValueError as exc:
            log.warning("%s; not offered", exc)
            continue
        if manifest is not None:
            found.append(manifest)
    return found


class InverterCatalog:
    """Manifests read once at start-up, matched against models as they are asked for."""

    def __init__(self, roots: list[Path]) -> None:
        self._manifests: list[Manifest] = []
        for root in roots:
            self._manifests.extend(scan_stores(root))
        for manifest in self._manifests:
            log.info(
                "inverter store %s for %s (%s), depth 0..%d",
                manifest.path,
                manifest.model,
                manifest.weights_identity,
                manifest.max_depth,
            )
        self._reported: set[tuple[Path, str]] = set()
        self._lock = threading.Lock()
        self._modules: dict[tuple[Path, str, str], torch.nn.Module] = {}

    def _matches(self, manifest: Manifest, loaded: LoadedModel) -> bool:
        if manifest.model != loaded.spec.name:
            return False
        why = self._mismatch(manifest, loaded)
        if why is None:
            return True
        key = (manifest.path, loaded.weights_identity)
        if key not in self._reported:
            self._reported.add(key)
            log.warning(
                "inverter store %s not offered for %s: %s", manifest.path, loaded.spec.name, why
            )
        return False

    @staticmethod
    def _mismatch(manifest: Manifest, loaded: LoadedModel) -> str | None:
        """Why the store does not fit the served model, or None when it does."""
        trained = (manifest.architecture, manifest.weights_identity)
        served = (loaded.spec.architecture, loaded.weights_identity)
        if trained != served:
            return "trained for {} {}, served model is {} {}".format(*trained, *served)
        try:
            geometry = geometry_of(loaded)
        except (InvalidArgument, FailedPrecondition) as exc:
            return str(exc)
        if manifest.geometry != geometry:
            return f"trained for geometry {manifest.geometry}, served model has {geometry}"
        return None

    def stores_for(self, loaded: LoadedModel) -> list[Manifest]:
        return [m for m in self._manifests if self._matches(m, loaded)]

    def for_model(self, loaded: LoadedModel) -> Manifest:
        """The matching store reaching deepest; NOT_FOUND naming the model when there is none."""
        stores = self.stores_for(loaded)
        if not stores:
            geometry_of(loaded)  # a model no inverter can fit says why, before "none trained"
            raise NotFound(
                Reason.INVERTER_NOT_FOUND,
                loaded.spec.name,
                f"model {loaded.spec.name!r} has no trained inverter; train one with "
                "`vitscope-server train-inverter` or use method OPTIMIZATION",
                field="method",
                metadata={"model": loaded.spec.name},
            )
        return max(stores, key=lambda m: m.max_depth)

    def modules(
        self, manifest: Manifest, names: list[str], device: torch.device
    ) -> dict[str, torch.nn.Module]:
        """The named modules, frozen on `device`; read from disk once, then shared by calls."""
        with self._lock:
            wanted = [n for n in names if (manifest.path, n, str(device)) not in self._modules]
            for name, module in zip(wanted, load_modules(manifest, wanted, device), strict=True):
                self._modules[(manifest.path, name, str(device))] = module
            return {n: self._modules[(manifest.path, n, str(device))] for n in names}
