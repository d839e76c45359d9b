"""OptimizeFeatures against an independent implementation of docs/methods.md section 2, on a real server."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from PIL import Image
from support.features_reference import (
    as_input,
    build_digits_model,
    fourier_pixels,
    hidden,
    normalize,
)
from support.reference import build
from support.servers import DEVICE, start
from support.waiting import sample, wait_until
from torch import nn

from vitscope import (
    CancelledError,
    Client,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)
from vitscope.cli import main
from vitscope.errors import from_rpc_error
from vitscope.features import Feature
from vitscope.tensors import to_proto
from vitscope.v1 import features_pb2 as fpb
from vitscope.v1 import inspector_pb2_grpc as pb_grpc
from vitscope_server.builtin.digits_data import digits_split
from vitscope_server.core.features.optimize import (
    FeatureForward,
    FeatureSpec,
    OptimizationParams,
    draw_augmentation,
    encoded_image_bound,
    prepare_optimization,
    step_loss,
)
from vitscope_server.core.features.parameterization import Parameterization, image_parameters
from vitscope_server.core.model.capture import capture_sites
from vitscope_server.core.runtime.cancel import NEVER_CANCELLED
from vitscope_server.core.runtime.errors import InvalidArgument, Reason, ResourceExhausted
from vitscope_server.transport.app import RunningServer
from vitscope_server.transport.convert_features import feature_specs

DIGITS = "vitscope-digits"
STEPS_METRIC = "vitscope_optimization_steps_total"


@pytest.fixture(scope="module")
def busy_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One compute slot and no queue, so a held slot is visible as RESOURCE_EXHAUSTED."""
    running = start(tmp_path_factory.mktemp("features"), max_running=1, max_queue=0)
    yield running
    running.stop(0)


@pytest.fixture(scope="module")
def fclient(busy_server: RunningServer) -> Iterator[Client]:
    with Client(f"127.0.0.1:{busy_server.port}", timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def digits_model() -> nn.Module:
    return build_digits_model()


def reference_draws(
    generator: torch.Generator, n: int, jitter: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]]:
    """One step's draws, in order: subtract U(-1,1) [N,3], divide-exp U(-1,1) [N,3], offset
    N(0,1) [N,3], one jitter (rows, cols) in [-J, J]."""
    subtract = torch.rand(n, 3, generator=generator) * 2 - 1
    divide = torch.rand(n, 3, generator=generator) * 2 - 1
    offset = torch.randn(n, 3, generator=generator)
    rows, cols = torch.randint(-jitter, jitter + 1, (2,), generator=generator).tolist()
    return subtract, divide, offset, (rows, cols)


def reference_loss(
    model: nn.Module,
    block: int,
    channels: list[int],
    images: torch.Tensor,
    generator: torch.Generator,
    step: int,
    steps: int,
    copies: int,
    tv: float,
) -> torch.Tensor:
    """docs/methods.md section 2's loss at one step; each feature is forwarded on its own here."""
    jitter = round(32 * images.shape[-1] / 224)
    subtract, divide, offset, shift = reference_draws(generator, len(channels) * copies, jitter)
    loss = torch.zeros(())
    for k, channel in enumerate(channels):
        r = slice(k * copies, (k + 1) * copies)
        copy = images[k : k + 1].expand(copies, -1, -1, -1)
        copy = (copy - subtract[r, :, None, None]) / torch.exp(divide[r, :, None, None])
        copy = copy + offset[r, :, None, None] * 0.5 * (steps - step) / steps
        copy = torch.roll(copy, shifts=shift, dims=(2, 3))
        objective = hidden(model, block, normalize(copy))[:, 1:, channel].mean()
        differences = [
            copy[:, :, :, 1:] - copy[:, :, :, :-1],
            copy[:, :, 1:, :] - copy[:, :, :-1, :],
            copy[:, :, 1:, 1:] - copy[:, :, :-1, :-1],
            copy[:, :, 1:, :-1] - copy[:, :, :-1, 1:],
        ]
        total_variation = sum(torch.sqrt((d**2).sum(dim=(2, 3))).mean() for d in differences)
        loss = loss - objective + 0.0005 * tv * total_variation
    return loss


