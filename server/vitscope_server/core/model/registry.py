"""The models a server holds: loaded in the background, looked up by name."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import torch

from vitscope_server.core.model.loading import LoadedModel, load_model
from vitscope_server.core.model.specs import ModelSpec
from vitscope_server.core.runtime.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Reason,
    Unavailable,
    VitscopeError,
    quote,
)
from vitscope_server.core.runtime.intra_op import host_thread

log = logging.getLogger(__name__)


class ModelState(Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


@dataclass
class ModelEntry:
    spec: ModelSpec
    state: ModelState = ModelState.LOADING
    loaded: LoadedModel | None = None
    error: str = ""
    load_seconds: float = 0.0


StateListener = Callable[[str, ModelState], None]


class ModelRegistry:
    """Holds every configured model; loading runs on background threads."""

    def __init__(
        self,
        specs: list[ModelSpec],
        default: str,
        device: torch.device,
        *,
        compiled: bool = False,
    ) -> None:
        """compiled: models run their blocks compiled (load_model)."""
        names = [spec.name for spec in specs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise InvalidArgument("models", f"model names must be unique; repeated: {duplicates}")
        if default not in names:
            raise InvalidArgument(
                "default_model", f"{default!r} is not among the configured models {names}"
            )
        self.default = default
        self._compiled = compiled
        self.device = device
        self._entries = {spec.name: ModelEntry(spec) for spec in specs}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._loader: threading.Thread | None = None
        self._listeners: list[StateListener] = []

    def add_listener(self, listener: StateListener) -> None:
        self._listeners.append(listener)

    def start(self) -> None:
        """Loads the default model first, then the rest, on a daemon thread: a shutdown
        never waits for a load to finish. Torch runs on one thread there, so that loads
        never compete with the compute threads (core/runtime/intra_op.py)."""
        order = sorted(self._entries, key=lambda name: name != self.default)

        def load_all() -> None:
            host_thread()
            for name in order:
                if self._closed.is_set():
                    return
                self._load(name)

        self._loader = threading.Thread(target=load_all, name="model-load", daemon=True)
        self._loader.start()

    def wait_until_settled(self, timeout: float | None = None) -> bool:
        """True when no model is still loading (for tests and start-up scripts)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while any(e.state is ModelState.LOADING for e in self.entries()):
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def _load(self, name: str) -> None:
        entry = self._entries[name]
        started = time.perf_counter()
        spec = entry.spec
        log.info(
            "loading model %s (%s:%s, weights %s)",
            name,
            spec.family,
            spec.architecture,
            spec.weights,
        )
        try:
            loaded = load_model(spec, self.device, compiled=self._compiled)
        except VitscopeError as exc:
            self._settle(entry, ModelState.FAILED, None, str(exc), started)
        except Exception as exc:
            log.exception("model %s failed to load", name)
            self._settle(entry, ModelState.FAILED, None, f"{type(exc).__name__}: {exc}", started)
        else:
            self._settle(entry, ModelState.READY, loaded, "", started)

    def _settle(
        self,
        entry: ModelEntry,
        state: ModelState,
        loaded: LoadedModel | None,
        error: str,
        started: float,
    ) -> None:
        with self._lock:
            entry.loaded = loaded
            entry.error = error
            entry.load_seconds = time.perf_counter() - started
            entry.state = state
        if error:
            log.error("model %s failed to load: %s", entry.spec.name, error)
        else:
            log.info("model %s ready in %.2f s", entry.spec.name, entry.load_seconds)
        for listener in self._listeners:
            listener(entry.spec.name, state)

    def label(self, name: str) -> str:
        """A metrics label: the resolved model name, or "unknown" for names not served."""
        resolved = name or self.default
        return resolved if resolved in self._entries else "unknown"

    def entries(self) -> list[ModelEntry]:
        with self._lock:
            return list(self._entries.values())

    def entry(self, name: str) -> ModelEntry:
        resolved = name or self.default
        entry = self._entries.get(resolved)
        if entry is None:
            raise NotFound(
                Reason.MODEL_NOT_FOUND,
                resolved,
                f"model {quote(resolved)} is not served; served models: {sorted(self._entries)}",
                field="model",
            )
        return entry

    def get(self, name: str) -> LoadedModel:
        """The ready model called `name` (empty: the default)."""
        entry = self.entry(name)
        if entry.state is ModelState.LOADING:
            raise Unavailable(
                f"model {entry.spec.name!r} is still loading; retry shortly",
                reason=Reason.MODEL_LOADING,
                metadata={"model": entry.spec.name},
            )
        if entry.state is ModelState.FAILED or entry.loaded is None:
            raise FailedPrecondition(
                f"model {entry.spec.name!r} failed to load: {entry.error}",
                reason=Reason.MODEL_LOAD_FAILED,
                subject=entry.spec.name,
                metadata={"model": entry.spec.name},
            )
        return entry.loaded

    def shutdown(self, wait_seconds: float = 0.0) -> bool:
        """Models not yet loaded are not loaded; True when no load is still running
        after waiting up to wait_seconds for the current one."""
        self._closed.set()
        if self._loader is not None:
            self._loader.join(wait_seconds)
            return not self._loader.is_alive()
        return True
