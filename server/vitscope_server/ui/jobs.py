"""Long work behind the pages: each job runs once per request key on the explorer's workers,
reports progress, can be cancelled through its cancel token, and its result stays cached."""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Executor
from typing import Any

from vitscope_server.core.runtime import errors
from vitscope_server.core.runtime.cancel import CancelToken
from vitscope_server.transport.interceptors import classify
from vitscope_server.ui.local import LocalContext

log = logging.getLogger(__name__)

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
_FINISHED = (DONE, FAILED, CANCELLED)


def error_body(exc: BaseException) -> dict[str, Any]:
    """What the RPC would report for exc: its status code's name, reason, field and message."""
    code, error = classify(exc, LocalContext(CancelToken()))
    return {
        "code": code.name,
        "reason": error.reason.value,
        "field": error.field,
        "message": error.message,
    }


class Job:
    """One computation; its fields change on a worker thread and wake the pages polling it."""

    def __init__(self, job_id: str, kind: str, loop: asyncio.AbstractEventLoop) -> None:
        self.id, self.kind = job_id, kind
        self.cancel = CancelToken()
        self.state = QUEUED
        self.fraction = 0.0
        self.detail = ""
        self.result: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        self.version = 0
        self._loop = loop
        self._changed = asyncio.Event()
        self._lock = threading.Lock()

    def update(self, **fields: Any) -> None:
        """Sets fields (from any thread) and wakes every waiter."""
        with self._lock:
            for name, value in fields.items():
                setattr(self, name, value)
            self.version += 1
        self._loop.call_soon_threadsafe(self._wake)

    def progress(self, done: float, total: float, detail: str = "") -> None:
        self.update(fraction=min(done / total, 1.0) if total else 0.0, detail=detail)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def changed_after(self, seen: int, timeout: float, pace: float = 0.0) -> None:
        """Returns at once when the job has finished; when only its progress moved past
        `seen`, no sooner than `pace` seconds after the call (so that a page polling a fast
        stream of progress makes a few requests a second, not one per step); else at
        `timeout`."""
        loop = asyncio.get_running_loop()
        deadline, earliest = loop.time() + timeout, loop.time() + pace
        while not self.finished:
            now = loop.time()
            moved = self.version > seen
            if moved and now >= earliest:
                return
            wait = (earliest if moved else deadline) - now
            if wait <= 0:
                return
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), wait)
            except asyncio.TimeoutError:
                if not moved:
                    return

    @property
    def finished(self) -> bool:
        return self.state in _FINISHED

    def view(self) -> dict[str, Any]:
        with self._lock:
            return {
                "id": self.id,
                "kind": self.kind,
                "state": self.state,
                "fraction": self.fraction,
                "detail": self.detail,
                "version": self.version,
                "result": self.result,
                "error": self.error,
            }


Work = Callable[[Job], dict[str, Any]]


class Jobs:
    """Jobs by id and by request key; a finished one is kept (at most `keep`) as the cache,
    a failed or cancelled one is replaced by the next start."""

    def __init__(self, workers: Executor, keep: int = 256) -> None:
        self._workers = workers
        self._keep = keep
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._by_id: OrderedDict[str, Job] = OrderedDict()
        self._by_key: dict[Hashable, Job] = {}

    def start(self, key: Hashable, kind: str, work: Work) -> Job:
        with self._lock:
            existing = self._by_key.get(key)
            if existing is not None and existing.state not in (FAILED, CANCELLED):
                return existing
            job = Job(str(next(self._ids)), kind, asyncio.get_running_loop())
            self._by_id[job.id] = job
            self._by_key[key] = job
            self._forget_old()
        self._workers.submit(self._run, job, work)
        return job

    def _forget_old(self) -> None:
        finished = [j for j in self._by_id.values() if j.finished]
        for job in finished[: max(len(self._by_id) - self._keep, 0)]:
            del self._by_id[job.id]
            self._by_key = {k: j for k, j in self._by_key.items() if j is not job}

    def get(self, job_id: str) -> Job:
        job = self._by_id.get(job_id)
        if job is None:
            raise errors.InvalidArgument(
                "job", f"no job {errors.quote(job_id)}; it finished long ago or never existed"
            )
        return job

    def cancel_all(self) -> None:
        with self._lock:
            running = list(self._by_id.values())
        for job in running:
            job.cancel.cancel()

    @staticmethod
    def _run(job: Job, work: Work) -> None:
        if job.cancel.cancelled:
            job.update(state=CANCELLED, error=error_body(errors.Cancelled("cancelled")))
            return
        job.update(state=RUNNING)
        try:
            result = work(job)
        except errors.Cancelled as exc:
            job.update(state=CANCELLED, error=error_body(exc))
        except Exception as exc:
            job.update(state=FAILED, error=error_body(exc))
        else:
            job.update(state=DONE, fraction=1.0, result=result)
