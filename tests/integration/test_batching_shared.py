"""ProjectToClassSpace, learned Invert and Explain batch like GetActivations: requests queued
behind a busy compute slot share their forwards, and each caller gets exactly what it gets
alone."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from skimage import data as skdata
from support.queueing import batches, run_queued, run_queued_cancelling_one
from support.servers import CLIP_WITH_TEXT, DEVICE, TEST_MODELS, start

from vitscope import Client, VitscopeError
from vitscope.client import image_message
from vitscope.explain import MethodOptions
from vitscope.v1 import inspector_pb2_grpc, projection_pb2
from vitscope_server.builtin import DIGITS_NAME
from vitscope_server.builtin.digits_data import digits_split
from vitscope_server.transport.app import RunningServer

PHOTOS = [skdata.astronaut(), skdata.chelsea(), skdata.coffee(), skdata.rocket()]
DIGITS = list(digits_split()[2][:3])

# Representations, token selections, targets, top-k, an open_clip tower with its own labels,
# a request whose own target is invalid, and two that each run in a batch of their own:
# other blocks (a forward captures no more than each request counted) and importance maps.
PROJECTIONS: list[dict[str, Any]] = [
    {"images": [0]},
    {"images": [1, 2], "representations": ["residual", "mlp"], "top_k": 3},
    {"images": [3], "tokens": "indices", "indices": [0, 4], "targets": [2]},
    {"images": [0, 3], "tokens": "patches", "targets": [None, "1"]},
    {"images": [2], "targets": [10_000]},
    {"images": [1], "model": "clip", "class_names": ["cat", "rocket", "cup"]},
    {"images": [0, 2, 3], "model": "clip", "class_names": ["cat", "dog"], "tokens": "prefix"},
    {"images": [2], "importance_maps": True},
    {"images": [1], "blocks": [0]},
]
# Depth sets that differ, and a representation sent instead of images.
INVERSIONS: list[dict[str, Any]] = [
    {"images": [0], "depths": [0, 3]},
    {"images": [1, 2], "depths": [6]},
    {"images": [2], "depths": [3]},
    {"representation": (2, 1), "images": [1]},  # (depth, image): blocks.1.out is depth 2
]


@pytest.fixture(scope="module")
def one_slot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start(
        tmp_path_factory.mktemp("batching"),
        [TEST_MODELS[0], CLIP_WITH_TEXT],
        default_model="vit",
        max_running=1,
        max_queue=16,
    )
    yield running
    running.stop(0)


def _project(client: Client, spec: dict[str, Any]) -> Any:
    kwargs = {k: v for k, v in spec.items() if k not in ("images", "model")}
    try:
        images = [PHOTOS[i] for i in spec["images"]]
        return client.project(images, model=spec.get("model", "vit"), **kwargs)
    except VitscopeError as exc:
        return exc


def _invert(client: Client, spec: dict[str, Any], tokens: dict[int, np.ndarray]) -> Any:
    images = [DIGITS[i] for i in spec["images"]]
    if "representation" in spec:
        depth, index = spec["representation"]
        return client.invert(
            images, representation=tokens[index], representation_depth=depth, model=DIGITS_NAME
        )
    return client.invert(images, spec["depths"], model=DIGITS_NAME)


def _assert_same(alone: Any, batched: Any, path: str = "result") -> None:
    """Every field, recursively; arrays bit for bit on the CPU, within float32 rounding on a GPU."""
    if isinstance(alone, Exception):
        assert type(batched) is type(alone) and str(batched) == str(alone), path
    elif dataclasses.is_dataclass(alone):
        assert type(batched) is type(alone), path
        for f in dataclasses.fields(alone):
            _assert_same(getattr(alone, f.name), getattr(batched, f.name), f"{path}.{f.name}")
    elif isinstance(alone, dict):
        assert batched.keys() == alone.keys(), path
        for key in alone:
            _assert_same(alone[key], batched[key], f"{path}[{key!r}]")
    elif isinstance(alone, (list, tuple)):
        assert len(batched) == len(alone), path
        for index, (a, b) in enumerate(zip(alone, batched, strict=True)):
            _assert_same(a, b, f"{path}[{index}]")
    elif isinstance(alone, (np.ndarray, float)) and DEVICE != "cpu":
        np.testing.assert_allclose(batched, alone, rtol=1e-3, atol=1e-4, err_msg=path)
    elif isinstance(alone, np.ndarray):
        np.testing.assert_array_equal(batched, alone, err_msg=path)
    else:
        assert batched == alone, path


def _compare_queued(server: RunningServer, calls: list[Callable[[], Any]], what: str) -> list[Any]:
    """Each call alone, then all queued together: the same results, field by field.
    Returns the results alone."""
    alone = [call() for call in calls]
    _assert_each_same(alone, run_queued(server, calls, lambda: None), what)
    return alone


def _assert_each_same(alone: list[Any], batched: list[Any], what: str) -> None:
    for index, (expected, got) in enumerate(zip(alone, batched, strict=True)):
        _assert_same(expected, got, f"{what} {index}")


def test_projections_share_forwards_and_match_running_alone(one_slot: RunningServer) -> None:
    before = {m: batches(one_slot, "ProjectToClassSpace", m) for m in ("vit", "clip")}
    with Client(f"127.0.0.1:{one_slot.port}", timeout=120) as client:
        calls = [lambda s=s: _project(client, s) for s in PROJECTIONS]
        alone = _compare_queued(one_slot, calls, "projection")
    assert isinstance(alone[4], VitscopeError) and "targets[0]" in str(alone[4])
    after = {m: batches(one_slot, "ProjectToClassSpace", m) for m in ("vit", "clip")}
    # Alone: one forward each. Queued: the vit requests over every block in one forward,
    # the one over block 0 and the importance maps in one each. An open_clip tower's output
    # projection reads one row per image, with a kernel that depends on the batch size: its
    # requests run alone.
    vit_forwards = after["vit"][0] - before["vit"][0]
    clip_forwards = after["clip"][0] - before["clip"][0]
    assert (vit_forwards, clip_forwards) == (7 + 3, 2 + 2)
    vit_images = sum(len(s["images"]) for s in PROJECTIONS if "model" not in s)
    assert after["vit"][1] - before["vit"][1] == 2 * vit_images


def test_learned_inversions_share_forwards_and_match_running_alone(
    one_slot: RunningServer,
) -> None:
    before = batches(one_slot, "Invert", DIGITS_NAME)
    with Client(f"127.0.0.1:{one_slot.port}", timeout=120) as client:
        tokens = client.activations(DIGITS, ["blocks.1.out"], model=DIGITS_NAME)["blocks.1.out"]
        per_image = {i: tokens[i : i + 1] for i in range(len(DIGITS))}
        calls = [lambda s=s: _invert(client, s, per_image) for s in INVERSIONS]
        alone = _compare_queued(one_slot, calls, "inversion")
    assert [list(a.reconstructions) for a in alone] == [[0, 3], [6], [3], [2]]
    forwards, images = batches(one_slot, "Invert", DIGITS_NAME)
    assert forwards - before[0] == len(INVERSIONS) + 1
    assert images - before[1] == 2 * sum(len(s["images"]) for s in INVERSIONS)


def test_a_cancelled_projection_leaves_the_queue_and_the_others_complete(
    one_slot: RunningServer,
) -> None:
    target = f"127.0.0.1:{one_slot.port}"
    with Client(target, timeout=120) as client, Client(target) as raw:
        calls = [lambda s=s: _project(client, s) for s in PROJECTIONS[:2]]
        alone = [call() for call in calls]
        stub = inspector_pb2_grpc.InspectorStub(raw._channel)
        request = projection_pb2.ProjectToClassSpaceRequest(
            model="vit", images=[image_message(PHOTOS[1])]
        )
        batched, code = run_queued_cancelling_one(
            one_slot, calls, lambda: stub.ProjectToClassSpace(request, timeout=120)
        )
    assert code is grpc.StatusCode.CANCELLED
    _assert_each_same(alone, batched, "projection")


# Explain shares a run among requests whose methods read one forward and no gradient:
# targets and image counts differ; one request's own target is invalid; a gradient method
# and faithfulness curves (seeded per request) run on their own.
SHARED_METHODS = ["rollout", "feature_map"]
FEATURE_SITE = {"feature_map": MethodOptions(site="blocks.1.mlp.hidden")}
EXPLANATIONS: list[dict[str, Any]] = [
    {"images": [0]},
    {"images": [1, 2], "targets": [3, None]},
    {"images": [3], "targets": ["not a class"]},
    {"images": [2, 0, 1], "targets": [1, 2, 4]},
    {"images": [1], "methods": ["rollout", "class_embedding"]},
    {"images": [0], "faithfulness": True},
]


def _explain(client: Client, spec: dict[str, Any]) -> Any:
    try:
        return client.explain(
            [PHOTOS[i] for i in spec["images"]],
            spec.get("methods", SHARED_METHODS),
            model="vit",
            targets=spec.get("targets", ()),
            options=FEATURE_SITE,
            faithfulness=spec.get("faithfulness", False),
            patches_per_step=8,
        )
    except VitscopeError as exc:
        return exc


def test_explanations_share_forwards_and_match_running_alone(one_slot: RunningServer) -> None:
    before = batches(one_slot, "Explain", "vit")
    with Client(f"127.0.0.1:{one_slot.port}", timeout=120) as client:
        calls = [lambda s=s: _explain(client, s) for s in EXPLANATIONS]
        alone = _compare_queued(one_slot, calls, "explanation")
    assert isinstance(alone[2], VitscopeError) and "not a class" in str(alone[2])
    forwards, images = batches(one_slot, "Explain", "vit")
    # Alone: one run per sharable request; queued: the four share one run.
    assert forwards - before[0] == 4 + 1
    assert images - before[1] == 2 * sum(len(s["images"]) for s in EXPLANATIONS[:4])
