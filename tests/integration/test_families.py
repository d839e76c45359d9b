"""The seven families Ghiasi et al. visualize (ViT, DeiT, CoaT, ConViT, PiT, Swin, Twins),
served by a real server and checked against plain hooks written out per family."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from support.families_reference import FAMILIES, FAMILY_MODELS, build, family_sites

from vitscope import Client, FailedPreconditionError, InvalidArgumentError
from vitscope_server.settings import ServerSettings
from vitscope_server.transport.app import RunningServer, create_server

BATCH = 2
# Families whose grid or width changes with their stage.
HIERARCHICAL = ("swin", "pit", "coat", "twins")


@pytest.fixture(scope="module")
def family_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    folder = tmp_path_factory.mktemp("families")
    models_file = folder / "models.yaml"
    models_file.write_text(yaml.safe_dump({"models": FAMILY_MODELS}))
    settings = ServerSettings(
        host="127.0.0.1", port=0, metrics_port=-1, models_file=models_file, default_model="vit"
    )
    running: RunningServer = create_server(settings)
    assert running.registry.wait_until_settled(timeout=300)
    with Client(f"127.0.0.1:{running.port}", timeout=120) as client:
        yield client
    running.stop(0)


@pytest.fixture(scope="module")
def served(family_client: Client) -> dict[str, dict[str, Any]]:
    """Per family: its description, a pixel batch, the server's activations at every
    canonical site it serves, and the plain-hook reference."""
    out = {}
    for name in FAMILIES:
        description = family_client.describe(name)
        size = description.input_size
        pixels = torch.randn((BATCH, *size), generator=torch.Generator().manual_seed(3))
        sites = list(description.sites)
        result = family_client.activations(list(pixels.numpy()), sites, model=name)
        got = {site: result[site] for site in sites}
        out[name] = {
            "description": description,
            "pixels": pixels,
            "got": got,
            "reference": family_sites(name, build(name), pixels),
        }
    return out


@pytest.mark.parametrize("name", FAMILIES)
def test_every_served_site_equals_a_plain_hook(served: dict[str, Any], name: str) -> None:
    family = served[name]
    description, got, reference = family["description"], family["got"], family["reference"]
    blocks = description.block_count
    assert blocks == sum(1 for key in reference if re.fullmatch(r"blocks\.\d+\.out", key))
    expected_sites = {"embed", "final"} | {
        f"blocks.{i}.{part}"
        for i in range(blocks)
        for part in ("out", "attn.out", "mlp.hidden", "mlp.out", "attn.probs")
    }
    # Every canonical site is served or listed as unavailable with a reason.
    assert set(got) | set(description.unavailable_sites) >= expected_sites
    for site, array in got.items():
        np.testing.assert_allclose(
            array, reference[site], rtol=1e-4, atol=2e-5, err_msg=f"{name} {site}"
        )


@pytest.mark.parametrize("name", FAMILIES)
def test_block_output_is_its_input_plus_both_sublayers(served: dict[str, Any], name: str) -> None:
    got, reference = served[name]["got"], served[name]["reference"]
    for i in range(served[name]["description"].block_count):
        total = (
            reference[f"residual.{i}"] + got[f"blocks.{i}.attn.out"] + got[f"blocks.{i}.mlp.out"]
        )
        np.testing.assert_allclose(
            got[f"blocks.{i}.out"], total, rtol=1e-5, atol=1e-5, err_msg=f"{name} block {i}"
        )
        if i > 0 and np.array_equal(reference[f"in.{i}"], reference[f"blocks.{i - 1}.out"]):
            np.testing.assert_array_equal(reference[f"residual.{i}"] - reference[f"in.{i}"], 0)


@pytest.mark.parametrize("name", FAMILIES)
def test_grids_and_prefix_tokens_are_per_site(served: dict[str, Any], name: str) -> None:
    description, got = served[name]["description"], served[name]["got"]
    for site, info in description.sites.items():
        if not site.startswith("blocks."):
            continue
        tokens = info.get("prefix_token_count", 0) + info["grid_height"] * info["grid_width"]
        axis = 2 if site.endswith("attn.probs") else 1
        if info["layout"] != "SITE_LAYOUT_WINDOW_ATTENTION":
            assert got[site].shape[axis] == tokens, site


def test_prefix_tokens_and_grids_follow_the_model(served: dict[str, Any]) -> None:
    """ConViT's class token enters at local_up_to_layer; PiT's and Swin's grids shrink by stage."""

    def per_block(name: str, key: str) -> list[Any]:
        sites = served[name]["description"].sites
        blocks = served[name]["description"].block_count
        return [sites[f"blocks.{i}.out"].get(key, 0) for i in range(blocks)]

    assert per_block("convit", "prefix_token_count") == [0, 0, 1]
    assert per_block("pit", "grid_height") == [7, 4, 4, 2]
    assert per_block("pit", "prefix_token_count") == [1, 1, 1, 1]
    assert per_block("coat", "grid_height") == [16, 8, 4, 2]
    assert per_block("twins", "prefix_token_count") == [0] * 6


