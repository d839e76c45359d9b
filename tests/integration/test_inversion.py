"""Invert and ListInverters over a real channel, checked against computations written here:
the built-in model rebuilt by hand, representations read with plain hooks, the committed
inverse modules composed by hand, MSE/PSNR recomputed from the returned PNGs."""

from __future__ import annotations

import io
import itertools
import json

import grpc
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file
from support.reference import build, vit_sites
from support.servers import start
from support.waiting import sample, wait_until

from vitscope import Client, InvalidArgumentError, NotFoundError, VitscopeError
from vitscope.cli import main as cli
from vitscope.v1 import inspector_pb2_grpc as pb_grpc
from vitscope.v1 import inversion_pb2 as pb
from vitscope_server.builtin import (
    BUILTIN_INVERTERS,
    DIGITS_ARCHITECTURE,
    DIGITS_KWARGS,
    DIGITS_MEAN,
    DIGITS_NAME,
    DIGITS_STD,
    DIGITS_WEIGHTS,
)
from vitscope_server.builtin.digits_data import digits_split
from vitscope_server.core.inversion.modules import Geometry, build_module
from vitscope_server.settings import ServerSettings
from vitscope_server.transport.app import RunningServer

DIGITS = DIGITS_NAME
NUM_BLOCKS = int(DIGITS_KWARGS["depth"])  # type: ignore[call-overload]
STORE = BUILTIN_INVERTERS / DIGITS


def held_out_digits(count: int) -> np.ndarray:
    """uint8 [count, 28, 28] from the test split, which no inverter module was trained on."""
    test_images = digits_split()[2]
    return test_images[np.linspace(0, len(test_images) - 1, count).astype(int)]


def digits_model() -> torch.nn.Module:
    model = timm.create_model(DIGITS_ARCHITECTURE, pretrained=False, **DIGITS_KWARGS)
    model.load_state_dict(load_file(str(DIGITS_WEIGHTS)))
    return model.eval()


