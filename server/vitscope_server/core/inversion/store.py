"""Inverter stores on disk: one folder per trained inverter, safe to fill from parallel processes.

Layout of a store:

    {module}.safetensors   weights of one inverse module (e.g. embed.safetensors, blocks.3.safetensors)
    {module}.json          its metadata: model, architecture, weights identity, kind, geometry,
                           training data, epochs, validation MSE per epoch and best
    {module}.ckpt          resume state after each epoch (weights, optimizer, history)

Every file is written to a temporary name in the same folder and renamed into place, so a
reader never sees half a file and processes training different modules never touch each
other's files. There is no shared manifest file: the manifest is assembled on read from the
per-module JSON files, which needs no lock.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from vitscope_server.core.inversion.modules import EMBED, Geometry, build_module, chain_names
from vitscope_server.core.runtime.atomic_files import write_atomically, write_text_atomically
from vitscope_server.core.runtime.errors import NotFound, Reason

log = logging.getLogger(__name__)

_IDENTITY_KEYS = ("model", "architecture", "weights_identity")


def write_json(path: Path, data: dict[str, Any]) -> None:
    write_text_atomically(path, json.dumps(data, indent=2) + "\n")


def save_module(store: Path, name: str, module: torch.nn.Module, meta: dict[str, Any]) -> None:
    """Weights first, metadata second: a module counts as present once its JSON exists."""
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    write_atomically(
        store / f"{name}.safetensors", lambda temp: save_file(state, str(temp), {"module": name})
    )
    write_json(store / f"{name}.json", meta)


@dataclass(frozen=True)
class ModuleRecord:
    name: str
    kind: str
    meta: dict[str, Any]

    @property
    def best_val_mse(self) -> float:
        return float(self.meta["best_val_mse"])


@dataclass(frozen=True)
class Manifest:
    """What a store holds, assembled from its per-module metadata."""

    path: Path
    model: str
    architecture: str
    weights_identity: str
    geometry: Geometry
    data: str
    modules: dict[str, ModuleRecord] = field(default_factory=dict)

    @property
    def max_depth(self) -> int:
        """The deepest depth whose whole chain of modules is present (-1: not even embed)."""
        depth = -1
        while all(name in self.modules for name in chain_names(depth + 1)):
            depth += 1
        return depth

    def as_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "architecture": self.architecture,
            "weights_identity": self.weights_identity,
            "data": self.data,
            "geometry": self.geometry.as_json(),
            "max_depth": self.max_depth,
            "modules": {n: r.meta for n, r in sorted(self.modules.items())},
        }


def read_manifest(store: Path) -> Manifest | None:
    """The store's manifest, or None when no module is finished yet.

    Modules disagreeing on model, architecture or weights identity make the store unusable.
    """
    records = []
    for meta_file in sorted(store.glob("*.json")):
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            log.warning("inverter store %s: skipping %s (%s)", store, meta_file.name, exc)
            continue
        if isinstance(meta, dict) and "module" in meta and "weights_identity" in meta:
            records.append(meta)
    if not records:
        return None
    first = records[0]
    for meta in records[1:]:
        clash = [k for k in _IDENTITY_KEYS if meta[k] != first[k]]
        if clash:
            raise ValueError(
                f"inverter store {store}: modules {first['module']} and {meta['module']} "
                f"disagree on {clash}"
            )
    return Manifest(
        path=store,
        model=str(first["model"]),
        architecture=str(first["architecture"]),
        weights_identity=str(first["weights_identity"]),
        geometry=Geometry.from_json(first["geometry"]),
        data=str(first["data"]),
        modules={m["module"]: ModuleRecord(m["module"], m["kind"], m) for m in records},
    )


def load_modules(
    manifest: Manifest, names: list[str], device: torch.device
) -> list[torch.nn.Module]:
    """The named modules in eval mode on `device`, frozen."""
    missing = [n for n in names if n not in manifest.modules]
    if missing:
        raise NotFound(
            Reason.INVERTER_NOT_FOUND,
            f"{manifest.model} {missing[0]}",
            f"inverter of {manifest.model} lacks modules {missing}; "
            f"it reaches depth {manifest.max_depth}",
            metadata={"model": manifest.model},
        )
    modules = []
    for name in names:
        record = manifest.modules[name]
        module = build_module(name, record.kind, manifest.geometry)
        module.load_state_dict(load_file(str(manifest.path / f"{name}.safetensors")))
        modules.append(module.to(device).eval().requires_grad_(False))
    return modules


def embed_kind(manifest: Manifest) -> str:
    record = manifest.modules.get(EMBED)
    return record.kind if record else ""