def reference_first_step(
    model: nn.Module,
    block: int,
    channels: list[int],
    seed: int,
    *,
    size: int = 28,
    steps: int = 400,
    copies: int = 8,
    tv: float = 1.0,
    fourier: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, gradient, initial parameters) of the first step.

    The first draw is the initial image: pixels U[0,1] [K,3,S,S], or (fourier) a spectrum
    N(0,1) x 0.01 [K,3,S,S//2+1,2]; then the step's augmentation draws.
    """
    generator = torch.Generator().manual_seed(seed)
    if fourier:
        shape = (len(channels), 3, size, size // 2 + 1, 2)
        initial = torch.randn(shape, generator=generator) * 0.01
    else:
        initial = torch.rand(len(channels), 3, size, size, generator=generator)
    x = initial.clone().requires_grad_()
    images = fourier_pixels(x) if fourier else x
    loss = reference_loss(model, block, channels, images, generator, 0, steps, copies, tv)
    loss.backward()
    assert x.grad is not None
    return loss.detach(), x.grad, initial


def png_pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


# The core is driven directly with CPU tensors against the CPU reference; over the RPC the
# same first step is checked on every device (test_rpc_first_step_matches_reference).
core_on_cpu = pytest.mark.skipif(
    DEVICE != "cpu", reason="drives the core with CPU tensors; the RPC test covers other devices"
)


@core_on_cpu
def test_core_first_step_matches_reference(
    busy_server: RunningServer, digits_model: nn.Module
) -> None:
    channels, seed = [5, 12, 40], 7
    loaded = busy_server.registry.get(DIGITS)
    prepared = prepare_optimization(
        loaded,
        [FeatureSpec("blocks.3.mlp.hidden", c) for c in channels],
        OptimizationParams(seed=seed),
        64,
        10**8,
        10**8,
    )
    forward = FeatureForward(prepared)
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.rand(3, 3, 28, 28, generator=generator).requires_grad_()
    draw = draw_augmentation(generator, 3 * 8, prepared.params.jitter)
    with capture_sites(loaded.adapter, forward.sites, 24, NEVER_CANCELLED) as captured:
        loss, _ = step_loss(forward, pixels, draw, 0, captured)
    loss.backward()
    ref_loss, ref_grad, ref_pixels = reference_first_step(digits_model, 3, channels, seed)
    assert torch.equal(pixels.detach(), ref_pixels)
    assert float(loss.detach()) == pytest.approx(float(ref_loss), rel=1e-5)
    assert pixels.grad is not None
    np.testing.assert_allclose(pixels.grad.numpy(), ref_grad.numpy(), rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in loaded.adapter.module.parameters())


def test_rpc_first_step_matches_reference(fclient: Client, digits_model: nn.Module) -> None:
    """Step 1's loss, and the image after it: Adam's first update is lr * g / (|g| + eps)."""
    channels, seed = [5, 12], 11
    progress = []
    result = fclient.optimize_features(
        [("blocks.3.mlp.hidden", c) for c in channels],
        model=DIGITS,
        steps=1,
        seed=seed,
        progress_every=1,
        on_progress=progress.append,
    )
    ref_loss, ref_grad, ref_pixels = reference_first_step(digits_model, 3, channels, seed, steps=1)
    assert [p.step for p in progress] == [1]
    assert progress[0].loss == pytest.approx(float(ref_loss), rel=1e-5)
    updated = (ref_pixels - 0.1 * ref_grad / (ref_grad.abs() + 1e-8)).clamp(0, 1)
    expected = (updated * 255).round().permute(0, 2, 3, 1).numpy()
    got = np.stack([np.asarray(f.image) for f in result.features]).astype(np.float64)
    decided = (ref_grad.abs() > 1e-6).permute(0, 2, 3, 1).numpy()
    assert np.abs(got - expected)[decided].max() <= 1
    assert (got == expected)[decided].mean() > 0.99


@core_on_cpu
def test_core_fourier_first_step_matches_reference(
    busy_server: RunningServer, digits_model: nn.Module
) -> None:
    """The Fourier image of the seeded spectrum, and step 1's loss and spectrum gradient."""
    channels, seed = [5, 40], 3
    loaded = busy_server.registry.get(DIGITS)
    params = OptimizationParams(seed=seed, parameterization=Parameterization.FOURIER)
    prepared = prepare_optimization(
        loaded, [FeatureSpec("blocks.3.mlp.hidden", c) for c in channels], params, 64, 10**8, 10**8
    )
    forward = FeatureForward(prepared)
    generator = torch.Generator().manual_seed(seed)
    image = image_parameters(Parameterization.FOURIER, 2, 28, generator, torch.device("cpu"))
    draw = draw_augmentation(generator, 2 * 8, prepared.params.jitter)
    with capture_sites(loaded.adapter, forward.sites, 16, NEVER_CANCELLED) as captured:
        loss, _ = step_loss(forward, image.pixels(), draw, 0, captured)
    loss.backward()
    ref_loss, ref_grad, ref_spectrum = reference_first_step(
        digits_model, 3, channels, seed, fourier=True
    )
    assert torch.equal(image.tensor.detach(), ref_spectrum)
    np.testing.assert_allclose(
        image.pixels().detach().numpy(), fourier_pixels(ref_spectrum).numpy(), atol=1e-6
    )
    assert float(loss.detach()) == pytest.approx(float(ref_loss), rel=1e-5)
    assert image.tensor.grad is not None
    np.testing.assert_allclose(image.tensor.grad.numpy(), ref_grad.numpy(), rtol=1e-3, atol=1e-6)


def test_rpc_fourier_first_step_matches_reference(fclient: Client, digits_model: nn.Module) -> None:
    """Step 1's loss, and the image after Adam's first update lr * g / (|g| + eps) of the
    spectrum; no clamp. The effective parameters name the choice."""
    channels, seed = [5, 12], 11
    progress = []
    result = fclient.optimize_features(
        [("blocks.3.mlp.hidden", c) for c in channels],
        model=DIGITS,
        steps=1,
        seed=seed,
        parameterization="fourier",
        progress_every=1,
        on_progress=progress.append,
    )
    assert result.parameters["parameterization"] == "IMAGE_PARAMETERIZATION_FOURIER"
    assert "sigmoid" in result.parameters["parameterization_detail"]
    ref_loss, ref_grad, ref_spectrum = reference_first_step(
        digits_model, 3, channels, seed, steps=1, fourier=True
    )
    assert progress[0].loss == pytest.approx(float(ref_loss), rel=1e-5)
    updated = ref_spectrum - 0.1 * ref_grad / (ref_grad.abs() + 1e-8)
    expected = (fourier_pixels(updated) * 255).round().permute(0, 2, 3, 1).numpy()
    got = np.stack([np.asarray(f.image) for f in result.features]).astype(np.float64)
    assert np.abs(got - expected).max() <= 1
    assert (got == expected).mean() > 0.99


def reference_two_steps(
    model: nn.Module,
    channels: list[int],
    seed: int,
    second_lr: float,
    adamax: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Two steps of Adam or Adamax (betas 0.5, 0.99, eps 1e-8) written out, lr 0.1 then
    second_lr, clamping after each; block 3, pixels. uint8-scaled [K, S, S, 3] and the
    pixels whose gradients are too small for their update's sign to be decided."""
    beta1, beta2, eps = 0.5, 0.99, 1e-8
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(len(channels), 3, 28, 28, generator=generator)
    first, second = [], []
    for step, lr in enumerate((0.1, second_lr)):
        leaf = x.clone().requires_grad_()
        reference_loss(model, 3, channels, leaf, generator, step, 2, 8, 1.0).backward()
        assert leaf.grad is not None
        (first if step == 0 else second).append(leaf.grad)
        g = leaf.grad
        if step == 0:
            m = (1 - beta1) * g
            v = (1 - beta2) * g**2
            u = g.abs() + eps
            update = g / (g.abs() + eps)
        else:
            m = beta1 * m + (1 - beta1) * g
            if adamax:
                u = torch.maximum(beta2 * u, g.abs() + eps)
                update = m / (1 - beta1**2) / u
            else:
                v = beta2 * v + (1 - beta2) * g**2
                update = (m / (1 - beta1**2)) / ((v / (1 - beta2**2)).sqrt() + eps)
        x = (x - lr * update).clamp(0, 1)
    image = (x * 255).round().permute(0, 2, 3, 1).numpy()
    undecided = (first[0].abs() < 1e-6) | (second[0].abs() < 1e-6)
    return image, undecided.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize(
    ("schedule", "optimizer", "second_lr"),
    [("cosine", "adam", 0.05), ("constant", "adam", 0.1), ("constant", "adamax", 0.1)],
)
def test_schedule_and_optimizer_over_two_steps(
    fclient: Client, digits_model: nn.Module, schedule: str, optimizer: str, second_lr: float
) -> None:
    """Over 2 steps cosine annealing halves the rate at step 2; constant keeps it."""
    channels, seed = [5, 12], 4
    result = fclient.optimize_features(
        [("blocks.3.mlp.hidden", c) for c in channels],
        model=DIGITS,
        steps=2,
        seed=seed,
        schedule=schedule,
        optimizer=optimizer,
    )
    assert result.parameters["schedule"] == f"LEARNING_RATE_SCHEDULE_{schedule.upper()}"
    assert result.parameters["optimizer"] == f"FEATURE_OPTIMIZER_{optimizer.upper()}"
    expected, undecided = reference_two_steps(
        digits_model, channels, seed, second_lr, optimizer == "adamax"
    )
    got = np.stack([np.asarray(f.image) for f in result.features]).astype(np.float64)
    assert np.abs(got - expected)[~undecided].max() <= 1
    assert (got == expected)[~undecided].mean() > 0.99


def test_default_choices_are_reported(fclient: Client) -> None:
    result = fclient.optimize_features([("blocks.1.out", 1)], model=DIGITS, steps=1)
    assert result.parameters["parameterization"] == "IMAGE_PARAMETERIZATION_PIXEL"
    assert result.parameters["schedule"] == "LEARNING_RATE_SCHEDULE_COSINE"
    assert result.parameters["optimizer"] == "FEATURE_OPTIMIZER_ADAM"
    assert "clamped" in result.parameters["parameterization_detail"]


def test_fourier_optimization_raises_the_objective(
    fclient: Client, digits_model: nn.Module
) -> None:
    """From the seeded spectrum's image to the delivered one, the objective (read by hooks)
    grows well beyond its start: about 0.21 to 0.87 for this unit over 100 steps at the
    default rate (0.85 .. 0.88 over seeds 0 .. 2)."""
    channel, seed = 100, 0
    result = fclient.optimize_features(
        [("blocks.3.mlp.hidden", channel)],
        model=DIGITS,
        steps=100,
        seed=seed,
        parameterization="fourier",
    )
    spectrum = torch.randn((1, 3, 28, 15, 2), generator=torch.Generator().manual_seed(seed))
    start = fourier_pixels(spectrum * 0.01)
    final = as_input(np.asarray(result.features[0].image))
    with torch.no_grad():
        before = float(hidden(digits_model, 3, normalize(start))[0, 1:, channel].mean())
        after = float(hidden(digits_model, 3, normalize(final))[0, 1:, channel].mean())
    assert result.features[0].objective == pytest.approx(after, rel=1e-4, abs=1e-5)
    assert after > before + 0.4, (before, after)


def test_same_seed_same_fourier_image(fclient: Client) -> None:
    def run(seed: int) -> list[bytes]:
        result = fclient.optimize_features(
            [("blocks.2.mlp.hidden", 3), ("blocks.4.out", 9)],
            model=DIGITS,
            steps=4,
            seed=seed,
            parameterization="fourier",
        )
        return [f.png for f in result.features]

    first = run(3)
    assert run(3) == first
    assert run(4) != first


def test_optimized_images_beat_every_test_digit(fclient: Client, digits_model: nn.Module) -> None:
    """The paper's recipe at its defaults (400 steps) on the trained built-in model.

    Not every unit is beaten: units that digits drive hard can out-score the optimized image
    (41 of 48 sampled units, every 16th channel of blocks 1, 3 and 5, were beaten).
    """
    features = [
        ("blocks.1.mlp.hidden", 0),
        ("blocks.3.mlp.hidden", 32),
        ("blocks.5.mlp.hidden", 16),
    ]
    result = fclient.optimize_features(features, model=DIGITS, seed=0)
    assert result.parameters["steps"] == 400
    assert result.parameters["learning_rate"] == pytest.approx(0.1)
    _, _, test_images, _ = digits_split()
    digits = as_input(test_images)
    optimized = as_input(np.stack([np.asarray(f.image) for f in result.features]))
    with torch.no_grad():
        for index, (site, channel) in enumerate(features):
            block = int(site.split(".")[1])
            digit_scores = hidden(digits_model, block, normalize(digits))[:, 1:, channel].mean(1)
            image_units = hidden(digits_model, block, normalize(optimized[index : index + 1]))
            score = float(image_units[0, 1:, channel].mean())
            assert result.features[index].objective == pytest.approx(score, rel=1e-4, abs=1e-5)
            np.testing.assert_allclose(
                result.features[index].patch_map,
                image_units[0, 1:, channel].reshape(7, 7).numpy(),
                rtol=1e-4,
                atol=1e-5,
            )
            assert score > float(digit_scores.max()), (site, channel)


def test_same_seed_same_image(fclient: Client) -> None:
    def run(seed: int) -> list[bytes]:
        result = fclient.optimize_features(
            [("blocks.2.mlp.hidden", 3), ("blocks.4.out", 9)], model=DIGITS, steps=8, seed=seed
        )
        return [f.png for f in result.features]

    first = run(3)
    assert run(3) == first
    assert run(4) != first


def test_progress_and_previews(fclient: Client) -> None:
    events = list(
        fclient.optimize_features_stream(
            [("blocks.2.mlp.hidden", 1)], model=DIGITS, steps=10, progress_every=4, preview=True
        )
    )
    progress, result = events[:-1], events[-1]
    assert [p.step for p in progress] == [4, 8, 10]
    assert all(len(p.previews) == 1 and p.previews[0].size == (28, 28) for p in progress)
    assert result.features[0].image.size == (28, 28)
    assert result.provenance["model"] == DIGITS


def test_other_objectives_match_hooks(fclient: Client, digits_model: nn.Module) -> None:
    """Token, CLS, direction and class-logit objectives, read back from the delivered images."""
    direction = np.linspace(-1, 1, 256).astype(np.float32)
    features = [
        Feature("blocks.2.mlp.hidden", 4, objective="token", token_index=10),
        Feature("blocks.5.out", 6, objective="cls"),
        Feature("blocks.3.mlp.hidden", objective="direction", direction=direction),
        Feature(objective="class_logit", class_index=3),
    ]
    result = fclient.optimize_features(features, model=DIGITS, steps=5, seed=2)
    images = normalize(as_input(np.stack([np.asarray(f.image) for f in result.features])))
    with torch.no_grad():
        token = float(hidden(digits_model, 2, images[0:1])[0, 10, 4])
        store: dict[str, torch.Tensor] = {}
        handle = digits_model.blocks[5].register_forward_hook(
            lambda m, a, o: store.__setitem__("out", o)
        )
        digits_model(images[1:2])
        handle.remove()
        cls = float(store["out"][0, 0, 6])
        along = hidden(digits_model, 3, images[2:3])[0, 1:] @ torch.from_numpy(direction)
        logit = float(digits_model(images[3:4])[0, 3])
    got = [f.objective for f in result.features]
    assert got == pytest.approx([token, cls, float(along.mean()), logit], rel=1e-4, abs=1e-5)
    np.testing.assert_allclose(
        result.features[2].patch_map, along.reshape(7, 7).numpy(), rtol=1e-4, atol=1e-5
    )
    assert result.features[3].patch_map is None
    assert [f.objective_kind for f in result.features] == [
        "token",
        "cls",
        "direction",
        "class_logit",
    ]


def test_other_image_size_is_resized_inside_the_forward(
    fclient: Client, digits_model: nn.Module
) -> None:
    result = fclient.optimize_features(
        [("blocks.2.mlp.hidden", 9)], model=DIGITS, steps=3, image_size=56
    )
    assert result.parameters["image_size"] == 56 and result.parameters["jitter"] == 8
    image = as_input(np.asarray(result.features[0].image))
    assert image.shape[-1] == 56
    resized = torch.nn.functional.interpolate(image, size=(28, 28), mode="bilinear")
    with torch.no_grad():
        expected = float(hidden(digits_model, 2, normalize(resized))[0, 1:, 9].mean())
    assert result.features[0].objective == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_open_clip_tower(fclient: Client) -> None:
    """CLIP towers get lr 1.0 and their own normalization; the objective is checked by hooks."""
    result = fclient.optimize_features([("blocks.1.mlp.hidden", 7)], model="clip", steps=3)
    assert result.parameters["learning_rate"] == pytest.approx(1.0)
    assert result.parameters["jitter"] == round(32 * 64 / 224)
    model = build("clip")
    visual = model.visual
    mean = torch.tensor(visual.preprocess_cfg["mean"])[None, :, None, None]
    std = torch.tensor(visual.preprocess_cfg["std"])[None, :, None, None]
    store: dict[str, torch.Tensor] = {}
    handle = visual.transformer.resblocks[1].mlp.gelu.register_forward_hook(
        lambda m, a, o: store.__setitem__("h", o)
    )
    with torch.no_grad():
        visual((as_input(np.asarray(result.features[0].image)) - mean) / std)
    handle.remove()
    expected = float(store["h"][0, 1:, 7].mean())
    assert result.features[0].objective == pytest.approx(expected, rel=1e-4, abs=1e-5)


BAD = [
    # (request options, features, expected error, words the message must contain)
    ({"steps": -5}, None, InvalidArgumentError, ["parameters.steps", "1.."]),
    ({"steps": 0}, None, InvalidArgumentError, ["parameters.steps"]),
    (
        {"learning_rate": math.nan},
        None,
        InvalidArgumentError,
        ["parameters.learning_rate", "finite"],
    ),
    ({"learning_rate": math.inf}, None, InvalidArgumentError, ["parameters.learning_rate"]),
    ({"learning_rate": -0.1}, None, InvalidArgumentError, ["parameters.learning_rate"]),
    ({"tv_weight": math.nan}, None, InvalidArgumentError, ["parameters.tv_weight"]),
    ({"image_size": 100_000}, None, InvalidArgumentError, ["parameters.image_size", "8..1024"]),
    ({"image_size": 0}, None, InvalidArgumentError, ["parameters.image_size"]),
    ({"copies": 0}, None, InvalidArgumentError, ["parameters.copies"]),
    ({"jitter": 500}, None, InvalidArgumentError, ["parameters.jitter"]),
    ({"progress_every": -1}, None, InvalidArgumentError, ["progress_every"]),
    ({"model": "nope"}, None, NotFoundError, ["nope"]),
    ({}, [], InvalidArgumentError, ["features"]),
    ({}, [("blocks.3.mlp.hidden", 256)], InvalidArgumentError, ["features[0].channel", "0..255"]),
    ({}, [("blocks.3.mlp.hidden", -1)], InvalidArgumentError, ["features[0].channel"]),
    ({}, [("blocks.3.nothing", 1)], NotFoundError, ["features[0].site"]),
    ({}, [("blocks.99.mlp.hidden", 1)], NotFoundError, ["block 99"]),
    ({}, [("blocks.1.attn.probs", 1)], InvalidArgumentError, ["features[0].site", "channels"]),
    (
        {},
        [Feature("blocks.1.out", objective="direction", direction=np.ones(3))],
        InvalidArgumentError,
        ["features[0].direction", "64"],
    ),
    (
        {},
        [Feature("blocks.1.out", 1, objective="token", token_index=50)],
        InvalidArgumentError,
        ["features[0].token_index", "0..49"],
    ),
    (
        {},
        [Feature(objective="class_logit", class_index=10)],
        InvalidArgumentError,
        ["features[0].class_index", "0..9"],
    ),
    (
        {"model": "clip"},
        [Feature(objective="class_logit")],
        FailedPreconditionError,
        ["no classifier"],
    ),
    ({}, [("blocks.1.out", 1)] * 65, ResourceExhaustedError, ["features", "64"]),
    # Nine features of eight copies forward 72 images per step, over the batch limit of 64.
    ({}, [("blocks.1.out", 1)] * 9, ResourceExhaustedError, ["features x copies", "72", "64"]),
    ({"copies": 64, "image_size": 1024}, None, ResourceExhaustedError, ["pixels"]),
    # 22 PNGs of 1024 px take up to 69 MB, over the 64 MiB message less its headroom.
    (
        {"copies": 1, "image_size": 1024},
        [("blocks.1.out", 1)] * 22,
        ResourceExhaustedError,
        ["features", "1024x1024", str((64 << 20) - (16 << 10))],
    ),
]


@pytest.mark.parametrize(("options", "features", "error", "words"), BAD)
def test_bad_requests(
    fclient: Client,
    options: dict[str, object],
    features: list[object] | None,
    error: type[Exception],
    words: list[str],
) -> None:
    kwargs = {"model": DIGITS, "steps": 2, **options}
    with pytest.raises(error) as caught:
        fclient.optimize_features(
            features if features is not None else [("blocks.1.mlp.hidden", 1)],
            **kwargs,
        )
    for word in words:
        assert word in str(caught.value)


def test_small_images_count_pixels_at_the_native_size(busy_server: RunningServer) -> None:
    """8 px images are resized to the model's 160 px for every forward: 8 copies are 204800
    pixels per step, not 512."""
    loaded = busy_server.registry.get("vit")
    assert tuple(loaded.adapter.data_config.input_size) == (3, 160, 160)
    params = OptimizationParams(image_size=8, copies=8)
    with pytest.raises(ResourceExhausted, match="204800 pixels") as caught:
        prepare_optimization(loaded, [FeatureSpec("blocks.1.out", 1)], params, 64, 200_000, 10**8)
    assert caught.value.reason is Reason.BATCH_TOO_LARGE
    prepared = prepare_optimization(
        loaded, [FeatureSpec("blocks.1.out", 1)], params, 64, 204_800, 10**8
    )
    assert (prepared.params.image_size, prepared.params.copies) == (8, 8)


def test_response_bound_covers_the_worst_png() -> None:
    """Noise does not compress: its PNG is the largest an image of that size gets."""
    noise = np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    encoded = io.BytesIO()
    Image.fromarray(noise).save(encoded, format="PNG")
    assert 300 * 300 * 3 < len(encoded.getvalue()) <= encoded_image_bound(300)


def test_direction_is_checked_before_it_is_converted(busy_server: RunningServer) -> None:
    """A million float16 values stay one decoded array until the length check refuses them."""
    request = fpb.OptimizeFeaturesRequest(
        features=[
            fpb.Feature(
                site="blocks.1.out",
                objective=fpb.FEATURE_OBJECTIVE_DIRECTION,
                direction=to_proto(np.ones(1_000_000, dtype=np.float16)),
            )
        ]
    )
    spec = feature_specs(request)[0]
    assert isinstance(spec.direction, np.ndarray) and spec.direction.dtype == np.float16
    with pytest.raises(InvalidArgument, match="got 1000000") as caught:
        prepare_optimization(
            busy_server.registry.get(DIGITS), [spec], OptimizationParams(), 64, 10**8, 10**8
        )
    assert caught.value.field == "features[0].direction"


def test_unknown_objective_value(busy_server: RunningServer, fclient: Client) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{busy_server.port}") as channel:
        stub = pb_grpc.InspectorStub(channel)
        request = fpb.OptimizeFeaturesRequest(
            model=DIGITS,
            features=[fpb.Feature(site="blocks.1.out", objective=99)],
        )
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.OptimizeFeatures(request, timeout=30))
    error = from_rpc_error(caught.value)
    assert isinstance(error, InvalidArgumentError)
    assert [v.field for v in error.field_violations] == ["features[0].objective"]
    assert fclient.optimize_features([("blocks.1.out", 1)], model=DIGITS, steps=1).features


@pytest.mark.parametrize("field", ["parameterization", "schedule", "optimizer"])
def test_unknown_choice_value(busy_server: RunningServer, fclient: Client, field: str) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{busy_server.port}") as channel:
        stub = pb_grpc.InspectorStub(channel)
        request = fpb.OptimizeFeaturesRequest(
            model=DIGITS,
            features=[fpb.Feature(site="blocks.1.out")],
            parameters=fpb.OptimizationParameters(**{field: 99}),
        )
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.OptimizeFeatures(request, timeout=30))
    error = from_rpc_error(caught.value)
    assert isinstance(error, InvalidArgumentError)
    assert [v.field for v in error.field_violations] == [f"parameters.{field}"]
    with pytest.raises(ValueError, match=f"{field}: 'nope' is not one of"):
        fclient.optimize_features([("blocks.1.out", 1)], model=DIGITS, **{field: "nope"})
    assert fclient.optimize_features([("blocks.1.out", 1)], model=DIGITS, steps=1).features