def _besides_heads(sites: dict[str, str]) -> dict[str, str]:
    return {site: reason for site, reason in sites.items() if not site.endswith("attn.heads")}


def test_unavailable_sites_say_why(served: dict[str, Any]) -> None:
    coat = _besides_heads(served["coat"]["description"].unavailable_sites)
    assert set(coat) == {f"blocks.{i}.attn.probs" for i in range(4)}
    assert all("no explicit probabilities" in reason for reason in coat.values())
    for name in ("vit", "deit", "swin", "convit", "pit", "twins"):
        assert _besides_heads(served[name]["description"].unavailable_sites) == {}, name
    # Heads exist wherever the probabilities are global; windowed attention refuses them.
    for name in ("vit", "deit", "convit", "pit"):
        assert served[name]["description"].unavailable_sites == {}, name
    swin = served["swin"]["description"].unavailable_sites
    assert swin and all("windowed" in swin[site] for site in swin)


def test_an_unavailable_site_is_refused_by_name(family_client: Client) -> None:
    pixels = np.zeros((3, 64, 64), dtype=np.float32)
    with pytest.raises(FailedPreconditionError, match=r"blocks\.1\.attn\.probs.*coat"):
        family_client.activations([pixels], ["blocks.1.attn.probs"], model="coat")
    result = family_client.activations([pixels], ["serial_blocks2.0.factoratt_crpe"], model="coat")
    assert result["serial_blocks2.0.factoratt_crpe"].shape == (1, 1 + 8 * 8, 32)


@pytest.mark.parametrize("name", FAMILIES)
def test_patch_maps_are_on_the_sites_own_grid(
    family_client: Client, served: dict[str, Any], name: str
) -> None:
    family = served[name]
    last = family["description"].block_count - 1
    site = f"blocks.{last}.mlp.hidden"
    info = family["description"].sites[site]
    rows, cols, prefix = info["grid_height"], info["grid_width"], info.get("prefix_token_count", 0)
    result = family_client.activations(
        list(family["pixels"].numpy()), [site], model=name, reduction="patch_map", channels=[0, 5]
    )
    hidden = family["reference"][site][:, prefix:, [0, 5]]
    expected = hidden.transpose(0, 2, 1).reshape(BATCH, 2, rows, cols)
    np.testing.assert_allclose(result[site], expected, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_feature_images_and_top_images_on_mlp_hidden(
    family_client: Client, served: dict[str, Any], name: str
) -> None:
    family = served[name]
    last = family["description"].block_count - 1
    site = f"blocks.{last}.mlp.hidden"
    optimized = family_client.optimize_features([(site, 1)], model=name, steps=2, copies=2, seed=1)
    (feature,) = optimized.features
    assert feature.image.size == tuple(family["description"].input_size[1:])
    assert np.isfinite(feature.objective)
    top = family_client.top_activating_images(
        site, [1, 2], images=list(family["pixels"].numpy()), top_k=1, model=name
    )
    prefix = family["description"].sites[site].get("prefix_token_count", 0)
    scores = family["reference"][site][:, prefix:].mean(axis=1)
    for channel in (1, 2):
        (hit,) = top.channels[channel]
        assert hit.index == int(np.argmax(scores[:, channel]))
        assert hit.score == pytest.approx(float(scores[:, channel].max()), rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("name", HIERARCHICAL)
def test_class_space_reads_the_last_stage_and_learned_inversion_refuses(
    family_client: Client, served: dict[str, Any], name: str
) -> None:
    """The classifier reads the last stage: its blocks are projected (their numbers are
    checked in test_class_space_families.py), earlier ones are refused by name."""
    pixels = list(served[name]["pixels"].numpy()[:1])
    description = served[name]["description"]
    last = description.block_count - 1
    projected = family_client.project(pixels, model=name, top_k=1).parameters["blocks"]
    assert projected == list(range(projected[0], last + 1))
    assert family_client.project_memories(last, model=name, top_k=1).memories
    if projected[0] > 0:
        with pytest.raises(InvalidArgumentError, match=f"allowed {projected[0]}..{last}"):
            family_client.project(pixels, model=name, blocks=[0])
    with pytest.raises(FailedPreconditionError, match=f"model {name}: learned inversion"):
        family_client.invert(pixels, [1], model=name)
    inverted = family_client.invert(pixels, [1], model=name, method="optimization", steps=1)
    assert set(inverted.reconstructions) == {1}
