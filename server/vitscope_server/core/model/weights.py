"""Building models and loading their weights: random init, a local file, or the hub.

Offline, a hub download fails in seconds with FailedPrecondition instead of
retrying for most of a minute.
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

import torch
from huggingface_hub import constants as hub_constants

from vitscope_server.core.model.specs import ModelSpec
from vitscope_server.core.runtime.errors import FailedPrecondition, Reason

_PROBE_TIMEOUT_SECONDS = 2.0
_SAFE_SUFFIXES = (".safetensors",)
_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Reads safetensors, or a torch checkpoint with weights_only=True (never arbitrary pickles)."""
    if not path.is_file():
        raise FailedPrecondition(
            f"weights file {path} does not exist", reason=Reason.WEIGHTS_UNUSABLE
        )
    if path.suffix in _SAFE_SUFFIXES:
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix not in _TORCH_SUFFIXES:
        allowed = ", ".join(_SAFE_SUFFIXES + _TORCH_SUFFIXES)
        raise FailedPrecondition(
            f"weights file {path} has suffix {path.suffix!r}; allowed: {allowed}",
            reason=Reason.WEIGHTS_UNUSABLE,
        )
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise FailedPrecondition(
            f"weights file {path} cannot be read with weights_only=True: {exc}",
            reason=Reason.WEIGHTS_UNUSABLE,
        ) from exc
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(wrapper), Mapping):
            loaded = loaded[wrapper]
    if not isinstance(loaded, Mapping):
        raise FailedPrecondition(
            f"weights file {path} holds no state dict", reason=Reason.WEIGHTS_UNUSABLE
        )
    return {key.removeprefix("module."): value for key, value in loaded.items()}


def load_state_dict_strictly(
    model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: Path
) -> None:
    try:
        result = model.load_state_dict(dict(state), strict=False)
    except RuntimeError as exc:
        mismatches = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line]
        raise FailedPrecondition(
            f"weights file {source} does not fit the architecture: {len(mismatches)} shape mismatches "
            f"(e.g. {mismatches[:2]})",
            reason=Reason.WEIGHTS_UNUSABLE,
        ) from None
    problems = []
    if result.missing_keys:
        problems.append(f"missing {len(result.missing_keys)} keys (e.g. {result.missing_keys[:3]})")
    if result.unexpected_keys:
        problems.append(
            f"unexpected {len(result.unexpected_keys)} keys (e.g. {result.unexpected_keys[:3]})"
        )
    if problems:
        raise FailedPrecondition(
            f"weights file {source} does not fit the architecture: {'; '.join(problems)}",
            reason=Reason.WEIGHTS_UNUSABLE,
        )


def hub_address() -> tuple[str, int]:
    """Host and port of the hub endpoint huggingface_hub uses (HF_ENDPOINT, or its default)."""
    url = urlsplit(hub_constants.ENDPOINT)
    return url.hostname or "", url.port or (443 if url.scheme == "https" else 80)


def require_hub(spec: ModelSpec) -> None:
    """Fails fast when the hub cannot be reached and the hub library is not offline
    (HF_HUB_OFFLINE, as huggingface_hub itself reads it)."""
    if hub_constants.HF_HUB_OFFLINE:
        return
    host, port = hub_address()
    try:
        socket.create_connection((host, port), timeout=_PROBE_TIMEOUT_SECONDS).close()
    except OSError as exc:
        raise FailedPrecondition(
            f"model {spec.name}: weights {spec.weights!r} need {host}, which is unreachable ({exc}); "
            "use weights: file:PATH, or set HF_HUB_OFFLINE=1 to read the local hub cache",
            reason=Reason.WEIGHTS_UNUSABLE,
        ) from exc


def hub_failure(spec: ModelSpec, exc: Exception) -> FailedPrecondition:
    return FailedPrecondition(
        f"model {spec.name}: weights {spec.weights!r} could not be loaded from the hub: {exc}"
    )


def hub_identity(repo_id: str, filenames: tuple[str, ...], fallback: str) -> str:
    """What a hub load read: the repository, the snapshot commit the cache resolved and the
    file's digest, e.g. "hub:timm/vit_tiny@3f2a.../model.safetensors sha256:...". The first
    of `filenames` (in the library's order of preference) found in the cache is the one
    the library loaded; `fallback` when none is cached (weights fetched from a URL)."""
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        cached = try_to_load_from_cache(repo_id, filename)
        if isinstance(cached, str):
            path = Path(cached)
            commit = path.parents[len(Path(filename).parts) - 1].name  # snapshots/<commit>/...
            return f"hub:{repo_id}@{commit}/{filename} {file_digest(path)}"
    return fallback
