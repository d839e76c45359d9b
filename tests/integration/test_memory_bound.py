"""Under a memory limit like the Deployment's, the server survives decompression bombs and
extreme-aspect images and still answers a normal request.

The server runs in its own process. Once it has loaded its model and served a few calls, its
address space is capped (RLIMIT_AS) at what it uses plus a headroom smaller than its memory
budgets, so both paths are taken: requests the budget refuses, and allocations that fail
and must end as RESOURCE_EXHAUSTED for that call alone.
"""

from __future__ import annotations

import io
import resource
import struct
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image
from support.server_process import ServerProcess, server_process

from vitscope.client import image_message
from vitscope.tensors import to_proto
from vitscope.v1 import activations_pb2 as apb
from vitscope.v1 import common_pb2
from vitscope.v1 import inspector_pb2_grpc as pb_grpc

MODEL = "tiny"
HEADROOM = 768 << 20
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def _encoded(width: int, height: int, fmt: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height)).save(out, format=fmt)
    return out.getvalue()


def _declared_png(width: int, height: int) -> bytes:
    """An IHDR claiming width x height, then a small zlib stream of zeros (a bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = zlib.compress(b"\x00" * (1 << 20), 9)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
    )


def _vm_size(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmSize")


def _bombs() -> list[common_pb2.Image]:
    encoded = [
        _declared_png(100_000, 100_000),
        _declared_png(6_000, 6_000),
        _encoded(6_000, 6_000, "PNG"),
        _encoded(6_000, 6_000, "JPEG"),
        _encoded(16_383, 2_400, "WEBP"),
        _encoded(1, 1_000_000, "PNG"),
        _encoded(1_000_000, 1, "PNG"),
        _encoded(1, 40_000, "PNG"),
        _encoded(2, 5_000, "PNG"),
    ]
    images = [common_pb2.Image(encoded=data) for data in encoded]
    images.append(common_pb2.Image(pixels=to_proto(np.zeros((1, 3_000_000, 3), np.uint8))))
    return images


def _request(images: list[common_pb2.Image]) -> apb.GetActivationsRequest:
    return apb.GetActivationsRequest(model=MODEL, images=images, sites=["blocks.0.out"])


def _outcome(target: str, request: Any) -> grpc.StatusCode:
    with grpc.insecure_channel(
        target, options=[("grpc.max_send_message_length", 64 << 20)]
    ) as channel:
        try:
            for _ in pb_grpc.InspectorStub(channel).GetActivations(request, timeout=120):
                pass
        except grpc.RpcError as error:
            assert error.code() in ALLOWED, f"{error.code()}: {error.details()}"
            return error.code()
    return grpc.StatusCode.OK


def _normal(target: str) -> apb.GetActivationsRequest:
    image = np.random.default_rng(3).integers(0, 256, (160, 160, 3), dtype=np.uint8)
    return _request([image_message(image)])


@pytest.fixture(scope="module")
def bounded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {
        # Budgets above the headroom: some admitted requests must fail to allocate.
        "VITSCOPE_REQUEST_MEMORY_BYTES": str(2 << 30),
        "VITSCOPE_SERVER_MEMORY_BYTES": str(3 << 30),
        "VITSCOPE_MAX_RUNNING": "2",
        "VITSCOPE_TORCH_THREADS": "1",
        "MALLOC_ARENA_MAX": "2",
    }
    with server_process(
        tmp_path_factory.mktemp("bounded"), [f"{MODEL}=timm:test_vit@random"], env
    ) as running:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda _: _outcome(running.target, _normal(running.target)), range(8)))
        limit = _vm_size(running.process.pid) + HEADROOM
        resource.prlimit(running.process.pid, resource.RLIMIT_AS, (limit, limit))
        yield running


def test_bombs_and_extreme_aspects_leave_the_server_serving(bounded: ServerProcess) -> None:
    target = bounded.target
    with grpc.insecure_channel(target) as channel:
        before = [
            r.SerializeToString()
            for r in pb_grpc.InspectorStub(channel).GetActivations(_normal(target), timeout=60)
        ]
    singles = [_request([image]) for image in _bombs()]
    batches = [_request(_bombs()[:4]), _request([_bombs()[2]] * 8)]
    with ThreadPoolExecutor(4) as pool:
        codes = list(pool.map(lambda r: _outcome(target, r), (singles + batches) * 2))
    assert bounded.alive(), bounded.log()
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
    with grpc.insecure_channel(target) as channel:
        after = [
            r.SerializeToString()
            for r in pb_grpc.InspectorStub(channel).GetActivations(_normal(target), timeout=60)
        ]
    assert after == before