def model_input(digits: np.ndarray) -> torch.Tensor:
    unit = torch.from_numpy(digits).float().div(255).unsqueeze(1).expand(-1, 3, -1, -1)
    mean = torch.tensor(DIGITS_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(DIGITS_STD).view(1, 3, 1, 1)
    return (unit - mean) / std


def unit_rgb(digits: np.ndarray) -> np.ndarray:
    """[N, 28, 28, 3] float in [0, 1]: what the model sees, in pixels."""
    return np.repeat(digits[..., None].astype(np.float64) / 255.0, 3, axis=-1)


def site(depth: int) -> str:
    return "embed" if depth == 0 else f"blocks.{depth - 1}.out"


def test_list_inverters_shows_the_committed_inverter(client: Client) -> None:
    found = client.list_inverters(DIGITS)
    assert len(found) == 1
    inverter = found[0]
    weights = next(m for m in client.list_models() if m.name == DIGITS).weights_identity
    assert inverter.weights_identity == weights
    assert inverter.max_depth == NUM_BLOCKS
    names = {m.name for m in inverter.modules}
    assert names == {"embed", *(f"blocks.{i}" for i in range(NUM_BLOCKS))}
    assert all(m.best_val_mse > 0 and m.parameters > 0 for m in inverter.modules)
    assert "training split" in inverter.data
    assert client.list_inverters("vit") == []
    with pytest.raises(NotFoundError) as caught:
        client.list_inverters("no-such-model")
    assert caught.value.resource == ("model", "no-such-model")


@pytest.fixture(scope="module")
def learned_all_depths(client: Client):  # type: ignore[no-untyped-def]
    digits = held_out_digits(24)
    images = [Image.fromarray(d) for d in digits]
    result = client.invert(images, list(range(NUM_BLOCKS + 1)), method="learned", model=DIGITS)
    return digits, result


def test_learned_scores_match_the_returned_pictures(learned_all_depths) -> None:  # type: ignore[no-untyped-def]
    digits, result = learned_all_depths
    original = unit_rgb(digits)
    for depth in range(NUM_BLOCKS + 1):
        reconstruction = result[depth]
        assert reconstruction.site == site(depth)
        mine = ((reconstruction.pixels() - original) ** 2).reshape(len(digits), -1).mean(1)
        # The server scores the 8-bit image it sends, so the PNG gives the same numbers.
        np.testing.assert_allclose(reconstruction.mse, mine, rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(
            reconstruction.psnr, 10 * np.log10(1 / np.asarray(reconstruction.mse)), rtol=1e-6
        )
    assert result.provenance["model"] == DIGITS
    assert result.parameters["inverter"]["store"] == DIGITS


def test_learned_embedding_inverse_reaches_20_db_on_held_out_digits(learned_all_depths) -> None:  # type: ignore[no-untyped-def]
    digits, result = learned_all_depths
    mse = ((result[0].pixels() - unit_rgb(digits)) ** 2).mean()
    assert 10 * np.log10(1 / mse) >= 20.0


def test_learned_error_does_not_fall_with_depth(learned_all_depths) -> None:  # type: ignore[no-untyped-def]
    digits, result = learned_all_depths
    original = unit_rgb(digits)
    errors = [((result[d].pixels() - original) ** 2).mean() for d in range(NUM_BLOCKS + 1)]
    # Each deeper depth adds one more independently trained module to the chain; its mean
    # error over 24 held-out digits may dip below the shallower one by at most 5% of it
    # (a deeper module that happens to undo some of the next one's error), never more.
    for shallow, deep in itertools.pairwise(errors):
        assert deep >= 0.95 * shallow, errors
    assert errors[-1] > errors[0]


def test_chain_matches_the_modules_composed_by_hand(client: Client) -> None:
    digits = held_out_digits(4)
    depth = 3
    with torch.no_grad():
        tokens = torch.from_numpy(vit_sites(digits_model(), model_input(digits))[site(depth)])
        geometry = Geometry.from_json(json.loads((STORE / "embed.json").read_text())["geometry"])
        for name in ("blocks.2", "blocks.1", "blocks.0", "embed"):
            kind = json.loads((STORE / f"{name}.json").read_text())["kind"]
            module = build_module(name, kind, geometry)
            module.load_state_dict(load_file(str(STORE / f"{name}.safetensors")))
            tokens = module.eval()(tokens)
    by_hand = tokens.permute(0, 2, 3, 1).numpy()
    result = client.invert(
        [Image.fromarray(d) for d in digits], [depth], method="learned", model=DIGITS
    )
    np.testing.assert_allclose(result[depth].pixels(), by_hand, atol=0.5 / 255 + 1e-5)


def test_a_sent_representation_inverts_like_the_image(client: Client) -> None:
    digits = held_out_digits(3)
    depth = 2
    with torch.no_grad():
        tokens = vit_sites(digits_model(), model_input(digits))[site(depth)]
    images = [Image.fromarray(d) for d in digits]
    from_image = client.invert(images, [depth], model=DIGITS)
    sent = client.invert(images, representation=tokens, representation_depth=depth, model=DIGITS)
    np.testing.assert_allclose(sent[depth].pixels(), from_image[depth].pixels(), atol=1.01 / 255)
    np.testing.assert_allclose(sent[depth].mse, from_image[depth].mse, rtol=1e-3)
    assert sent.parameters["from_representation"] is True
    unscored = client.invert(representation=tokens, representation_depth=depth, model=DIGITS)
    assert unscored[depth].mse is None and len(unscored[depth].images) == 3


def test_optimization_steps_are_counted_in_the_metrics(
    server: RunningServer, client: Client
) -> None:
    def counted() -> float:
        labels = {"method": "Invert", "model": DIGITS}
        value = server.metrics.registry.get_sample_value(
            "vitscope_optimization_steps_total", labels
        )
        return value or 0.0

    before = counted()
    client.invert(request_images(), [0, 2], model=DIGITS, method="optimization", steps=3)
    assert counted() == before + 6
    client.invert(request_images(), [0, 2], model=DIGITS, method="learned")
    assert counted() == before + 6


def test_unset_optimization_settings_take_the_defaults(client: Client) -> None:
    result = client.invert(
        request_images(), [0], model=DIGITS, method="optimization", steps=2, seed=4
    )
    assert result.parameters["optimization"] == {
        "steps": 2,
        "learning_rate": pytest.approx(0.05),
        "tv_weight": pytest.approx(0.01),
        "seed": "4",
        "progress_every": 10,
    }


def _vit_distance(model: torch.nn.Module, picture: np.ndarray, target: np.ndarray) -> float:
    """Relative squared distance at blocks.1.out of test_vit for a [H, W, 3] uint8 picture."""
    config = timm.data.resolve_model_data_config(model)
    unit = torch.from_numpy(np.array(picture)).float().div(255).permute(2, 0, 1)[None]
    x = (unit - torch.tensor(config["mean"]).view(1, 3, 1, 1)) / torch.tensor(config["std"]).view(
        1, 3, 1, 1
    )
    got = vit_sites(model, x)["blocks.1.out"]
    return float(((got - target) ** 2).sum() / (target**2).sum())


def test_optimization_cuts_the_representation_distance_by_90_percent(client: Client) -> None:
    model = build("vit")
    size = client.describe("vit").input_size[1]
    generator = torch.Generator().manual_seed(3)
    original = (torch.rand(1, 3, size, size, generator=generator) * 255).to(torch.uint8)
    picture = original[0].permute(1, 2, 0).numpy()
    config = timm.data.resolve_model_data_config(model)
    x = (original.float() / 255 - torch.tensor(config["mean"]).view(1, 3, 1, 1)) / torch.tensor(
        config["std"]
    ).view(1, 3, 1, 1)
    target = vit_sites(model, x)["blocks.1.out"]
    progress = []
    result = client.invert(
        representation=target,
        representation_depth=2,
        model="vit",
        method="optimization",
        steps=120,
        learning_rate=0.05,
        tv_weight=0.0,
        progress_every=20,
        on_progress=progress.append,
    )
    start = _vit_distance(model, np.full_like(picture, 128), target)
    final = _vit_distance(model, np.asarray(result[2].images[0]), target)
    assert final <= 0.1 * start, (start, final)
    assert [p.step for p in progress] == [20, 40, 60, 80, 100, 120]
    assert progress[-1].representation_distance < progress[0].representation_distance
    assert result.parameters["optimization"]["steps"] == 120
    # The reported distance is that of the returned PNG, not of the float pixels before it.
    assert result[2].representation_distance[0] == pytest.approx(final, rel=1e-4)


def _representation(batch: int, tokens: int, width: int, dtype: type = np.float32) -> np.ndarray:
    return np.zeros((batch, tokens, width), dtype=dtype)


BAD = [
    # (description, kwargs for client.invert, the field at fault)
    ("wrong tokens", {"representation": _representation(1, 49, 64)}, "representation.values"),
    ("wrong width", {"representation": _representation(1, 50, 32)}, "representation.values"),
    ("two dimensions", {"representation": np.zeros((50, 64), np.float32)}, "representation.values"),
    ("int64", {"representation": _representation(1, 50, 64, np.int64)}, "representation.values"),
    (
        "depth too deep",
        {"representation": _representation(1, 50, 64), "representation_depth": 7},
        "representation.depth",
    ),
    ("negative depth", {"images": "digit", "depths": [-1]}, "depths[0]"),
    ("depth past the blocks", {"images": "digit", "depths": [0, 7]}, "depths"),
    ("repeated depth", {"images": "digit", "depths": [1, 1]}, "depths"),
    ("no depths", {"images": "digit"}, "depths"),
    # Checked before the images are read: an undecodable one is never looked at.
    ("depth past the blocks, undecodable image", {"images": "junk", "depths": [7]}, "depths"),
    (
        "depths with a representation",
        {"representation": _representation(1, 50, 64), "depths": [1]},
        "depths",
    ),
    (
        "originals do not match",
        {"images": "digit", "representation": _representation(2, 50, 64)},
        "images",
    ),
    ("nothing to invert", {}, "depths"),
    (
        "negative steps",
        {"images": "digit", "depths": [0], "method": "optimization", "steps": -3},
        "optimization.steps",
    ),
    (
        "negative tv weight",
        {"images": "digit", "depths": [0], "method": "optimization", "tv_weight": -1.0},
        "optimization.tv_weight",
    ),
    *(
        (
            f"{name} {value}",
            {"images": "digit", "depths": [0], "method": "optimization", name: value},
            f"optimization.{name}",
        )
        for name, value in [
            ("steps", 0),
            ("learning_rate", 0.0),
            ("learning_rate", -0.1),
            ("learning_rate", float("nan")),
            ("learning_rate", float("inf")),
            ("learning_rate", 1e30),
            ("tv_weight", float("nan")),
            ("tv_weight", 1e30),
            ("progress_every", 0),
            ("progress_every", -2),
        ]
    ),
]


@pytest.mark.parametrize(("description", "kwargs", "field"), BAD, ids=[b[0] for b in BAD])
def test_bad_invert_requests(client: Client, description: str, kwargs: dict, field: str) -> None:
    request = {"model": DIGITS, **kwargs}
    if request.get("images") == "digit":
        request["images"] = [Image.fromarray(held_out_digits(1)[0])]
    if request.get("images") == "junk":
        request["images"] = [b"not an image"]
    with pytest.raises(InvalidArgumentError) as caught:
        client.invert(**request)
    assert caught.value.reason in ("INVALID_FIELD", "FIELD_REQUIRED"), caught.value.details
    assert [v.field for v in caught.value.field_violations] == [field], caught.value.details
    assert client.invert(request_images(), [0], model=DIGITS)[0].psnr is not None


def request_images() -> list[Image.Image]:
    return [Image.fromarray(held_out_digits(1)[0])]


def test_batches_over_the_limit_are_resource_exhausted(client: Client) -> None:
    limit = ServerSettings.model_fields["max_batch"].default  # the session server keeps it
    too_many = [
        {"representation": _representation(limit + 1, 50, 64)},
        {"images": request_images() * (limit + 1), "depths": [0]},
    ]
    for kwargs in too_many:
        with pytest.raises(VitscopeError) as caught:
            client.invert(model=DIGITS, **kwargs)
        assert caught.value.code == "RESOURCE_EXHAUSTED"
        assert f"exceeds the limit of {limit}" in caught.value.details
    assert client.invert(request_images(), [0], model=DIGITS)[0].psnr is not None


def test_unknown_model_and_missing_inverter_are_not_found(client: Client) -> None:
    with pytest.raises(NotFoundError) as model:
        client.invert(request_images(), [0], model="no-such-model")
    assert model.value.reason == "MODEL_NOT_FOUND"
    with pytest.raises(NotFoundError) as inverter:
        client.invert([np.zeros((8, 8, 3), np.uint8)], [0], model="vit")
    assert inverter.value.reason == "INVERTER_NOT_FOUND"
    assert inverter.value.resource == ("inverter", "vit")
    assert client.invert(request_images(), [1], model=DIGITS)[1].psnr is not None


@pytest.mark.parametrize("method", [pb.INVERSION_METHOD_UNSPECIFIED, 7])
def test_bad_method_values(server: RunningServer, client: Client, method: int) -> None:
    request = pb.InvertRequest(model=DIGITS, method=method, depths=[0])
    request.images.add().encoded = _png(held_out_digits(1)[0])
    with (
        grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
        pytest.raises(grpc.RpcError) as caught,
    ):
        list(pb_grpc.InspectorStub(channel).Invert(request, timeout=30))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "INVERSION_METHOD_LEARNED" in caught.value.details()
    assert client.invert(request_images(), [0], model=DIGITS)[0].psnr is not None


def _png(digit: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(digit).save(buffer, format="PNG")
    return buffer.getvalue()


LONG_STEPS = 10_000


def _invert_once_the_slot_is_free(client: Client) -> None:
    """With one slot and no queue, a call is refused until the stopped run lets go of it."""

    def served() -> bool:
        try:
            return client.invert(request_images(), [0], model=DIGITS)[0].psnr is not None
        except VitscopeError as exc:
            assert exc.code == "RESOURCE_EXHAUSTED"
            return False

    wait_until(served, "the stopped inversion to release its compute slot")


def _steps(server: RunningServer, model: str) -> float:
    return sample(server, "vitscope_optimization_steps_total", method="Invert", model=model)


def test_cancelling_an_optimization_frees_its_slot(tmp_path) -> None:  # type: ignore[no-untyped-def]
    running = start(tmp_path, max_running=1, max_queue=0)
    try:
        request = pb.InvertRequest(
            model="vit",
            method=pb.INVERSION_METHOD_OPTIMIZATION,
            depths=[6],
            optimization=pb.InversionOptimization(steps=LONG_STEPS, progress_every=1),
        )
        request.images.add().encoded = _png(np.zeros((160, 160), np.uint8))
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            call = pb_grpc.InspectorStub(channel).Invert(request, timeout=120)
            kinds = [next(call).WhichOneof("payload"), next(call).WhichOneof("payload")]
            assert kinds == ["header", "progress"]
            call.cancel()
        with Client(f"127.0.0.1:{running.port}", timeout=30) as client:
            _invert_once_the_slot_is_free(client)
            # Steps run only while the slot is held: the counts are final.
            assert 1 <= _steps(running, "vit") < LONG_STEPS
            with pytest.raises(VitscopeError) as caught:
                client.invert(
                    request_images(),
                    [6],
                    model=DIGITS,
                    method="optimization",
                    steps=LONG_STEPS,
                    timeout=1.0,
                )
            assert caught.value.code == "DEADLINE_EXCEEDED"
            _invert_once_the_slot_is_free(client)
            assert _steps(running, DIGITS) < LONG_STEPS
    finally:
        running.stop(0)


def test_cli_invert_writes_a_strip_with_psnr(
    server: RunningServer, tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    digit = tmp_path / "digit.png"
    digit.write_bytes(_png(held_out_digits(1)[0]))
    strip = tmp_path / "strip.png"
    target = ["--target", f"127.0.0.1:{server.port}"]
    cli(
        [
            *target,
            "invert",
            str(digit),
            "--model",
            DIGITS,
            "--depths",
            "0",
            "3",
            "--out",
            str(strip),
        ]
    )
    assert Image.open(strip).size == (3 * 128, 128 + 14)
    printed = capsys.readouterr().out
    assert "depth 0 (embed): PSNR dB" in printed and "depth 3 (blocks.2.out)" in printed
    cli([*target, "inverters", "--model", DIGITS])
    assert "depth 0..6" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["deit", "swin", "clip"])
def test_optimization_runs_on_every_family(client: Client, name: str) -> None:
    size = client.describe(name).input_size
    picture = np.random.default_rng(0).integers(0, 256, (size[1], size[2], 3), dtype=np.uint8)
    result = client.invert([picture], [1], model=name, method="optimization", steps=8)
    assert result[1].images[0].size == (size[2], size[1])
    assert 0 < result[1].representation_distance[0] < 1.5
    assert result[1].psnr is not None and np.isfinite(result[1].psnr[0])
