"""Explain over a real channel, against implementations written in the tests: rollout by
explicit float64 matrix products, relevancy by autograd on hooked attention, integrated
gradients by a loop over interpolation points, curves by a loop over masked images."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from safetensors.torch import load_file
from support.reference_explain import (
    curve,
    hooked_attention,
    integrated_gradients,
    patch_sum,
    relevancy,
    rollout,
)
from support.reference_projection import clip_text
from support.servers import CLIP_WITH_TEXT, TEST_MODELS, start
from support.waiting import wait_until
from torchvision.transforms.functional import gaussian_blur

from vitscope import Client, DeadlineExceededError, ResourceExhaustedError
from vitscope.cli import main
from vitscope.errors import from_rpc_error
from vitscope.explain import MethodOptions, Prompt
from vitscope.v1 import common_pb2, projection_pb2
from vitscope.v1 import explain_pb2 as pb
from vitscope.v1 import inspector_pb2_grpc as pb_grpc
from vitscope_server.builtin import (
    DIGITS_ARCHITECTURE,
    DIGITS_GAP_WEIGHTS,
    DIGITS_MEAN,
    DIGITS_STD,
    DIGITS_WEIGHTS,
    digits_kwargs,
)
from vitscope_server.builtin.digits_data import digits_split
from vitscope_server.settings import ServerSettings
from vitscope_server.transport.app import RunningServer, create_server

CLIP = CLIP_WITH_TEXT
MODELS = [*(m for m in TEST_MODELS if m["name"] in ("vit", "deit", "swin")), CLIP]
DIGITS_WEIGHT_FILES = {"vitscope-digits": DIGITS_WEIGHTS, "vitscope-digits-gap": DIGITS_GAP_WEIGHTS}
NAMES = ["cat", "dog", "tabby cat", "goldfish", "fire truck", "teapot"]
IG = "integrated_gradients"


@pytest.fixture(scope="module")
def explain_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    models_file = tmp_path_factory.mktemp("explain") / "models.yaml"
    models_file.write_text(yaml.safe_dump({"models": MODELS}))
    settings = ServerSettings(
        host="127.0.0.1", port=0, metrics_port=0, models_file=models_file, default_model="vit"
    )
    running = create_server(settings)
    assert running.registry.wait_until_settled(timeout=120)
    yield running
    running.stop(0)


@pytest.fixture(scope="module")
def ec(explain_server: RunningServer) -> Iterator[Client]:
    with Client(f"127.0.0.1:{explain_server.port}", timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def stub(explain_server: RunningServer) -> Iterator[pb_grpc.InspectorStub]:
    with grpc.insecure_channel(f"127.0.0.1:{explain_server.port}") as channel:
        yield pb_grpc.InspectorStub(channel)


def build(name: str) -> torch.nn.Module:
    """The served model, rebuilt here from its definition (and weights)."""
    if name in DIGITS_WEIGHT_FILES:
        pool = "avg" if name.endswith("-gap") else "token"
        model = timm.create_model(DIGITS_ARCHITECTURE, pretrained=False, **digits_kwargs(pool))
        model.load_state_dict(load_file(str(DIGITS_WEIGHT_FILES[name])))
        return model.eval()
    spec = next(m for m in MODELS if m["name"] == name)
    torch.manual_seed(int(spec["seed"]))  # type: ignore[call-overload]
    kwargs = dict(spec.get("kwargs", {}))  # type: ignore[call-overload]
    if spec["family"] == "timm":
        return timm.create_model(str(spec["architecture"]), pretrained=False, **kwargs).eval()
    return open_clip.create_model(str(spec["architecture"]), pretrained=None, **kwargs).eval()


def held_out_digits(count: int, offset: int = 0) -> tuple[torch.Tensor, list[int]]:
    """Test-split digits, `count` of them spread over the classes, normalized as the model's
    own transform does (28 px, MNIST statistics on three channels)."""
    _, _, images, labels = digits_split()
    chosen = [int(np.flatnonzero(labels == i % 10)[offset + i // 10]) for i in range(count)]
    pixels = torch.from_numpy(images[chosen]).float().div(255)[:, None].expand(-1, 3, -1, -1)
    mean = torch.tensor(DIGITS_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(DIGITS_STD).view(1, 3, 1, 1)
    return ((pixels - mean) / std).contiguous(), [int(labels[i]) for i in chosen]


def inputs(client: Client, name: str, batch: int = 2) -> torch.Tensor:
    if name in DIGITS_WEIGHT_FILES:
        return held_out_digits(batch)[0]
    size = client.describe(name).input_size
    return torch.randn((batch, *size), generator=torch.Generator().manual_seed(7))


def anatomy(client: Client, name: str) -> tuple[int, tuple[int, int]]:
    described = client.describe(name)
    return described.prefix_token_count, described.grid


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("name", ["vit", "deit", "vitscope-digits-gap"])
def test_rollout_is_the_product_of_fused_attention(ec: Client, name: str, fusion: str) -> None:
    pixels = inputs(ec, name)
    result = ec.explain(
        list(pixels.numpy()),
        ["rollout"],
        model=name,
        options={"rollout": MethodOptions(head_fusion=fusion)},
    )
    prefix, grid = anatomy(ec, name)
    with torch.no_grad():
        _, probs = hooked_attention(build(name), pixels)
    for i, image in enumerate(result.images):
        expected = rollout([p[i].numpy() for p in probs], fusion, prefix, grid)
        np.testing.assert_allclose(image.maps["rollout"].grid_map, expected, rtol=1e-4, atol=1e-7)
    assert result.methods["rollout"]["head_fusion"] == f"HEAD_FUSION_{fusion.upper()}"


@pytest.mark.parametrize("name", ["vit", "deit", "vitscope-digits", "vitscope-digits-gap"])
def test_relevancy_equals_autograd_on_hooked_attention(ec: Client, name: str) -> None:
    pixels = inputs(ec, name)
    result = ec.explain(list(pixels.numpy()), ["relevancy"], model=name, targets=[3, None])
    prefix, grid = anatomy(ec, name)
    model = build(name)
    assert result.images[0].target_index == 3 and result.images[1].target_is_prediction
    for i, image in enumerate(result.images):
        expected = relevancy(model, pixels[i : i + 1], image.target_index, prefix, grid)
        got = image.maps["relevancy"].grid_map
        np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-6 * np.abs(expected).max())


def reference_baseline(client: Client, name: str, pixels: torch.Tensor, kind: str) -> torch.Tensor:
    described = client.describe(name)
    mean = torch.tensor(described.mean).view(1, 3, 1, 1)
    std = torch.tensor(described.std).view(1, 3, 1, 1)
    if kind == "blurred":
        sigma = pixels.shape[-2] / 8
        radius = min(math.ceil(3 * sigma), pixels.shape[-1] - 1)
        return gaussian_blur(pixels, [2 * radius + 1] * 2, [sigma, sigma])
    if kind == "noise":
        noise = torch.rand(pixels.shape, generator=torch.Generator().manual_seed(11))
        return (noise - mean) / std
    return (torch.zeros_like(pixels) - mean) / std


@pytest.mark.parametrize("baseline", ["black", "blurred", "noise"])
def test_integrated_gradients_equal_a_loop_over_points(ec: Client, baseline: str) -> None:
    """Six points in passes of five interpolated images: passes cross image boundaries."""
    pixels = inputs(ec, "vit")
    options = MethodOptions(steps=6, baseline=baseline, batch_size=5, seed=11)
    result = ec.explain(list(pixels.numpy()), [IG], model="vit", options={IG: options})
    reference = reference_baseline(ec, "vit", pixels, baseline)
    model = build("vit")
    for i, image in enumerate(result.images):
        attributions, difference = integrated_gradients(
            model, pixels[i], reference[i], image.target_index, 6
        )
        got = image.maps[IG]
        expected = patch_sum(attributions.abs().sum(dim=0).numpy(), (10, 10))
        np.testing.assert_allclose(got.grid_map, expected, rtol=1e-3, atol=1e-4 * expected.max())
        assert got.completeness is not None
        assert got.completeness["attribution_sum"] == pytest.approx(
            float(attributions.sum()), rel=1e-3, abs=1e-4
        )
        assert got.completeness["score_difference"] == pytest.approx(difference, rel=1e-4, abs=1e-5)
    assert result.methods[IG]["steps"] == 6 and result.methods[IG]["batch_size"] == 5


def test_integrated_gradients_are_complete_within_the_reported_error(ec: Client) -> None:
    """At the default 50 steps the attributions sum to f(x) - f(black), computed here."""
    pixels, _ = held_out_digits(4)
    result = ec.explain(list(pixels.numpy()), [IG], model="vitscope-digits")
    assert result.methods[IG]["steps"] == 50
    model = build("vitscope-digits")
    black = reference_baseline(ec, "vitscope-digits", pixels, "black")
    with torch.no_grad():
        logits, black_logits = model(pixels), model(black)
    for i, image in enumerate(result.images):
        t = image.target_index
        difference = float(logits[i, t] - black_logits[i, t])
        c = image.maps[IG].completeness
        assert c is not None
        assert c["score_difference"] == pytest.approx(difference, rel=1e-4, abs=1e-5)
        assert abs(c["attribution_sum"] - difference) <= c["completeness_error"] + 1e-4
        assert c["relative_completeness_error"] < 0.05


def test_deletion_and_insertion_equal_a_plain_loop(ec: Client) -> None:
    pixels, labels = held_out_digits(2, offset=3)
    result = ec.explain(
        list(pixels.numpy()),
        ["relevancy"],
        model="vitscope-digits",
        targets=labels,
        faithfulness=True,
        patches_per_step=7,
        seed=5,
    )
    counts = [0, 7, 14, 21, 28, 35, 42, 49]
    assert result.patch_counts == counts
    model = build("vitscope-digits")
    black = reference_baseline(ec, "vitscope-digits", pixels, "black")
    blurred = gaussian_blur(pixels, [23, 23], [3.5, 3.5])
    generator = torch.Generator().manual_seed(5)
    random_orders = [torch.randperm(49, generator=generator).tolist() for _ in labels]
    for i, image in enumerate(result.images):
        grid_map = image.maps["relevancy"].grid_map.reshape(-1)
        orders = {"map": np.argsort(-grid_map, kind="stable").tolist(), "random": random_orders[i]}
        found = {"map": image.maps["relevancy"].faithfulness, "random": image.random_order}
        for key, order in orders.items():
            pair = found[key]
            assert pair is not None
            for got, insertion, fill in (
                (pair.deletion, False, black),
                (pair.insertion, True, blurred),
            ):
                expected = curve(
                    model, pixels[i], fill[i], order, counts, labels[i], (7, 7), insertion
                )
                np.testing.assert_allclose(got.probabilities, expected, atol=2e-5)
                assert got.auc == pytest.approx(np.trapezoid(expected, dx=1 / 7), abs=1e-5)


def test_relevancy_and_integrated_gradients_beat_the_random_order_on_digits(ec: Client) -> None:
    """Twenty held-out digits, true labels as targets, one patch a step: removing patches in
    map order drops the true digit's probability faster than at random, and adding them to
    the blurred digit raises it faster."""
    pixels, labels = held_out_digits(20)
    result = ec.explain(
        list(pixels.numpy()),
        ["relevancy", IG],
        model="vitscope-digits",
        targets=labels,
        options={IG: MethodOptions(steps=16)},
        faithfulness=True,
    )
    assert len(result.patch_counts) == 50
    random_deletion, random_insertion = result.mean_auc["random"]
    for method in ("relevancy", IG):
        deletion, insertion = result.mean_auc[method]
        assert deletion < random_deletion, method
        assert insertion > random_insertion, method
    per_image = [image.random_order.deletion.auc for image in result.images]  # type: ignore[union-attr]
    assert random_deletion == pytest.approx(np.mean(per_image), abs=1e-6)


def test_class_embedding_is_the_projection_map(ec: Client) -> None:
    pixels = inputs(ec, "vit")
    images = list(pixels.numpy())
    explained = ec.explain(images, ["class_embedding"], model="vit", targets=[4, None])
    projected = ec.project(images, model="vit", targets=[4, None], importance_maps=True)
    for got, expected in zip(explained.images, projected.images, strict=True):
        assert got.target_index == expected.target_index
        assert expected.importance is not None
        np.testing.assert_array_equal(
            got.maps["class_embedding"].grid_map, expected.importance.summed
        )


def test_feature_map_is_the_patch_activation_map(ec: Client) -> None:
    pixels = inputs(ec, "vit")
    images = list(pixels.numpy())
    site = "blocks.2.mlp.hidden"
    explained = ec.explain(
        images,
        ["feature_map", "rollout"],
        model="vit",
        options={"feature_map": MethodOptions(site=site)},
    )
    strongest = ec.activations(images, [site], reduction="mean", tokens="patches")[site].argmax(-1)
    for i, image in enumerate(explained.images):
        got = image.maps["feature_map"]
        assert got.channel == strongest[i]
        maps = ec.activations(images, [site], reduction="patch_map", channels=[got.channel])
        np.testing.assert_allclose(got.grid_map, maps[site][i, 0], rtol=1e-5, atol=1e-6)
    assert explained.methods["feature_map"]["channel"] == -1


def test_windowed_attention_still_has_gradients_and_feature_maps(ec: Client) -> None:
    """Swin has no rollout or relevancy, but integrated gradients, feature maps (by default
    from the deepest block on the first stage's grid) and their curves apply."""
    result = ec.explain(
        list(inputs(ec, "swin").numpy()),
        [IG, "feature_map"],
        model="swin",
        options={IG: MethodOptions(steps=2)},
        faithfulness=True,
        patches_per_step=64,
    )
    assert result.methods["feature_map"]["site"] == "blocks.1.mlp.hidden"
    assert result.patch_counts == [0, 64, 128, 192, 256]
    for image in result.images:
        assert image.maps[IG].grid_map.shape == (16, 16)
        assert image.maps["feature_map"].grid_map.shape == (16, 16)
        assert image.maps[IG].faithfulness is not None


def test_clip_explains_a_prompt_and_a_class_name(ec: Client) -> None:
    """A free-text prompt is scored as one more class after the label set; the scores are
    the scaled cosine with text embeddings computed here."""
    prompt = "a photo of a red fire truck"
    pixels = inputs(ec, "clip")
    result = ec.explain(
        list(pixels.numpy()),
        ["rollout", "relevancy", IG],
        model="clip",
        targets=[Prompt(prompt), "dog"],
        class_names=NAMES,
        templates=["a photo of a {}."],
        options={IG: MethodOptions(steps=8)},
    )
    assert result.class_names == [*NAMES, prompt]
    assert result.images[0].target_name == prompt and result.images[0].target_index == 6
    assert result.images[1].target_name == "dog"
    model = build("clip")
    text = torch.cat(
        [
            clip_text(model, "ViT-B-32", NAMES, ["a photo of a {}."]),
            clip_text(model, "ViT-B-32", [prompt], ["{}"]),
        ]
    )
    black = reference_baseline(ec, "clip", pixels, "black")
    with torch.no_grad():
        scale = model.logit_scale.exp()
        scores = scale * F.normalize(model.encode_image(pixels), dim=-1) @ text.T
        black_scores = scale * F.normalize(model.encode_image(black), dim=-1) @ text.T
    for i, image in enumerate(result.images):
        t = image.target_index
        assert image.target_probability == pytest.approx(
            float(scores[i].softmax(dim=-1)[t]), rel=1e-4
        )
        c = image.maps[IG].completeness
        assert c is not None
        assert c["score_difference"] == pytest.approx(
            float(scores[i, t] - black_scores[i, t]), rel=1e-3, abs=1e-4
        )
        for method in ("rollout", "relevancy", IG):
            assert np.isfinite(image.maps[method].grid_map).all()
            assert image.maps[method].grid_map.std() > 0, method


def test_progress_is_reported_after_each_pass(ec: Client) -> None:
    seen = []
    ec.explain(
        list(inputs(ec, "vit").numpy()),
        [IG],
        options={IG: MethodOptions(steps=4, batch_size=3)},
        on_progress=lambda p: seen.append((p.method, p.completed, p.total)),
    )
    assert seen == [(IG, 3, 8), (IG, 6, 8), (IG, 8, 8)]


def _request(model: str = "vit", **fields: object) -> pb.ExplainRequest:
    image = common_pb2.Image(encoded=_png())
    methods = fields.pop(
        "methods", [pb.ExplanationMethodRequest(method=pb.EXPLANATION_METHOD_ROLLOUT)]
    )
    return pb.ExplainRequest(model=model, images=[image], methods=methods, **fields)  # type: ignore[arg-type]


def _png() -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.full((28, 28), 200, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _method(method: int, **fields: object) -> list[pb.ExplanationMethodRequest]:
    return [pb.ExplanationMethodRequest(method=method, **fields)]  # type: ignore[arg-type]


def _ig(**fields: object) -> list[pb.ExplanationMethodRequest]:
    parameters = pb.IntegratedGradientsParameters(**fields)  # type: ignore[arg-type]
    return _method(pb.EXPLANATION_METHOD_INTEGRATED_GRADIENTS, integrated_gradients=parameters)


def _target(**fields: object) -> list[pb.ExplanationTarget]:
    return [pb.ExplanationTarget(**fields)]  # type: ignore[arg-type]


INVALID = grpc.StatusCode.INVALID_ARGUMENT
REASONS = {
    grpc.StatusCode.FAILED_PRECONDITION: "MODEL_UNSUPPORTED",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "LIMIT_EXCEEDED",
}
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
ROLLOUT = pb.EXPLANATION_METHOD_ROLLOUT
RELEVANCY = pb.EXPLANATION_METHOD_RELEVANCY
BAD_REQUESTS = [
    ({"methods": []}, INVALID, "methods: at least one method"),
    ({"methods": _method(0)}, INVALID, "methods[0].method: value 0 not allowed"),
    ({"methods": _method(99)}, INVALID, "methods[0].method: value 99 not allowed"),
    ({"methods": _method(ROLLOUT) * 2}, INVALID, "methods: each method may appear once"),
    ({"methods": _ig(steps=0)}, INVALID, "methods[0].integrated_gradients.steps: 0 not allowed"),
    (
        {"methods": _ig(batch_size=65)},
        INVALID,
        "methods[0].integrated_gradients.batch_size: 65 not allowed",
    ),
    (
        {"methods": _ig(blur_sigma=-1)},
        INVALID,
        "methods[0].integrated_gradients.blur_sigma: -1.0 not allowed",
    ),
    (
        {"methods": _ig(baseline=9)},
        INVALID,
        "methods[0].integrated_gradients.baseline: value 9 not allowed",
    ),
    (
        {"methods": _method(ROLLOUT, rollout=pb.RolloutParameters(head_fusion=7))},
        INVALID,
        "methods[0].rollout.head_fusion: value 7 not allowed",
    ),
    (
        {"methods": _method(RELEVANCY, rollout=pb.RolloutParameters())},
        INVALID,
        "methods[0].rollout: not allowed with method relevancy",
    ),
    (
        {
            "methods": _method(
                pb.EXPLANATION_METHOD_FEATURE_MAP,
                feature_map=pb.FeatureMapParameters(site="blocks.0.attn.probs"),
            )
        },
        INVALID,
        "methods[0].feature_map.site: 'blocks.0.attn.probs' holds no per-token features",
    ),
    (
        {
            "methods": _method(
                pb.EXPLANATION_METHOD_FEATURE_MAP,
                feature_map=pb.FeatureMapParameters(channel=10_000),
            )
        },
        INVALID,
        "methods[0].feature_map.channel: 10000 out of range",
    ),
    ({"targets": _target() * 2}, INVALID, "targets: give none or one per image; got 2 for 1"),
    (
        {"targets": _target(class_ref=common_pb2.ClassRef(name="nope"))},
        INVALID,
        "targets[0].class_ref.name: unknown class name 'nope'",
    ),
    (
        {"targets": _target(class_ref=common_pb2.ClassRef(index=5000))},
        INVALID,
        "targets[0].class_ref.index: class index 5000 out of range",
    ),
    ({"targets": _target(prompt="a cat")}, INVALID, "targets[0].prompt: free-text prompts are"),
    (
        {
            "model": "clip",
            "targets": _target(prompt="  "),
            "labels": projection_pb2.LabelSet(class_names=NAMES),
        },
        INVALID,
        "targets[0].prompt: the prompt is blank",
    ),
    (
        {"labels": projection_pb2.LabelSet(class_names=NAMES)},
        INVALID,
        "labels: model vit has its own classifier",
    ),
    (
        {"faithfulness": pb.FaithfulnessParameters(patches_per_step=0)},
        INVALID,
        "faithfulness.patches_per_step: 0 not allowed; allowed: 1..the model's patches",
    ),
    (
        {"faithfulness": pb.FaithfulnessParameters(patches_per_step=101)},
        INVALID,
        "faithfulness.patches_per_step: 101 not allowed; allowed 1..100",
    ),
    (
        {"faithfulness": pb.FaithfulnessParameters(blur_sigma=1e308)},
        INVALID,
        "faithfulness.blur_sigma: 1e+308 not allowed; allowed: finite, > 0 and <= 10000",
    ),
    (
        {"faithfulness": pb.FaithfulnessParameters(blur_sigma=0)},
        INVALID,
        "faithfulness.blur_sigma: 0.0 not allowed",
    ),
    (
        {"model": "swin"},
        PRECONDITION,
        "methods[0]: rollout does not apply to model swin: it uses windowed",
    ),
    (
        {"model": "swin", "methods": _method(RELEVANCY)},
        PRECONDITION,
        "relevancy does not apply to model swin: it uses windowed attention",
    ),
    (
        {"model": "vitscope-digits-gap", "methods": _method(pb.EXPLANATION_METHOD_CLASS_EMBEDDING)},
        PRECONDITION,
        "class_embedding does not apply to model vitscope-digits-gap: it has no class token",
    ),
    (
        {"methods": _ig(steps=4096, batch_size=1)},
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "about 4096 forward passes",
    ),
]


@pytest.mark.parametrize(("fields", "code", "message"), BAD_REQUESTS)
def test_bad_requests_name_the_field(
    stub: pb_grpc.InspectorStub, fields: dict[str, object], code: grpc.StatusCode, message: str
) -> None:
    """INVALID_ARGUMENT carries one field violation naming the field (the message's prefix);
    the others their reason; the server answers the next call."""
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Explain(_request(**fields), timeout=60))  # type: ignore[arg-type]
    error = from_rpc_error(caught.value)
    assert caught.value.code() == code  # type: ignore[attr-defined]
    assert message in error.details
    if code == INVALID:
        field = message.split(":")[0]
        assert [v.field for v in error.field_violations] == [field]
        assert error.reason == (
            "FIELD_REQUIRED" if field == "methods" and "at least" in message else "INVALID_FIELD"
        )
    else:
        assert error.reason == REASONS[code]
    assert [r.WhichOneof("payload") for r in stub.Explain(_request(), timeout=60)] == [
        "header",
        "image",
        "summary",
    ]


def test_a_request_over_the_limits_is_refused_before_its_images_are_read(
    stub: pb_grpc.InspectorStub,
) -> None:
    """The passes are counted from the number of images: an undecodable image is never
    looked at when the request would be refused anyway."""
    request = _request(methods=_ig(steps=4096, batch_size=1))
    request.images[0].encoded = b"not an image"
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Explain(request, timeout=60))
    error = from_rpc_error(caught.value)
    assert error.reason == "LIMIT_EXCEEDED", error.details


