"""The server's own fuzz test: generated requests of every RPC it serves (the Inspector and
the Open Inference Protocol), and raw bytes.

No call may end INTERNAL or UNKNOWN, run past its deadline plus a margin, or kill the
server, and a known request is answered identically before and after. `make test` runs a
short pass; `make fuzz` a long one (VITSCOPE_FUZZ_EXAMPLES per RPC, VITSCOPE_FUZZ_SECONDS
in all).

The server's resident memory is reported at the start (after a first request), at its peak
and at the end (once it has settled); with VITSCOPE_FUZZ_MAX_GROWTH set, the end may be at
most that multiple of the start.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf.descriptor import MethodDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.fuzzing import SERVICES, requests
from support.server_process import ServerProcess, server_process
from support.waiting import wait_until

from vitscope import Client

EXAMPLES = int(os.environ.get("VITSCOPE_FUZZ_EXAMPLES", "15"))
MAX_GROWTH = float(os.environ.get("VITSCOPE_FUZZ_MAX_GROWTH", "0"))
MIB = 1 << 20
SECONDS = float(os.environ.get("VITSCOPE_FUZZ_SECONDS", "45"))
CALL_TIMEOUT = 4.0
# Work stops at the next cancellation check after the deadline; a step may be under way.
MARGIN = 8.0
FORBIDDEN = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
MODEL = "tiny"
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)

# Each generated and each raw test gets an equal share of the time.
METHODS = [method for service in SERVICES for method in service.methods]
SHARE = SECONDS / (2 * len(METHODS))
_answers: dict[str, Any] = {}
# (method, code) -> calls, printed at the end (pytest -s) to show how deep the fuzz reached.
_codes: Counter[tuple[str, str]] = Counter()
# Resident bytes of the server: at the start, then read at the end.
_memory: dict[str, int] = {}


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {"VITSCOPE_MAX_QUEUE": "4", "VITSCOPE_SLOW_READER_SECONDS": "5"}
    with server_process(
        tmp_path_factory.mktemp("fuzz"), [f"{MODEL}=timm:test_vit@random"], env
    ) as running:
        yield running


def _status_bytes(pid: int, key: str) -> int:
    """One memory figure of /proc/PID/status (VmRSS, VmHWM) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _settled_rss(pid: int) -> int:
    """The resident size once the server's background work has finished: the same reading,
    within 1%, five polls in a row."""
    readings: list[int] = []

    def steady() -> bool:
        readings.append(_status_bytes(pid, "VmRSS"))
        last = readings[-5:]
        return len(last) == 5 and max(last) - min(last) <= max(last) // 100

    wait_until(steady, "the server's memory to settle")
    return readings[-1]


def _known_answer(target: str) -> dict[str, np.ndarray]:
    image = np.random.default_rng(7).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    with Client(target, timeout=60) as c:
        result = c.activations([image], ["blocks.0.out", "blocks.1.attn.probs"], model=MODEL)
    return {site: result.sites[site].values for site in ("blocks.0.out", "blocks.1.attn.probs")}


def _out_of_time(started: float) -> bool:
    return time.monotonic() - started > SHARE


def _call(channel: grpc.Channel, method: MethodDescriptor, requests: list[Any]) -> None:
    """One call; raw bytes pass unserialized. Fails on a forbidden code or a late answer."""
    path = f"/{method.containing_service.full_name}/{method.name}"

    def serialize(m: Any) -> bytes:
        return m if isinstance(m, bytes) else m.SerializeToString()

    started = time.monotonic()
    code, details = grpc.StatusCode.OK, ""
    try:
        if method.client_streaming:
            channel.stream_unary(path, serialize, bytes)(iter(requests), timeout=CALL_TIMEOUT)
        elif method.server_streaming:
            for _ in channel.unary_stream(path, serialize, bytes)(
                requests[0], timeout=CALL_TIMEOUT
            ):
                pass
        else:
            channel.unary_unary(path, serialize, bytes)(requests[0], timeout=CALL_TIMEOUT)
    except grpc.RpcError as error:
        code, details = error.code(), str(error.details())
    elapsed = time.monotonic() - started
    _codes[(method.name, code.name)] += 1
    assert code not in FORBIDDEN, f"{method.name}: {code.name}: {details}"
    assert elapsed < CALL_TIMEOUT + MARGIN, f"{method.name}: answered after {elapsed:.1f} s"


def test_a_known_request_before(fuzzed: ServerProcess) -> None:
    _answers["before"] = _known_answer(fuzzed.target)
    pid = fuzzed.process.pid
    _memory["start"] = _settled_rss(pid)
    # Resets the peak (VmHWM) to the current size, so the peak is the fuzz's own.
    Path(f"/proc/{pid}/clear_refs").write_text("5")


@pytest.mark.timeout(SHARE + 120)
@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_generated_requests(fuzzed: ServerProcess, method: MethodDescriptor) -> None:
    count = (1, 3) if method.client_streaming else (1, 1)
    drawn_requests = st.lists(requests(method), min_size=count[0], max_size=count[1])
    started = time.monotonic()

    @FUZZ_SETTINGS
    @given(drawn_requests)
    def check(drawn: list[Any]) -> None:
        if _out_of_time(started):
            return
        with grpc.insecure_channel(fuzzed.target) as channel:
            _call(channel, method, drawn)
        assert fuzzed.alive(), fuzzed.log()

    check()


@pytest.mark.timeout(SHARE + 120)
@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_raw_bytes(fuzzed: ServerProcess, method: MethodDescriptor) -> None:
    started = time.monotonic()

    @FUZZ_SETTINGS
    @given(st.lists(st.binary(max_size=200), min_size=1, max_size=2))
    def check(drawn: list[bytes]) -> None:
        if _out_of_time(started):
            return
        with grpc.insecure_channel(fuzzed.target) as channel:
            _call(channel, method, list(drawn))
        assert fuzzed.alive(), fuzzed.log()

    check()


def test_a_known_request_after(fuzzed: ServerProcess, tmp_path: Path) -> None:
    assert fuzzed.alive(), fuzzed.log()
    for (method, code), calls in sorted(_codes.items()):
        print(f"{method:<22}{code:<22}{calls:>6}")
    after = _known_answer(fuzzed.target)
    for site, values in _answers["before"].items():
        np.testing.assert_array_equal(after[site], values, err_msg=site)
    _report_memory(fuzzed.process.pid)


def _report_memory(pid: int) -> None:
    """Prints start, peak and settled end of the server's resident memory; bounds the growth
    when VITSCOPE_FUZZ_MAX_GROWTH asks."""
    start, peak, end = _memory["start"], _status_bytes(pid, "VmHWM"), _settled_rss(pid)
    growth = end / start
    print(
        f"fuzz memory after {sum(_codes.values())} requests: start {start / MIB:.0f} MiB, "
        f"peak {peak / MIB:.0f} MiB ({peak / start:.2f}x), end {end / MIB:.0f} MiB "
        f"({growth:.2f}x)"
    )
    if MAX_GROWTH:
        assert growth <= MAX_GROWTH, f"resident memory grew {growth:.2f}x (allowed {MAX_GROWTH})"