def test_visualize_command_passes_the_choices(busy_server: RunningServer, tmp_path: Path) -> None:
    out = tmp_path / "viz"
    main(
        [
            "--target",
            f"127.0.0.1:{busy_server.port}",
            "visualize",
            "--model",
            DIGITS,
            "--site",
            "blocks.2.mlp.hidden",
            "--channel",
            "3",
            "--steps",
            "2",
            "--parameterization",
            "fourier",
            "--schedule",
            "constant",
            "--optimizer",
            "adamax",
            "--out",
            str(out),
        ]
    )
    parameters = json.loads((out / "parameters.json").read_text())["parameters"]
    assert parameters["parameterization"] == "IMAGE_PARAMETERIZATION_FOURIER"
    assert parameters["schedule"] == "LEARNING_RATE_SCHEDULE_CONSTANT"
    assert parameters["optimizer"] == "FEATURE_OPTIMIZER_ADAMAX"


def steps_done(server: RunningServer, model: str) -> float:
    return sample(server, STEPS_METRIC, method="OptimizeFeatures", model=model)


LONG_STEPS = 100_000


def long_request() -> fpb.OptimizeFeaturesRequest:
    return fpb.OptimizeFeaturesRequest(
        model="vit",
        features=[fpb.Feature(site="blocks.1.mlp.hidden", channel=3)],
        parameters=fpb.OptimizationParameters(steps=LONG_STEPS),
        progress_every=1,
    )