def test_a_deadline_stops_integrated_gradients_within_a_pass(
    ec: Client, explain_server: RunningServer
) -> None:
    """2,000 single-image passes take far longer than the deadline; the run stops at the next
    pass, the call ends, and the server answers the next call."""
    with pytest.raises(DeadlineExceededError):
        ec.explain(
            list(inputs(ec, "vit", batch=1).numpy()),
            [IG],
            options={IG: MethodOptions(steps=2000, batch_size=1)},
            timeout=2.0,
        )
    in_flight = explain_server.metrics.in_flight.labels("Explain")
    wait_until(lambda: in_flight._value.get() == 0, "the cancelled call to stop")
    assert ec.explain(list(inputs(ec, "vit", batch=1).numpy()), ["rollout"]).images


def test_cli_writes_overlays_and_curves(
    ec: Client, explain_server: RunningServer, tmp_path: Path
) -> None:
    image = tmp_path / "digit.png"
    _, _, images, _ = digits_split()
    Image.fromarray(images[0]).save(image)
    out = tmp_path / "out"
    main(
        [
            "--target",
            f"127.0.0.1:{explain_server.port}",
            "explain",
            str(image),
            "--model",
            "vitscope-digits",
            "--method",
            "rollout",
            "relevancy",
            "ig",
            "--steps",
            "8",
            "--out",
            str(out),
        ]
    )
    written = sorted(p.name for p in out.iterdir())
    assert written == ["digit-explained.png"]
    picture = np.asarray(Image.open(out / "digit-explained.png"))
    assert picture.std() > 10


def test_backward_memory_is_bounded_before_compute(tmp_path: Path) -> None:
    """With a 20 MB result limit, about 3 MB of saved activations per image of the test ViT:
    integrated gradients default to 6 images a pass, and 8 are refused, as is relevancy
    over 8 images, before any compute."""
    running = start(tmp_path, max_result_bytes=20 << 20, builtin_models=False)
    try:
        with Client(f"127.0.0.1:{running.port}", timeout=60) as client:
            pixels = list(torch.randn((8, 3, 160, 160)).numpy())
            result = client.explain(pixels[:1], [IG], options={IG: MethodOptions(steps=1)})
            assert result.methods[IG]["batch_size"] == 6
            with pytest.raises(ResourceExhaustedError, match="batch_size: 8 interpolated images"):
                client.explain(pixels[:1], [IG], options={IG: MethodOptions(batch_size=8)})
            with pytest.raises(ResourceExhaustedError, match="images: relevancy over 8 images"):
                client.explain(pixels, ["relevancy"])
    finally:
        running.stop(0)
