"""TopActivatingImages and the sharded `vitscope-server scan` against plain hooks, on a real server."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support.features_reference import as_input, build_digits_model, hidden, normalize
from support.reference import reference_sites
from support.servers import start

from vitscope import Client, InvalidArgumentError, NotFoundError, ResourceExhaustedError
from vitscope.cli import main
from vitscope.client import ImageLike
from vitscope.errors import PermissionDeniedError, VitscopeError
from vitscope_server.builtin.digits_data import digits_split
from vitscope_server.cli import main as server_main
from vitscope_server.core.activations.top_images import (
    ScanItem,
    ScanQuery,
    TopImageScan,
    file_items,
)
from vitscope_server.core.model.image_folders import IMAGE_SUFFIXES, list_images
from vitscope_server.core.model.images import ALLOWED_FORMATS, ImageInput
from vitscope_server.core.runtime.cancel import NEVER_CANCELLED
from vitscope_server.core.runtime.errors import InvalidArgument
from vitscope_server.transport.app import RunningServer

DIGITS = "vitscope-digits"
SITE = "blocks.3.mlp.hidden"
CHANNELS = [0, 32, 100]
COUNT = 30


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    return digits_split()[2][:COUNT]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory, digits: np.ndarray) -> Path:
    """An allowed image root holding the digits as PNGs in two subfolders, plus a secret outside."""
    base = tmp_path_factory.mktemp("images")
    allowed = base / "allowed"
    for index, digit in enumerate(digits):
        folder = allowed / "digits" / ("a" if index < COUNT // 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(digit).save(folder / f"{index:03d}.png")
    (base / "secret").mkdir()
    Image.fromarray(digits[0]).save(base / "secret" / "outside.png")
    os.symlink(base / "secret" / "outside.png", allowed / "digits" / "b" / "zz-link.png")
    return allowed


@pytest.fixture(scope="module")
def folder_server(tmp_path_factory: pytest.TempPathFactory, root: Path) -> Iterator[RunningServer]:
    running = start(tmp_path_factory.mktemp("top"), image_roots=[root])
    yield running
    running.stop(0)


@pytest.fixture(scope="module")
def tclient(folder_server: RunningServer) -> Iterator[Client]:
    with Client(f"127.0.0.1:{folder_server.port}", timeout=120) as c:
        yield c


def reference_top(digits: np.ndarray, k: int) -> dict[int, list[tuple[int, float, np.ndarray]]]:
    """Top-k per channel by mean over patch tokens, from a hand-built model and a plain hook."""
    with torch.no_grad():
        units = hidden(build_digits_model(), 3, normalize(as_input(digits)))[:, 1:]
    tops = {}
    for channel in CHANNELS:
        scores = units[:, :, channel].mean(1).numpy()
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]
        tops[channel] = [
            (i, float(scores[i]), units[i, :, channel].reshape(7, 7).numpy()) for i in order
        ]
    return tops


def test_streamed_images_match_hooks(
    tclient: Client, folder_server: RunningServer, digits: np.ndarray
) -> None:
    result = tclient.top_activating_images(
        SITE, CHANNELS, images=list(digits), top_k=4, model=DIGITS, batch=7
    )
    labels = {"method": "TopActivatingImages", "model": DIGITS, "code": "OK"}
    assert folder_server.metrics.registry.get_sample_value("vitscope_requests_total", labels)
    assert result.scanned_image_count == COUNT and result.top_k == 4 and result.site == SITE
    assert result.provenance["model"] == DIGITS
    for channel, expected in reference_top(digits, 4).items():
        got = result.channels[channel]
        assert [t.index for t in got] == [i for i, _, _ in expected]
        assert [t.score for t in got] == pytest.approx([s for _, s, _ in expected], abs=1e-5)
        for hit, (_, _, patch_map) in zip(got, expected, strict=True):
            np.testing.assert_allclose(hit.patch_map, patch_map, atol=1e-5)


def test_server_folder_matches_streaming(tclient: Client, root: Path, digits: np.ndarray) -> None:
    """Files in sorted order: a/000..014 then b/015..029; the symlink out of the root is skipped."""
    result = tclient.top_activating_images(
        SITE, CHANNELS, image_folder=str(root / "digits"), top_k=4, model=DIGITS
    )
    assert result.scanned_image_count == COUNT
    for channel, expected in reference_top(digits, 4).items():
        got = result.channels[channel]
        assert [t.index for t in got] == [i for i, _, _ in expected]
        assert [t.path for t in got] == [
            f"{'a' if i < COUNT // 2 else 'b'}/{i:03d}.png" for i, _, _ in expected
        ]
        assert [t.score for t in got] == pytest.approx([s for _, s, _ in expected], abs=1e-5)


def test_kept_maps_do_not_hold_their_batch(
    folder_server: RunningServer, digits: np.ndarray
) -> None:
    scan = TopImageScan(folder_server.registry.get(DIGITS), ScanQuery(SITE, (0, 32), 2))
    items = [ScanItem(i, "", ImageInput(pixels=d)) for i, d in enumerate(digits[:6])]
    scan.add(scan.prepare(items, 10_000), items, NEVER_CANCELLED)
    for hits in scan.tops.values():
        assert all(hit.patch_map.base is None and hit.patch_map.shape == (7, 7) for hit in hits)


def test_open_clip_tower(tclient: Client) -> None:
    images = np.random.default_rng(0).normal(size=(6, 3, 64, 64)).astype(np.float32)
    result = tclient.top_activating_images(
        "blocks.1.mlp.hidden", [3, 9], images=list(images), top_k=2, model="clip"
    )
    units = reference_sites("clip", torch.from_numpy(images))["blocks.1.mlp.hidden"][:, 1:]
    for channel in (3, 9):
        scores = units[:, :, channel].mean(1)
        order = np.argsort(-scores, kind="stable")[:2]
        assert [t.index for t in result.channels[channel]] == order.tolist()
        assert [t.score for t in result.channels[channel]] == pytest.approx(
            scores[order].tolist(), abs=1e-5
        )


@pytest.mark.parametrize(
    ("options", "error", "reason", "field"),
    [
        ({"top_k": 0}, InvalidArgumentError, "INVALID_FIELD", "top_k"),
        (
            # 192 x 1000 maps of 10x10 float32 exceed the 64 MiB message less its headroom.
            {
                "model": "vit",
                "site": "blocks.1.mlp.hidden",
                "channels": list(range(192)),
                "top_k": 1000,
            },
            ResourceExhaustedError,
            "RESULT_TOO_LARGE",
            None,
        ),
        ({"channels": [1, 256]}, InvalidArgumentError, "INVALID_FIELD", "channels[1]"),
        ({"channels": [1, 2, 1]}, InvalidArgumentError, "INVALID_FIELD", "channels[2]"),
        ({"channels": []}, InvalidArgumentError, "FIELD_REQUIRED", "channels"),
        ({"site": "blocks.3.nope"}, NotFoundError, "SITE_NOT_FOUND", "site"),
        ({"site": "blocks.3.attn.probs"}, InvalidArgumentError, "INVALID_FIELD", "site"),
        ({"images": []}, InvalidArgumentError, "FIELD_REQUIRED", "images"),
        (
            {"images": [b"not an image"]},
            InvalidArgumentError,
            "IMAGE_UNDECODABLE",
            "images[0].encoded",
        ),
        ({"model": "nope"}, NotFoundError, "MODEL_NOT_FOUND", "model"),
        ({"image_folder": "/etc"}, PermissionDeniedError, "FOLDER_NOT_ALLOWED", "image_folder"),
        (
            {"image_folder": "{root}/../secret"},
            PermissionDeniedError,
            "FOLDER_NOT_ALLOWED",
            "image_folder",
        ),
        ({"image_folder": "{root}/missing"}, NotFoundError, "FOLDER_NOT_FOUND", "image_folder"),
        (
            {"image_folder": "{root}/digits", "images": [b"x"]},
            InvalidArgumentError,
            "INVALID_FIELD",
            "requests[1].images",
        ),
    ],
)
def test_bad_requests(
    tclient: Client,
    root: Path,
    digits: np.ndarray,
    options: dict[str, object],
    error: type[VitscopeError],
    reason: str,
    field: str | None,
) -> None:
    kwargs: dict[str, object] = {
        "site": SITE,
        "channels": [1],
        "images": list(digits[:2]),
        "model": DIGITS,
        "top_k": 2,
        **options,
    }
    if "image_folder" in options and "images" not in options:
        kwargs["images"] = []
    if isinstance(kwargs.get("image_folder"), str):
        kwargs["image_folder"] = str(kwargs["image_folder"]).format(root=root)
    site, channels = kwargs.pop("site"), kwargs.pop("channels")
    with pytest.raises(error) as caught:
        tclient.top_activating_images(site, channels, **kwargs)
    assert caught.value.reason == reason, caught.value
    assert caught.value.metadata.get("field") == field, caught.value
    if error is InvalidArgumentError:
        assert [v.field for v in caught.value.field_violations] == [field]
    assert tclient.top_activating_images(SITE, [1], images=list(digits[:2]), model=DIGITS)


def test_streamed_images_beside_a_folder_are_refused_before_the_folder_is_scanned(
    folder_server: RunningServer, tclient: Client, root: Path, digits: np.ndarray
) -> None:
    model = folder_server.registry.get(DIGITS).adapter.root
    forwards: list[int] = []
    handle = model.register_forward_pre_hook(lambda m, a: forwards.append(1))
    try:
        with pytest.raises(InvalidArgumentError) as caught:
            tclient.top_activating_images(
                SITE, [1], image_folder=str(root / "digits"), images=[digits[0]], model=DIGITS
            )
    finally:
        handle.remove()
    assert [v.field for v in caught.value.field_violations] == ["requests[1].images"]
    assert forwards == []


def test_bad_file_in_a_folder_is_named_by_its_path(
    tclient: Client, root: Path, digits: np.ndarray
) -> None:
    broken = root / "broken"
    broken.mkdir()
    Image.fromarray(digits[0]).save(broken / "a.png")
    (broken / "b.png").write_bytes(b"not an image")
    with pytest.raises(InvalidArgumentError) as caught:
        tclient.top_activating_images(SITE, [1], image_folder=str(broken), model=DIGITS)
    assert caught.value.reason == "IMAGE_UNDECODABLE"
    assert [v.field for v in caught.value.field_violations] == ["image_folder['b.png'].encoded"]
    assert tclient.top_activating_images(SITE, [1], images=list(digits[:2]), model=DIGITS)


def test_bad_streamed_image_is_named_by_its_stream_index(
    tclient: Client, digits: np.ndarray
) -> None:
    """The ninth image arrives first in the third message of four; it is images[8]."""
    images: list[ImageLike] = [*digits[:8], b"not an image"]
    with pytest.raises(InvalidArgumentError) as caught:
        tclient.top_activating_images(SITE, [1], images=images, model=DIGITS, batch=4)
    assert [v.field for v in caught.value.field_violations] == ["images[8].encoded"]


def test_vanished_file_is_named_by_its_path(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"'a/gone\.png'") as caught:
        file_items([("a/gone.png", tmp_path / "a" / "gone.png")], 0)
    assert caught.value.field == "image_folder"


def test_symlinks_leading_out_of_the_folder_are_skipped(root: Path) -> None:
    names = [name for name, _ in list_images(root / "digits")]
    assert len(names) == COUNT and "b/zz-link.png" not in names
    assert (root / "digits" / "b" / "zz-link.png").is_file()


def test_folder_suffixes_are_the_decodable_formats() -> None:
    formats = {Image.registered_extensions()[suffix] for suffix in IMAGE_SUFFIXES}
    assert formats == set(ALLOWED_FORMATS)


def test_server_without_roots_refuses_folders(client: Client) -> None:
    with pytest.raises(PermissionDeniedError) as caught:
        client.top_activating_images("blocks.0.mlp.hidden", [1], image_folder="/tmp")
    assert caught.value.reason == "FOLDER_NOT_ALLOWED"


def scan(root: Path, out: Path, shard: str, *extra: str) -> dict[str, object]:
    server_main(
        [
            "scan",
            "--model",
            DIGITS,
            "--data",
            str(root / "digits"),
            "--site",
            SITE,
            "--channel",
            *map(str, CHANNELS),
            "--top-k",
            "4",
            "--shard",
            shard,
            "--batch",
            "8",
            "--out",
            str(out),
            *extra,
        ]
    )
    document: dict[str, object] = json.loads(out.read_text())
    return document


def test_sharded_scan_merges_to_the_unsharded_top_k(
    tclient: Client, root: Path, tmp_path: Path
) -> None:
    whole = scan(root, tmp_path / "whole.json", "0/1")
    parts = [scan(root, tmp_path / f"part{i}.json", f"{i}/3") for i in range(3)]
    assert [p["scanned"] for p in parts] == [10, 10, 10]
    server_main(
        [
            "scan-merge",
            *(str(tmp_path / f"part{i}.json") for i in (2, 0, 1)),
            "--out",
            str(tmp_path / "merged.json"),
        ]
    )
    merged = json.loads((tmp_path / "merged.json").read_text())
    assert merged["complete"] and merged["scanned"] == COUNT
    assert merged["shards"] == [[0, 3], [1, 3], [2, 3]]
    rpc = tclient.top_activating_images(
        SITE, CHANNELS, image_folder=str(root / "digits"), top_k=4, model=DIGITS
    )
    for got, expected in zip(merged["top"], whole["top"], strict=True):
        assert got["channel"] == expected["channel"]
        assert [(h["index"], h["path"]) for h in got["top"]] == [
            (h["index"], h["path"]) for h in expected["top"]
        ]
        assert [h["score"] for h in got["top"]] == pytest.approx(
            [h["score"] for h in expected["top"]], abs=1e-6
        )
        assert [h["index"] for h in got["top"]] == [t.index for t in rpc.channels[got["channel"]]]
        np.testing.assert_allclose(
            np.array([h["patch_map"] for h in got["top"]]),
            np.stack([t.patch_map for t in rpc.channels[got["channel"]]]),
            atol=1e-5,
        )


def test_merge_refuses_mismatched_parts(root: Path, tmp_path: Path) -> None:
    scan(root, tmp_path / "a.json", "0/2")
    other = scan(root, tmp_path / "b.json", "1/2")
    other["top_k"] = 3
    (tmp_path / "b.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="top_k"):
        server_main(
            [
                "scan-merge",
                str(tmp_path / "a.json"),
                str(tmp_path / "b.json"),
                "--out",
                str(tmp_path / "m.json"),
            ]
        )
    with pytest.raises(SystemExit, match="given twice"):
        server_main(
            [
                "scan-merge",
                str(tmp_path / "a.json"),
                str(tmp_path / "a.json"),
                "--out",
                str(tmp_path / "m.json"),
            ]
        )
    with pytest.raises(SystemExit, match="0 <= I < N"):
        scan(root, tmp_path / "c.json", "3/2")


def test_scan_builtin_digits_shard(tmp_path: Path) -> None:
    out = tmp_path / "digits.json"
    server_main(
        [
            "scan",
            "--model",
            DIGITS,
            "--data",
            "builtin-digits",
            "--site",
            SITE,
            "--channel",
            "5",
            "--top-k",
            "2",
            "--shard",
            "7/50",
            "--out",
            str(out),
        ]
    )
    part = json.loads(out.read_text())
    assert part["num_items"] == 1000 and part["scanned"] == 20 and part["shards"] == [[7, 50]]
    assert all(140 <= h["index"] < 160 for h in part["top"][0]["top"])
    assert part["weights_identity"].startswith("sha256:")


def test_visualize_command(folder_server: RunningServer, tmp_path: Path) -> None:
    out = tmp_path / "viz"
    main(
        [
            "--target",
            f"127.0.0.1:{folder_server.port}",
            "visualize",
            "--model",
            DIGITS,
            "--site",
            SITE,
            "--channel",
            "0",
            "32",
            "--steps",
            "6",
            "--out",
            str(out),
            "--dataset",
            "samples",
            "--top-k",
            "3",
        ]
    )
    for channel in (0, 32):
        assert Image.open(out / f"{SITE}-ch{channel}.png").size == (28, 28)
    figure = Image.open(out / "grid.png")
    assert figure.size == (5 * 112, 2 * (112 + 14))
    assert json.loads((out / "parameters.json").read_text())["parameters"]["steps"] == 6