def quick_call_once_the_slot_is_free(fclient: Client) -> None:
    """With one slot and no queue, a call is refused while the stopped run still holds it."""

    def served() -> bool:
        try:
            return bool(fclient.optimize_features([("blocks.1.out", 1)], model=DIGITS, steps=1))
        except ResourceExhaustedError:
            return False

    wait_until(served, "the stopped optimization to release its compute slot")


def test_cancel_stops_the_run_and_frees_the_slot(
    busy_server: RunningServer, fclient: Client
) -> None:
    before = steps_done(busy_server, "vit")
    with grpc.insecure_channel(f"127.0.0.1:{busy_server.port}") as channel:
        call = pb_grpc.InspectorStub(channel).OptimizeFeatures(long_request(), timeout=60)
        next(call)
        with (
            Client(f"127.0.0.1:{busy_server.port}", retries=1) as once,
            pytest.raises(ResourceExhaustedError) as caught,
        ):
            once.optimize_features([("blocks.1.out", 1)], model=DIGITS, steps=1)
        assert caught.value.reason == "QUEUE_FULL" and caught.value.retry_after == 1.0
        call.cancel()
        quick_call_once_the_slot_is_free(fclient)
    # Steps run only while the slot is held: the count is final, and far from the request's.
    assert 1 <= steps_done(busy_server, "vit") - before < LONG_STEPS


def test_deadline_stops_the_work(busy_server: RunningServer, fclient: Client) -> None:
    before = steps_done(busy_server, "vit")
    with pytest.raises((DeadlineExceededError, CancelledError)):
        fclient.optimize_features(
            [("blocks.1.mlp.hidden", 3)], model="vit", steps=LONG_STEPS, timeout=1.0
        )
    quick_call_once_the_slot_is_free(fclient)
    assert steps_done(busy_server, "vit") - before < LONG_STEPS


def test_steps_are_counted(busy_server: RunningServer, fclient: Client) -> None:
    before = steps_done(busy_server, "deit")
    fclient.optimize_features([("blocks.0.mlp.hidden", 1), ("final", 2)], model="deit", steps=3)
    assert steps_done(busy_server, "deit") == before + 3


def test_png_is_a_real_png(fclient: Client, tmp_path: Path) -> None:
    result = fclient.optimize_features([("blocks.0.mlp.hidden", 0)], model="swin", steps=2)
    assert result.features[0].png.startswith(b"\x89PNG")
    assert png_pixels(result.features[0].png).shape == (64, 64, 3)
