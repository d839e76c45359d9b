"""Intervene against independent computations: plain forwards of freshly built models,
edited by hand (weights zeroed in a copy, a steering vector through the head)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import open_clip
import pytest
import timm
import torch
from support.servers import TEST_MODELS, start
from support.waiting import sample, wait_until

from vitscope import Client
from vitscope import interventions as iv
from vitscope.client import image_message
from vitscope.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    from_rpc_error,
)
from vitscope.v1 import common_pb2, inspector_pb2_grpc, interventions_pb2
from vitscope_server.transport.app import RunningServer

GAP = {
    "name": "gap",
    "family": "timm",
    "architecture": "vit_tiny_patch16_224",
    "seed": 7,
    "kwargs": {
        "img_size": 32,
        "depth": 2,
        "embed_dim": 48,
        "num_heads": 3,
        "num_classes": 6,
        "global_pool": "avg",
        "class_token": False,
        "fc_norm": True,
        "init_values": 0.5,
    },
}
MODELS = [next(m for m in TEST_MODELS if m["name"] == n) for n in ("vit", "clip", "swin")] + [GAP]
# Per model: the attention module of block i and its output projection's name, and the
# LayerScale after it.
ATTENTION = {
    "vit": ("blocks.{i}.attn", "proj", "blocks.{i}.ls1"),
    "gap": ("blocks.{i}.attn", "proj", "blocks.{i}.ls1"),
    "clip": ("transformer.resblocks.{i}.attn", "out_proj", "transformer.resblocks.{i}.ls_1"),
}


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    folder = tmp_path_factory.mktemp("interventions")
    served = start(folder, MODELS, default_model="vit", request_memory_bytes=24 << 20)
    yield served
    served.stop(0)


@pytest.fixture(scope="module")
def client(running: RunningServer) -> Iterator[Client]:
    with Client(f"127.0.0.1:{running.port}", timeout=120) as c:
        yield c


def build(name: str) -> torch.nn.Module:
    """The model the server serves, built afresh with the same seed: its image tower."""
    spec = next(m for m in MODELS if m["name"] == name)
    torch.manual_seed(int(spec["seed"]))  # type: ignore[call-overload]
    kwargs: dict[str, Any] = dict(spec.get("kwargs", {}))  # type: ignore[call-overload]
    if spec["family"] == "timm":
        return timm.create_model(str(spec["architecture"]), pretrained=False, **kwargs).eval()
    return open_clip.create_model(
        str(spec["architecture"]), pretrained=None, **kwargs
    ).visual.eval()


def forward(model: torch.nn.Module, pixels: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        output = model(pixels)
    return (output[0] if isinstance(output, tuple) else output).numpy()


def images(client: Client, name: str, count: int, seed: int) -> torch.Tensor:
    size = client.describe(name).input_size
    return torch.randn((count, *size), generator=torch.Generator().manual_seed(seed))


def arrays(pixels: torch.Tensor) -> list[np.ndarray]:
    return list(pixels.numpy())


@pytest.mark.parametrize("name", ["vit", "gap", "clip"])
def test_heads_sum_to_attn_out_on_a_plain_hook(client: Client, name: str) -> None:
    pixels = images(client, name, 2, 0)
    attention, projection, scale = ATTENTION[name]
    model = build(name)
    expected: dict[str, torch.Tensor] = {}
    module = model.get_submodule(scale.format(i=1))
    handle = module.register_forward_hook(lambda m, a, o: expected.__setitem__("out", o))
    forward(model, pixels)
    handle.remove()
    got = client.activations(arrays(pixels), ["blocks.1.attn.heads"], model=name)
    heads = got["blocks.1.attn.heads"]
    bias = model.get_submodule(f"{attention.format(i=1)}.{projection}").bias.detach()
    gamma = getattr(module, "gamma", torch.ones_like(bias)).detach()
    assert heads.shape[:2] == tuple(expected["out"].shape[:2]) and heads.shape[3] == bias.shape[0]
    total = heads.sum(axis=2) + (bias * gamma).numpy()
    np.testing.assert_allclose(total, expected["out"].numpy(), rtol=1e-5, atol=1e-5)


def _identity_variants(width: int) -> list[Any]:
    return [
        iv.variant([], "empty"),
        iv.variant([iv.edit("blocks.0.out", "scale", factor=1.0)], "scale 1"),
        iv.variant([iv.edit("blocks.1.out", "add", alpha=0.0, direction=np.ones(width))], "add 0"),
        iv.variant([iv.edit("blocks.0.out", "patch")], "patch from itself"),
    ]


@pytest.mark.parametrize("name", ["vit", "gap", "clip"])
def test_identity_edits_are_bit_identical_to_the_plain_forward(client: Client, name: str) -> None:
    """timm models: the logits, bit for bit. open_clip towers: every site up to the final
    norm bit for bit; their output projection is one product over all the batch's rows,
    whose last bits change with the batch size, so the outputs agree to float rounding."""
    pixels = images(client, name, 2, 1)
    width = client.describe(name).embed_dim
    result = client.intervene(
        arrays(pixels),
        _identity_variants(width),
        model=name,
        source_images=arrays(pixels),
        logits=True,
        sites=["final"],
    )
    model = build(name)
    final: dict[str, torch.Tensor] = {}
    norm = model.ln_post if name == "clip" else model.norm
    handle = norm.register_forward_hook(lambda m, a, o: final.__setitem__("final", o))
    plain = forward(model, pixels)
    handle.remove()
    for outcome in result.variants:
        assert outcome.logits is not None
        np.testing.assert_array_equal(outcome.sites["final"], final["final"].numpy(), outcome.label)
        if name == "clip":
            np.testing.assert_allclose(outcome.logits, plain, rtol=0, atol=1e-6)
        else:
            np.testing.assert_array_equal(outcome.logits, plain, err_msg=outcome.label)


@pytest.mark.parametrize("name", ["vit", "gap", "clip"])
def test_patching_every_token_reproduces_the_source(client: Client, name: str) -> None:
    base, source = images(client, name, 2, 2), images(client, name, 2, 3)
    classifier = name != "clip"
    result = client.intervene(
        arrays(base),
        [iv.variant([iv.edit("blocks.0.out", "patch")])],
        model=name,
        source_images=arrays(source),
        logits=True,
        **({"metric": "logit_difference", "target": 0, "other": 1} if classifier else {}),
    )
    (outcome,) = result.variants
    expected = forward(build(name), source)
    if classifier:
        np.testing.assert_array_equal(outcome.logits, expected)
    else:  # the output projection's last bits depend on the batch size (see above)
        np.testing.assert_allclose(outcome.logits, expected, rtol=0, atol=1e-6)
    if classifier:
        np.testing.assert_allclose(outcome.normalized, 1.0, rtol=1e-5)


@pytest.mark.parametrize("name", ["vit", "clip"])
def test_steering_after_the_final_norm_moves_the_output_along_the_head(
    client: Client, name: str
) -> None:
    pixels = images(client, name, 2, 4)
    model = build(name)
    width = client.describe(name).embed_dim
    direction = torch.randn(width, generator=torch.Generator().manual_seed(5))
    alpha = 0.75
    result = client.intervene(
        arrays(pixels),
        [iv.variant([iv.edit("final", "add", alpha=alpha, direction=direction.numpy())])],
        model=name,
        logits=True,
    )
    head = model.head.weight if name == "vit" else model.proj.T
    expected = forward(model, pixels) + (alpha * head @ direction).detach().numpy()
    np.testing.assert_allclose(result.variants[0].logits, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["vit", "gap", "clip"])
def test_zeroing_a_head_equals_zeroing_its_projection_columns(client: Client, name: str) -> None:
    pixels = images(client, name, 2, 6)
    attention, projection, _ = ATTENTION[name]
    model = build(name)
    edited = copy.deepcopy(model)
    module = edited.get_submodule(attention.format(i=1))
    head_dim = module.get_submodule(projection).weight.shape[1] // module.num_heads
    with torch.no_grad():
        module.get_submodule(projection).weight[:, head_dim : 2 * head_dim] = 0
    result = client.intervene(
        arrays(pixels),
        [iv.variant([iv.edit("blocks.1.attn.heads", "zero", heads=[1])])],
        model=name,
        logits=True,
    )
    np.testing.assert_allclose(
        result.variants[0].logits, forward(edited, pixels), rtol=1e-4, atol=2e-5
    )
    assert not np.allclose(result.variants[0].logits, forward(model, pixels), atol=1e-6)


@pytest.mark.parametrize("name", ["vit", "gap"])
def test_variants_in_one_call_equal_separate_calls(client: Client, name: str) -> None:
    pixels, source = images(client, name, 2, 7), images(client, name, 2, 8)
    variants = [
        iv.variant([iv.edit("blocks.1.attn.heads", "zero", heads=[0])]),
        iv.variant([iv.edit("blocks.0.out", "patch", tokens="positions", positions=[(0, 1)])]),
        iv.variant(
            [
                iv.edit("blocks.0.mlp.hidden", "scale", factor=0.5, channels=[0, 3]),
                iv.edit("blocks.1.out", "set", value=0.25, tokens="indices", indices=[0]),
            ]
        ),
    ]
    options: dict[str, Any] = {"model": name, "source_images": arrays(source), "logits": True}
    together = client.intervene(arrays(pixels), variants, **options)
    for i, v in enumerate(variants):
        alone = client.intervene(arrays(pixels), [v], **options).variants[0]
        np.testing.assert_allclose(together.variants[i].logits, alone.logits, rtol=0, atol=1e-6)
        np.testing.assert_allclose(together.variants[i].metric, alone.metric, rtol=0, atol=1e-6)


def test_a_later_edit_sees_an_earlier_one(client: Client) -> None:
    """Zeroing the residual after block 0 and reading block 1's input-dependent output
    equals running the blocks on zeros by hand."""
    pixels = images(client, "vit", 1, 9)
    result = client.intervene(
        arrays(pixels),
        [iv.variant([iv.edit("blocks.0.out", "zero")])],
        sites=["blocks.1.out"],
    )
    model = build("vit")
    with torch.inference_mode():
        zeros = torch.zeros(result.variants[0].sites["blocks.1.out"].shape)
        expected = model.blocks[1](zeros)
    np.testing.assert_allclose(
        result.variants[0].sites["blocks.1.out"], expected.numpy(), rtol=1e-5, atol=1e-5
    )


def test_patching_sweep_is_shaped_like_blocks_by_grid(client: Client) -> None:
    base, source = images(client, "gap", 1, 10), images(client, "gap", 1, 11)
    seen: list[iv.Progress] = []
    result = client.patching_sweep(
        arrays(base),
        arrays(source),
        model="gap",
        target=0,
        other=1,
        on_progress=seen.append,
        variants_per_forward=3,
    )
    shape = (2, *client.describe("gap").grid)
    assert result.sweep_shape == shape and result.values is not None
    assert result.values.shape == (1, *shape) and result.normalized is not None
    assert seen[-1].completed == seen[-1].total == int(np.prod(shape))
    # The partial results streamed with the progress are the final result's.
    assert [p.indices for p in seen] == [
        list(range(i, min(i + 3, seen[-1].total))) for i in range(0, seen[-1].total, 3)
    ]
    streamed = np.concatenate([p.values for p in seen if p.values is not None])
    np.testing.assert_array_equal(streamed.T.reshape(1, *shape), result.values)
    # A lone patch of a GAP model's last block moves the logits by that token's share alone.
    one = client.intervene(
        arrays(base),
        [iv.variant([iv.edit("blocks.1.out", "patch", tokens="positions", positions=[(1, 0)])])],
        model="gap",
        source_images=arrays(source),
        target=0,
        other=1,
    )
    np.testing.assert_allclose(result.values[0, 1, 1, 0], one.variants[0].metric[0], atol=1e-5)


def test_head_sweep_matches_single_head_ablations(client: Client) -> None:
    pixels = images(client, "vit", 2, 12)
    result = client.head_sweep(arrays(pixels), metric="kl")
    assert result.sweep_axes == ("block", "head") and result.values is not None
    description = client.describe("vit")
    heads = int(description.sites["blocks.0.attn.heads"]["shape"][2])
    assert result.values.shape == (2, description.block_count, heads)
    single = client.intervene(
        arrays(pixels),
        [iv.variant([iv.edit("blocks.2.attn.heads", "zero", heads=[1])])],
        metric="kl",
    )
    np.testing.assert_allclose(result.values[:, 2, 1], single.variants[0].metric, atol=1e-6)


def test_windowed_heads_are_refused_with_the_cause(client: Client) -> None:
    pixels = images(client, "swin", 1, 13)
    with pytest.raises(FailedPreconditionError, match="windowed"):
        client.intervene(
            arrays(pixels), [iv.variant([iv.edit("blocks.0.attn.heads", "zero")])], model="swin"
        )
    with pytest.raises(FailedPreconditionError, match="windowed"):
        client.head_sweep(arrays(pixels), model="swin")


def test_bad_edits_name_their_field(client: Client) -> None:
    pixels = arrays(images(client, "vit", 1, 14))
    with pytest.raises(NotFoundError) as missing:
        client.intervene(pixels, [iv.variant([iv.edit("blocks.99.out", "zero")])])
    assert "variants[0].edits[0].site" in str(missing.value)
    with pytest.raises(InvalidArgumentError) as out_of_range:
        client.intervene(
            pixels,
            [iv.variant([]), iv.variant([iv.edit("blocks.1.attn.heads", "zero", heads=[9])])],
        )
    fields = [v.field for v in out_of_range.value.field_violations]
    assert fields == ["variants[1].edits[0].selection.heads[0]"]
    with pytest.raises(InvalidArgumentError, match="source_images"):
        client.intervene(pixels, [iv.variant([iv.edit("blocks.1.out", "patch")])])
    wrong = np.zeros((3, 5, 5), dtype=np.float32)
    with pytest.raises(InvalidArgumentError, match=r"source_images\[0\]"):
        patch = iv.variant([iv.edit("blocks.1.out", "patch")])
        client.intervene(pixels, [patch], source_images=[wrong])
    with pytest.raises(InvalidArgumentError, match="add or set at"):
        client.intervene(pixels, [iv.variant([iv.edit("blocks.1.attn.heads", "set")])])


def test_a_sweep_over_the_memory_budget_is_refused_before_any_forward(client: Client) -> None:
    many = arrays(images(client, "vit", 64, 15))
    with pytest.raises(ResourceExhaustedError) as refused:
        client.patching_sweep(many, many[:1], target=0, other=1)
    assert "images" in str(refused.value)


@pytest.mark.parametrize("name", ["vit", "gap", "clip"])
def test_variants_share_the_blocks_before_their_first_edit_bit_for_bit(
    client: Client, name: str
) -> None:
    """Variants that edit from block 1 on run block 0 once for the batch; each equals its
    own forward of every block."""
    pixels = images(client, name, 2, 16)
    variants = [
        iv.variant([], "empty"),
        iv.variant([iv.edit("blocks.1.out", "scale", factor=1.0)], "scale 1"),
        iv.variant([iv.edit("blocks.1.attn.heads", "zero", heads=[0])], "zero a head"),
    ]
    options: dict[str, Any] = {"model": name, "logits": True, "sites": ["final"]}
    shared = client.intervene(arrays(pixels), variants, **options)
    alone = client.intervene(arrays(pixels), variants, variants_per_forward=1, **options)
    assert (shared.variants_per_forward, alone.variants_per_forward) == (3, 1)
    for together, single in zip(shared.variants, alone.variants, strict=True):
        np.testing.assert_array_equal(together.sites["final"], single.sites["final"])
        if name != "clip":  # see test_identity_edits_are_bit_identical_to_the_plain_forward
            np.testing.assert_array_equal(together.logits, single.logits, err_msg=together.label)
    plain = forward(build(name), pixels)
    np.testing.assert_allclose(shared.variants[1].logits, plain, rtol=0, atol=1e-6)


def test_mean_and_set_edits_equal_hand_written_hooks(client: Client) -> None:
    """Mean ablation of blocks.1.mlp.out over reference images, then channels 2 and 5 of the
    class token after block 2 set to 0.5, against the same edits written as plain hooks."""
    pixels, reference = images(client, "vit", 2, 17), images(client, "vit", 3, 18)
    result = client.intervene(
        arrays(pixels),
        [
            iv.variant(
                [
                    iv.edit("blocks.1.mlp.out", "mean"),
                    iv.edit("blocks.2.out", "set", value=0.5, tokens="prefix", channels=[2, 5]),
                ]
            )
        ],
        reference_images=arrays(reference),
        logits=True,
    )
    model = build("vit")
    kept: dict[str, torch.Tensor] = {}
    handle = model.blocks[1].mlp.register_forward_hook(lambda m, a, o: kept.__setitem__("m", o))
    forward(model, reference)
    handle.remove()
    mean = kept["m"].mean(dim=0, keepdim=True)

    def set_channels(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
        edited = output.clone()
        edited[:, 0, [2, 5]] = 0.5
        return edited

    handles = [
        model.blocks[1].mlp.register_forward_hook(lambda m, a, o: mean.expand_as(o)),
        model.blocks[2].register_forward_hook(set_channels),
    ]
    expected = forward(model, pixels)
    for h in handles:
        h.remove()
    np.testing.assert_allclose(result.variants[0].logits, expected, rtol=1e-5, atol=1e-6)


def test_sites_after_the_edits_take_the_usual_selection_and_reductions(client: Client) -> None:
    pixels = arrays(images(client, "vit", 2, 19))
    variants = [iv.variant([iv.edit("blocks.0.out", "scale", factor=0.5, tokens="prefix")])]
    whole = client.intervene(pixels, variants, sites=["blocks.1.out"]).variants[0]
    reduced = client.intervene(
        pixels, variants, sites=["blocks.1.out"], tokens="patches", reduction="mean"
    ).variants[0]
    prefix = client.describe("vit").prefix_token_count
    expected = whole.sites["blocks.1.out"][:, prefix:].mean(axis=1)
    np.testing.assert_allclose(reduced.sites["blocks.1.out"], expected, rtol=1e-5, atol=1e-6)
    top = client.intervene(
        pixels, variants, sites=["blocks.1.out"], reduction="top_channels", top_channels=3
    ).variants[0]
    found = top.site_tensors["blocks.1.out"]
    chosen = np.sort(found["channel_indices"], axis=1)
    best = np.sort(np.argsort(-expected, axis=1)[:, :3], axis=1)
    np.testing.assert_array_equal(chosen, best)
    with pytest.raises(InvalidArgumentError, match=r"outputs\.top_channels"):
        client.intervene(pixels, variants, sites=["blocks.1.out"], reduction="top_channels")


def test_read_outs_are_checked_before_any_forward_under_the_outputs_fields(
    client: Client, running: RunningServer
) -> None:
    pixels = arrays(images(client, "vit", 1, 21))
    variants = [iv.variant([iv.edit("blocks.0.out", "zero", tokens="prefix")])]
    width = client.describe("vit").embed_dim
    model = running.registry.get("vit").adapter.root
    forwards: list[int] = []
    handle = model.register_forward_hook(lambda m, a, o: forwards.append(1))
    try:
        refusals = {
            "outputs.channels": {"reduction": "patch_map", "channels": [width + 3]},
            "outputs.top_channels": {"reduction": "top_channels", "top_channels": width + 1},
        }
        for field, outputs in refusals.items():
            with pytest.raises(InvalidArgumentError) as refused:
                client.intervene(pixels, variants, sites=["blocks.1.out"], **outputs)
            (violation,) = refused.value.field_violations
            assert violation.field.startswith(field), violation.field
    finally:
        handle.remove()
    assert forwards == []


def test_a_cancelled_sweep_stops_its_forwards(client: Client, running: RunningServer) -> None:
    pixels = images(client, "vit", 1, 20)
    model = running.registry.get("vit").adapter.root
    forwards: list[int] = []
    handle = model.register_forward_hook(lambda m, a, o: forwards.append(1))
    request = interventions_pb2.InterveneRequest(
        model="vit",
        images=[image_message(pixels[0].numpy())],
        source_images=[image_message(pixels[0].numpy())],
        sweep=interventions_pb2.Sweep(kind=interventions_pb2.SWEEP_KIND_PATCH_POSITIONS),
        variants_per_forward=1,
    )

    def ended() -> bool:
        return sample(running, "vitscope_requests_in_flight", method="Intervene") == 0

    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            call = inspector_pb2_grpc.InspectorStub(channel).Intervene(request, timeout=120)
            header = next(call).header
            assert next(call).WhichOneof("payload") == "progress"
            call.cancel()
            wait_until(ended, "the cancelled sweep to end")
        # Two forwards before the variants (base, source), then one per variant run.
        assert len(forwards) - 2 < header.variant_count
    finally:
        handle.remove()


def test_an_empty_class_in_the_outputs_is_refused_by_its_index(
    client: Client, running: RunningServer
) -> None:
    """A listed class without index or name would shift every later column of class_logits."""
    pixels = images(client, "vit", 1, 22)
    request = interventions_pb2.InterveneRequest(
        model="vit",
        images=[image_message(pixels[0].numpy())],
        variants=[iv.variant([iv.edit("blocks.0.out", "zero", tokens="prefix")])],
        outputs=interventions_pb2.InterventionOutputs(
            classes=[
                common_pb2.ClassRef(index=1),
                common_pb2.ClassRef(),
                common_pb2.ClassRef(index=2),
            ]
        ),
    )
    with (
        grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel,
        pytest.raises(grpc.RpcError) as refused,
    ):
        list(inspector_pb2_grpc.InspectorStub(channel).Intervene(request, timeout=60))
    error = from_rpc_error(refused.value)
    assert isinstance(error, InvalidArgumentError)
    assert [v.field for v in error.field_violations] == ["outputs.classes[1]"]
