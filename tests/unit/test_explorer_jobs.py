"""The explorer's jobs without a server: a finished job is the cache, cancelling one sets the
token its work polls, and errors read as the RPCs report them."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from vitscope_server.core.runtime import errors
from vitscope_server.ui.jobs import CANCELLED, DONE, FAILED, Job, Jobs, error_body


async def _settled(job: Job) -> dict[str, Any]:
    view = job.view()
    while view["state"] not in (DONE, FAILED, CANCELLED):
        await job.changed_after(view["version"], timeout=60)
        view = job.view()
    return view


def test_a_finished_job_is_returned_again_without_computing() -> None:
    runs = []

    def work(job: Job) -> dict[str, Any]:
        runs.append(job.id)
        job.progress(1, 2, "half")
        return {"answer": 42}

    async def scenario() -> None:
        with ThreadPoolExecutor(2) as pool:
            jobs = Jobs(pool)
            first = jobs.start(("unit", 1), "histogram", work)
            view = await _settled(first)
            assert view["state"] == DONE and view["result"] == {"answer": 42}
            assert view["fraction"] == 1.0
            assert jobs.start(("unit", 1), "histogram", work) is first
            assert jobs.get(first.id) is first

    asyncio.run(scenario())
    assert len(runs) == 1


def test_cancelling_sets_the_token_the_work_polls_and_a_new_start_computes_again() -> None:
    started = threading.Event()

    def work(job: Job) -> dict[str, Any]:
        stopped = threading.Event()
        job.cancel.on_cancel(stopped.set)
        started.set()
        stopped.wait()
        job.cancel.raise_if_cancelled()
        return {}

    async def scenario() -> None:
        with ThreadPoolExecutor(2) as pool:
            jobs = Jobs(pool)
            job = jobs.start("key", "visualization", work)
            await asyncio.get_running_loop().run_in_executor(None, started.wait)
            job.cancel.cancel()
            view = await _settled(job)
            assert view["state"] == CANCELLED
            assert view["error"]["code"] == "CANCELLED"
            assert jobs.start("key", "visualization", lambda j: {"again": True}) is not job

    asyncio.run(scenario())


def test_errors_read_as_the_rpcs_report_them() -> None:
    invalid = errors.InvalidArgument("channels[0]", "3000 out of range; allowed 0..255")
    assert error_body(invalid) == {
        "code": "INVALID_ARGUMENT",
        "reason": "INVALID_FIELD",
        "field": "channels[0]",
        "message": "channels[0]: 3000 out of range; allowed 0..255",
    }
    unexpected = error_body(RuntimeError("a bug"))
    assert unexpected["code"] == "INTERNAL" and "a bug" not in unexpected["message"]

    async def scenario() -> None:
        with ThreadPoolExecutor(1) as pool:
            jobs = Jobs(pool)

            def fails(job: Job) -> dict[str, Any]:
                raise invalid

            view = await _settled(jobs.start("bad", "histogram", fails))
            assert view["state"] == FAILED and view["error"]["field"] == "channels[0]"

    asyncio.run(scenario())
