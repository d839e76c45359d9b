"""GetActivations over a real channel, checked against plain forward hooks in the test."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import open_clip
import pytest
import timm
import torch
from PIL import Image
from skimage import data as skdata
from support.reference import build, reference_sites, spec

from vitscope import Client, InvalidArgumentError

BLOCK_PARTS = ("out", "attn.out", "attn.probs", "mlp.hidden", "mlp.out")


def canonical_sites(client: Client, name: str) -> list[str]:
    sites = ["embed", "final"]
    for i in range(client.describe(name).block_count):
        sites += [f"blocks.{i}.{part}" for part in BLOCK_PARTS]
    return sites


def input_batch(client: Client, name: str, batch: int = 2) -> torch.Tensor:
    size = client.describe(name).input_size
    generator = torch.Generator().manual_seed(7)
    return torch.randn((batch, *size), generator=generator)


@pytest.mark.parametrize("name", ["vit", "deit", "swin", "clip"])
def test_every_canonical_site_matches_plain_hooks(client: Client, name: str) -> None:
    pixels = input_batch(client, name)
    sites = canonical_sites(client, name)
    assert len(sites) > 10
    result = client.activations(list(pixels.numpy()), sites, model=name)
    expected = reference_sites(name, pixels)
    for site in sites:
        got = result[site]
        assert got.dtype == np.float32
        np.testing.assert_allclose(
            got, expected[site], atol=1e-5, rtol=1e-5, err_msg=f"{name} {site}"
        )


@pytest.mark.parametrize("name", ["vit", "clip"])
def test_attention_probabilities_are_softmax_rows(client: Client, name: str) -> None:
    result = client.activations(
        list(input_batch(client, name).numpy()), ["blocks.1.attn.probs"], model=name
    )
    probs = result["blocks.1.attn.probs"]
    assert probs.min() >= 0
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    assert result.sites["blocks.1.attn.probs"].layout == "attention"


def test_raw_module_path_is_served(client: Client) -> None:
    pixels = input_batch(client, "vit")
    model = build("vit")
    captured = {}
    handle = model.blocks[1].attn.qkv.register_forward_hook(
        lambda m, a, o: captured.setdefault("qkv", o)
    )
    with torch.inference_mode():
        model(pixels)
    handle.remove()
    result = client.activations(list(pixels.numpy()), ["blocks.1.attn.qkv"], model="vit")
    np.testing.assert_allclose(result["blocks.1.attn.qkv"], captured["qkv"].numpy(), atol=1e-5)
    assert result.sites["blocks.1.attn.qkv"].layout == "tokens"


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_encoded_images_use_the_models_own_transform(client: Client) -> None:
    photo = skdata.astronaut()
    model = build("vit")
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
    pixels = transform(Image.fromarray(photo)).unsqueeze(0)
    expected = reference_sites("vit", pixels)
    from_png = client.activations([_png(photo)], ["blocks.1.out"], model="vit")
    from_pixels = client.activations([photo], ["blocks.1.out"], model="vit")
    np.testing.assert_allclose(from_png["blocks.1.out"], expected["blocks.1.out"], atol=1e-5)
    np.testing.assert_array_equal(from_pixels["blocks.1.out"], from_png["blocks.1.out"])


def test_open_clip_images_use_open_clips_transform(client: Client) -> None:
    photo = skdata.chelsea()
    s = spec("clip")
    _, _, preprocess = open_clip.create_model_and_transforms(str(s["architecture"]), **s["kwargs"])
    pixels = preprocess(Image.fromarray(photo)).unsqueeze(0)
    result = client.activations([_png(photo)], ["final"], model="clip")
    np.testing.assert_allclose(result["final"], reference_sites("clip", pixels)["final"], atol=1e-5)


@pytest.fixture(scope="module")
def full_vit(client: Client) -> tuple[list[np.ndarray], np.ndarray]:
    images = list(input_batch(client, "vit", batch=3).numpy())
    return images, client.activations(images, ["blocks.1.mlp.hidden"], model="vit")[
        "blocks.1.mlp.hidden"
    ]


def test_token_selection_modes(
    client: Client, full_vit: tuple[list[np.ndarray], np.ndarray]
) -> None:
    images, full = full_vit
    grid = client.describe("vit").grid
    site = "blocks.1.mlp.hidden"
    prefix = client.activations(images, [site], model="vit", tokens="prefix")
    np.testing.assert_array_equal(prefix[site], full[:, :1])
    patches = client.activations(images, [site], model="vit", tokens="patches")
    np.testing.assert_array_equal(patches[site], full[:, 1:])
    assert patches.sites[site].token_indices == list(range(1, full.shape[1]))
    picked = client.activations(images, [site], model="vit", tokens="indices", indices=[0, 5, 3])
    np.testing.assert_array_equal(picked[site], full[:, [0, 5, 3]])
    at = client.activations(
        images, [site], model="vit", tokens="positions", positions=[(0, 0), (2, 3)]
    )
    expected_index = [1, 1 + 2 * grid[1] + 3]
    np.testing.assert_array_equal(at[site], full[:, expected_index])
    assert at.sites[site].token_indices == expected_index


def test_reductions(client: Client, full_vit: tuple[list[np.ndarray], np.ndarray]) -> None:
    images, full = full_vit
    site = "blocks.1.mlp.hidden"
    grid = client.describe("vit").grid
    patch_tokens = full[:, 1:]
    mean = client.activations(images, [site], model="vit", reduction="mean")
    np.testing.assert_allclose(mean[site], patch_tokens.mean(axis=1), atol=1e-6)
    assert mean.parameters["token_mode"] == "TOKEN_SELECTION_MODE_PATCHES"
    maps = client.activations(
        images, [site], model="vit", reduction="patch_map", channels=[4, 0, 17]
    )
    expected_maps = patch_tokens[:, :, [4, 0, 17]].transpose(0, 2, 1).reshape(len(images), 3, *grid)
    np.testing.assert_array_equal(maps[site], expected_maps)
    assert maps.sites[site].channels == [4, 0, 17]
    top = client.activations(images, [site], model="vit", reduction="top_channels", top_k=5)
    channel_means = patch_tokens.mean(axis=1)
    expected_channels = np.argsort(-channel_means, axis=1)[:, :5]
    np.testing.assert_array_equal(top.sites[site].channel_indices, expected_channels)
    np.testing.assert_allclose(
        top[site], np.take_along_axis(channel_means, expected_channels, axis=1), atol=1e-6
    )


def test_mean_of_attention_over_patch_queries(client: Client) -> None:
    images = list(input_batch(client, "vit").numpy())
    site = "blocks.0.attn.probs"
    full = client.activations(images, [site], model="vit")[site]
    mean = client.activations(images, [site], model="vit", reduction="mean")[site]
    np.testing.assert_allclose(mean, full[:, :, 1:, :].mean(axis=2), atol=1e-6)


@pytest.mark.parametrize(("dtype", "tolerance"), [("float16", 2e-3), ("bfloat16", 1e-2)])
def test_reduced_precision_outputs(
    client: Client, full_vit: tuple[list[np.ndarray], np.ndarray], dtype: str, tolerance: float
) -> None:
    images, full = full_vit
    result = client.activations(images, ["blocks.1.mlp.hidden"], model="vit", dtype=dtype)
    got = result["blocks.1.mlp.hidden"]
    assert got.dtype == (np.float16 if dtype == "float16" else np.float32)
    np.testing.assert_allclose(got.astype(np.float32), full, rtol=tolerance, atol=tolerance)
    assert result.parameters["output_dtype"] == f"DTYPE_{dtype.upper()}"


def test_predictions_match_the_models_softmax(client: Client) -> None:
    pixels = input_batch(client, "deit", batch=2)
    result = client.activations(list(pixels.numpy()), ["final"], model="deit", top_predictions=3)
    logits = torch.from_numpy(reference_sites("deit", pixels)["logits"])
    probabilities = logits.softmax(-1)
    for row, top in enumerate(result.predictions):
        expected = probabilities[row].topk(3)
        assert [p.class_index for p in top] == expected.indices.tolist()
        np.testing.assert_allclose([p.probability for p in top], expected.values.numpy(), atol=1e-6)
        assert [p.class_name for p in top] == [str(i) for i in expected.indices.tolist()]


def test_response_says_what_produced_it(client: Client) -> None:
    result = client.activations(
        list(input_batch(client, "swin").numpy()), ["blocks.3.out"], model="swin"
    )
    provenance = result.provenance
    assert provenance["model"] == "swin"
    assert provenance["weights_identity"] == "random:seed=3"
    assert {"torch", "timm", "open_clip_torch", "vitscope"} <= set(provenance["library_versions"])
    assert result.parameters["sites"] == ["blocks.3.out"]
    assert result.parameters["batch_size"] == 2


def test_blocks_after_the_last_needed_one_are_skipped(client: Client, loaded: dict) -> None:
    pixels = input_batch(client, "vit")
    last_block = loaded["vit"].adapter.root.blocks[-1]
    calls = []
    handle = last_block.register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        early = client.activations(list(pixels.numpy()), ["embed", "blocks.1.out"], model="vit")
        assert calls == []
        with_predictions = client.activations(
            list(pixels.numpy()), ["blocks.1.out"], model="vit", top_predictions=1
        )
        assert calls == [1]
    finally:
        handle.remove()
    expected = reference_sites("vit", pixels)
    np.testing.assert_allclose(early["blocks.1.out"], expected["blocks.1.out"], atol=1e-5)
    np.testing.assert_array_equal(early["blocks.1.out"], with_predictions["blocks.1.out"])


def test_a_pooled_final_site_is_served_raw(client: Client) -> None:
    described = client.describe("clip-pooled")
    assert described.sites["final"]["layout"] == "SITE_LAYOUT_RAW"
    assert described.sites["blocks.0.out"]["layout"] == "SITE_LAYOUT_TOKENS"
    images = list(input_batch(client, "clip-pooled").numpy())
    assert client.activations(images, ["final"], model="clip-pooled")["final"].shape == (2, 32)
    with pytest.raises(InvalidArgumentError) as caught:
        client.activations(images, ["final"], model="clip-pooled", reduction="mean")
    assert [v.field for v in caught.value.field_violations] == ["sites"]


def test_concurrent_requests_on_one_model_do_not_mix(client: Client) -> None:
    images = list(input_batch(client, "vit").numpy())
    requests = [
        {"sites": ["blocks.0.attn.probs", "blocks.2.mlp.hidden"]},
        {"sites": ["final"], "top_predictions": 2},
        {"sites": ["blocks.4.out"], "reduction": "mean"},
    ] * 3
    expected = [client.activations(images, model="vit", **r) for r in requests[:3]]
    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        results = list(pool.map(lambda r: client.activations(images, model="vit", **r), requests))
    for index, result in enumerate(results):
        reference = expected[index % 3]
        assert result.sites.keys() == reference.sites.keys()
        for site in result.sites:
            # A concurrent attention-probability request runs block 0 unfused: same maths,
            # other rounding.
            np.testing.assert_allclose(result[site], reference[site], atol=1e-5, rtol=1e-5)
