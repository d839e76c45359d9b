"""ProjectToClassSpace and ProjectMemories over a real channel, against independent computations."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from support.reference_projection import (
    clip_importance,
    clip_parts,
    clip_scores,
    clip_text,
    ranks_by_sorting,
    timm_importance,
    timm_parts,
    timm_scores,
)
from support.servers import CLIP_WITH_TEXT, DEVICE, TEST_MODELS, start
from support.waiting import sample, wait_until

from vitscope import (
    Client,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    ResourceExhaustedError,
    VitscopeError,
)
from vitscope.cli import main
from vitscope.projection import ClassProjection
from vitscope_server.builtin.digits_data import digits_split
from vitscope_server.core.model.adapters.capabilities import Missing
from vitscope_server.core.model.class_space import TEXT_EMBEDDINGS
from vitscope_server.core.model.loading import load_model
from vitscope_server.core.model.specs import ModelSpec
from vitscope_server.core.projection import project
from vitscope_server.settings import ServerSettings
from vitscope_server.transport.app import RunningServer, create_server

# Reference scores are computed on the CPU; a GPU's kernels round differently, so on one
# scores agree to this and classes this close to the target may swap ranks with it.
SCORE_ATOL = 2e-5 if DEVICE == "cuda" else 0.0

MODELS: list[dict[str, object]] = [
    # The shared test models, and the variants projection needs besides.
    *(m for m in TEST_MODELS if m["name"] in ("vit", "deit", "swin")),
    {
        "name": "gap",
        "family": "timm",
        "architecture": "test_vit",
        "seed": 6,
        "kwargs": {"global_pool": "avg", "class_token": False, "num_classes": 30},
    },
    {
        "name": "gapcls",
        "family": "timm",
        "architecture": "test_vit",
        "seed": 9,
        "kwargs": {"global_pool": "avg", "num_classes": 10},
    },
    {
        "name": "scaled",
        "family": "timm",
        "architecture": "test_vit",
        "seed": 8,
        "kwargs": {"init_values": 0.5, "scale_attn_norm": True, "num_classes": 20},
    },
    CLIP_WITH_TEXT,
]
EVALUATE = {"importance_maps": True, "evaluate_importance": True}
REPRESENTATION_PARTS = {"residual": "out", "attention": "attn", "mlp": "mlp"}
NAMES = ["cat", "dog", "tabby cat", "goldfish", "fire truck", "teapot"]
TEMPLATES = ["a photo of a {}.", "a drawing of the {}."]


def build(name: str) -> torch.nn.Module:
    s = next(m for m in MODELS if m["name"] == name)
    torch.manual_seed(int(s["seed"]))  # type: ignore[call-overload]
    kwargs = dict(s.get("kwargs", {}))  # type: ignore[call-overload]
    if s["family"] == "timm":
        return timm.create_model(str(s["architecture"]), pretrained=False, **kwargs).eval()
    return open_clip.create_model(str(s["architecture"]), pretrained=None, **kwargs).eval()


@pytest.fixture(scope="module")
def projection_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    folder = tmp_path_factory.mktemp("projection")
    models_file = folder / "models.yaml"
    models_file.write_text(yaml.safe_dump({"models": MODELS}))
    settings = ServerSettings(
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        models_file=models_file,
        default_model="vit",
        device=DEVICE,
    )
    running = create_server(settings)
    assert running.registry.wait_until_settled(timeout=120)
    yield running
    running.stop(0)


@pytest.fixture(scope="module")
def pc(projection_server: RunningServer) -> Iterator[Client]:
    with Client(f"127.0.0.1:{projection_server.port}", timeout=120) as c:
        yield c


def pixels_for(client: Client, name: str, batch: int = 2, seed: int = 7) -> torch.Tensor:
    size = client.describe(name).input_size
    return torch.randn((batch, *size), generator=torch.Generator().manual_seed(seed))


def near_ties(scores: np.ndarray, target: int) -> np.ndarray:
    """Per token, the classes whose reference score is within SCORE_ATOL of the target's: on a
    GPU their order against the target may flip (exactly zero on the CPU)."""
    own = scores[..., target : target + 1]
    return (np.abs(scores - own) <= SCORE_ATOL).sum(axis=-1) - 1


def check_tokens(
    result: ClassProjection, expected: dict[str, list[np.ndarray]], targets: np.ndarray
) -> None:
    """Per representation, expected[rep][block] is [B, T, C] scores from the reference."""
    num_classes = len(result.class_names)
    for rep, per_block in expected.items():
        scores = np.stack(per_block, axis=1)  # [B, blocks, T, C]
        for i, image in enumerate(result.images):
            got = image.representations[rep]
            ranks = ranks_by_sorting(scores[i], np.full(scores.shape[1], targets[i]))
            slack = near_ties(scores[i], int(targets[i]))
            assert (np.abs(got.target_ranks - ranks) <= slack).all(), rep
            np.testing.assert_allclose(
                got.identifiability, 1 - got.target_ranks / num_classes, atol=1e-6
            )
            order = np.argsort(-scores[i], axis=-1)[..., :5]
            top = np.take_along_axis(scores[i], order, -1)
            if SCORE_ATOL == 0:
                np.testing.assert_array_equal(got.top_classes, order, err_msg=rep)
            chosen = np.take_along_axis(scores[i], got.top_classes.astype(np.int64), -1)
            np.testing.assert_allclose(chosen, top, atol=max(SCORE_ATOL, 1e-7), err_msg=rep)
            np.testing.assert_allclose(got.top_scores, top, atol=2e-5, rtol=1e-5)


def check_summaries(
    result: ClassProjection,
    residual: list[np.ndarray],
    attention: list[np.ndarray],
    mlp: list[np.ndarray],
    targets: np.ndarray,
    prefix: int,
) -> None:
    """residual[0] is the embedding's scores, residual[b + 1] block b's; all [B, T, C]."""
    batch = len(targets)
    rows = np.arange(batch)
    identifiable_any = []
    for b in range(len(attention)):
        before, after = residual[b][:, prefix:], residual[b + 1][:, prefix:]
        a, m = attention[b][:, prefix:], mlp[b][:, prefix:]
        t_before, t_after = before[rows, :, targets], after[rows, :, targets]
        ranks = (after > after[rows, :, targets][..., None]).sum(-1)
        top_after = after.argmax(-1)
        from_input = top_after == before.argmax(-1)
        from_attention = top_after == a.argmax(-1)
        from_mlp = top_after == m.argmax(-1)
        for i, image in enumerate(result.images):
            got = image.blocks[b]
            assert got["block"] == b
            assert got["identifiable_patch_percent"] == pytest.approx(
                100 * (ranks[i] == 0).mean(), abs=1e-4
            )
            if prefix:
                cls = residual[b + 1][i, 0]
                assert got["cls_rank"] == int((cls > cls[targets[i]]).sum())
            else:
                assert got["cls_rank"] == -1
            assert got["block_change_rate"] == pytest.approx(
                (t_after[i] > t_before[i]).mean(), abs=1e-6
            )
            assert got["attention_change_rate"] == pytest.approx(
                (a[i, :, targets[i]] > t_before[i]).mean(), abs=1e-6
            )
            assert got["mlp_change_rate"] == pytest.approx(
                (m[i, :, targets[i]] > t_before[i]).mean(), abs=1e-6
            )
            assert got["composition_input"] == pytest.approx(from_input[i].mean(), abs=1e-6)
            assert got["composition_attention"] == pytest.approx(from_attention[i].mean(), abs=1e-6)
            assert got["composition_mlp"] == pytest.approx(from_mlp[i].mean(), abs=1e-6)
            none = ~(from_input[i] | from_attention[i] | from_mlp[i])
            assert got["composition_none"] == pytest.approx(none.mean(), abs=1e-6)
        dataset = result.dataset[b]
        assert dataset["mean_identifiable_patch_percent"] == pytest.approx(
            100 * (ranks == 0).mean(), abs=1e-4
        )
        assert dataset["mean_identifiability"] == pytest.approx(
            (1 - ranks / after.shape[-1]).mean(), abs=1e-5
        )
        identifiable_any.append(100 * (ranks == 0).any(axis=1).mean())
        assert dataset["images_with_identifiable_percent"] == pytest.approx(identifiable_any[-1])


@pytest.mark.parametrize("name", ["vit", "gap", "deit"])
def test_timm_projection_matches_head_of_norm(pc: Client, name: str) -> None:
    pixels = pixels_for(pc, name)
    model = build(name)
    parts = timm_parts(model, pixels)
    predicted = parts["logits"].argmax(-1).numpy()
    targets = np.array([3, predicted[1]])
    result = pc.project(list(pixels.numpy()), model=name, targets=[3, None])
    assert [i.target_index for i in result.images] == list(targets)
    assert [i.target_is_prediction for i in result.images] == [False, True]
    assert result.images[1].prediction["class_index"] == predicted[1]
    probabilities = parts["logits"].double().softmax(-1).numpy()
    for i, image in enumerate(result.images):
        assert image.prediction["class_index"] == predicted[i]
        logit = float(parts["logits"][i, predicted[i]])
        assert image.prediction["logit"] == pytest.approx(logit, rel=1e-5, abs=1e-5)
        probability = probabilities[i, predicted[i]]
        assert image.prediction["probability"] == pytest.approx(probability, rel=1e-4)
    blocks = range(len(model.blocks))
    scores = {
        rep: [timm_scores(model, parts, part, b) for b in blocks]
        for rep, part in REPRESENTATION_PARTS.items()
    }
    check_tokens(result, scores, targets)
    with torch.no_grad():
        embed = model.head(model.fc_norm(model.norm(parts["in.0"]))).numpy()
    prefix = model.num_prefix_tokens
    check_summaries(
        result, [embed, *scores["residual"]], scores["attention"], scores["mlp"], targets, prefix
    )
    assert result.parameters["blocks"] == list(blocks)
    assert result.provenance["model"] == name


def test_distilled_deit_projects_every_token_with_head(pc: Client) -> None:
    """Both prefix tokens (class and distillation) go through `head`, not `head_dist`."""
    model = build("deit")
    pixels = pixels_for(pc, "deit", batch=1)
    parts = timm_parts(model, pixels)
    result = pc.project(list(pixels.numpy()), model="deit", tokens="prefix", blocks=[1], top_k=7)
    with torch.no_grad():
        logits = model.head(model.norm(parts["out.1"][:, :2]))
    got = result.images[0].representations["residual"]
    order = logits.argsort(dim=-1, descending=True)
    np.testing.assert_array_equal(got.top_classes[0], order[0].numpy())
    assert result.prefix_token_count == 2


def test_token_and_block_selection(pc: Client) -> None:
    model = build("vit")
    pixels = pixels_for(pc, "vit", batch=1)
    parts = timm_parts(model, pixels)
    result = pc.project(
        list(pixels.numpy()),
        model="vit",
        blocks=[4, 1],
        representations=["mlp"],
        tokens="positions",
        positions=[(0, 0), (9, 9)],
        top_k=3,
    )
    image = result.images[0]
    assert list(image.representations) == ["mlp"]
    assert result.parameters["blocks"] == [1, 4]
    assert result.parameters["token_indices"] == [1, 100]
    expected = np.stack([timm_scores(model, parts, "mlp", b)[0, [1, 100]] for b in (1, 4)])
    np.testing.assert_array_equal(
        image.representations["mlp"].top_classes, np.argsort(-expected, -1)[..., :3]
    )
    assert [b["block"] for b in image.blocks] == [1, 4]


def test_clip_projection_uses_ln_post_proj_and_text_embeddings(pc: Client) -> None:
    model = build("clip")
    pixels = pixels_for(pc, "clip")
    parts = clip_parts(model, pixels)
    text = clip_text(model, "ViT-B-32", NAMES, TEMPLATES)
    predicted = (F.normalize(parts["embedding"], dim=-1) @ text.T).argmax(-1).numpy()
    result = pc.project(
        list(pixels.numpy()),
        model="clip",
        targets=["teapot", None],
        class_names=NAMES,
        templates=TEMPLATES,
    )
    targets = np.array([NAMES.index("teapot"), predicted[1]])
    assert result.class_names == NAMES
    assert result.parameters["cosine"] is True
    blocks = range(2)
    scores = {
        rep: [clip_scores(model, text, parts[f"{part}.{b}"]) for b in blocks]
        for rep, part in REPRESENTATION_PARTS.items()
    }
    check_tokens(result, scores, targets)
    embed = clip_scores(model, text, parts["in.0"])
    check_summaries(
        result, [embed, *scores["residual"]], scores["attention"], scores["mlp"], targets, 1
    )


def test_clip_default_labels_are_imagenet(pc: Client) -> None:
    result = pc.project(
        list(pixels_for(pc, "clip", batch=1).numpy()), model="clip", blocks=[1], top_k=1
    )
    assert len(result.class_names) == 1000
    assert result.class_names[0] == open_clip.IMAGENET_CLASSNAMES[0]
    assert len(result.parameters["templates"]) == len(open_clip.OPENAI_IMAGENET_TEMPLATES)


def check_importance(result: ClassProjection, expected: np.ndarray, grid: int, size: int) -> None:
    blocks, heads = expected.shape[1:3]
    for i, image in enumerate(result.images):
        maps = image.importance
        assert maps is not None
        np.testing.assert_allclose(
            maps.per_head,
            expected[i].reshape(blocks, heads, grid, grid),
            atol=max(SCORE_ATOL, 1e-6),
            rtol=1e-4,
        )
        summed = expected[i].sum(axis=(0, 1)).reshape(grid, grid)
        unit = (summed - summed.min()) / (summed.max() - summed.min())
        np.testing.assert_allclose(maps.summed, unit, atol=1e-5)
        upsampled = F.interpolate(
            torch.from_numpy(unit)[None, None],
            size=(size, size),
            mode="bilinear",
            align_corners=False,
        )[0, 0].numpy()
        np.testing.assert_allclose(maps.upsampled, upsampled, atol=1e-5)
        assert Image.open(io.BytesIO(maps.overlay_png)).size == (size, size)


@pytest.mark.parametrize(("name", "grid", "size"), [("vit", 10, 160), ("deit", 4, 64)])
def test_importance_maps_match_autograd(pc: Client, name: str, grid: int, size: int) -> None:
    model = build(name)
    pixels = pixels_for(pc, name)
    result = pc.project(list(pixels.numpy()), model=name, targets=[5, None], importance_maps=True)
    targets = torch.tensor([i.target_index for i in result.images])
    check_importance(result, timm_importance(model, pixels, targets), grid, size)


def test_clip_importance_maps_match_autograd(pc: Client) -> None:
    model = build("clip")
    pixels = pixels_for(pc, "clip")
    result = pc.project(
        list(pixels.numpy()),
        model="clip",
        targets=["dog", None],
        class_names=NAMES,
        templates=TEMPLATES,
        importance_maps=True,
    )
    targets = torch.tensor([i.target_index for i in result.images])
    text = clip_text(model, "ViT-B-32", NAMES, TEMPLATES)
    check_importance(result, clip_importance(model, pixels, targets, text), 4, 32)


def test_clip_memories_use_text_embeddings_through_proj(pc: Client) -> None:
    model = build("clip")
    result = pc.project_memories(1, model="clip", class_names=NAMES, templates=TEMPLATES, top_k=3)
    text = clip_text(model, "ViT-B-32", NAMES, TEMPLATES)
    classes = text @ model.visual.proj.detach().T
    block = model.visual.transformer.resblocks[1]
    for kind, values in (
        ("mlp", block.mlp.c_proj.weight),
        ("attention", block.attn.out_proj.weight),
    ):
        matrix = (classes @ values.detach()).numpy()
        np.testing.assert_array_equal(
            result.memories[kind].top_memories, np.argsort(-matrix, -1)[:, :3]
        )
        np.testing.assert_array_equal(
            result.memories[kind].top_classes, np.argsort(-matrix.T, -1)[:, :3]
        )


@pytest.mark.parametrize("name", ["vit", "scaled"])
def test_memories_are_direct_matrix_products(pc: Client, name: str) -> None:
    """'scaled' has LayerScale (gamma 0.5) and a norm before the attention's output
    projection: value columns reach the residual stream times gamma, and the coefficients
    are what the projection multiplies."""
    model = build(name)
    pixels = pixels_for(pc, name)
    block = 3
    result = pc.project_memories(block, model=name, images=list(pixels.numpy()), targets=[2, None])
    parts = timm_parts(model, pixels)
    head = model.head.weight.detach()
    layer = model.blocks[block]
    gammas = {"mlp": torch.ones(64), "attention": torch.ones(64)}
    if name == "scaled":
        gammas = {"mlp": layer.ls2.gamma.detach(), "attention": layer.ls1.gamma.detach()}
    values = {
        "mlp": gammas["mlp"][:, None] * layer.mlp.fc2.weight.detach(),
        "attention": gammas["attention"][:, None] * layer.attn.proj.weight.detach(),
    }
    coefficients = {"mlp": parts[f"fc1.{block}"], "attention": parts[f"proj_in.{block}"]}
    targets = [2, int(parts["logits"][1].argmax())]
    for kind, value in values.items():
        matrix = (head @ value).numpy()
        got = result.memories[kind]
        assert got.memory_count == value.shape[1]
        np.testing.assert_array_equal(got.top_classes, np.argsort(-matrix.T, -1)[:, :5])
        np.testing.assert_array_equal(got.top_memories, np.argsort(-matrix, -1)[:, :5])
        np.testing.assert_allclose(
            got.top_memory_scores, -np.sort(-matrix, -1)[:, :5], rtol=1e-5, atol=1e-5
        )
        for i, image in enumerate(got.images):
            c = coefficients[kind][i].numpy()
            assert image.target_index == targets[i]
            np.testing.assert_array_equal(image.top_memories, np.argsort(-c, -1)[:, :5])
            np.testing.assert_allclose(
                image.top_coefficients, -np.sort(-c, -1)[:, :5], rtol=1e-5, atol=1e-5
            )
            class_top = set(np.argsort(-matrix[targets[i]])[:5].tolist())
            agree = [bool(set(row.tolist()) & class_top) for row in np.argsort(-c, -1)[:, :5]]
            assert image.agreement_rate == pytest.approx(np.mean(agree), abs=1e-6)
    cosine = pc.project_memories(block, model=name, kinds=["mlp"], cosine=True, top_k=3)
    unit = (F.normalize(head, dim=1) @ F.normalize(values["mlp"], dim=0)).numpy()
    np.testing.assert_array_equal(
        cosine.memories["mlp"].top_classes, np.argsort(-unit.T, -1)[:, :3]
    )
    assert list(cosine.memories) == ["mlp"]


@pytest.mark.parametrize(
    ("kwargs", "error", "expected"),
    [
        # INVALID_ARGUMENT: the field at fault; FAILED_PRECONDITION: the reason.
        ({"model": "vit", "targets": ["no such class", None]}, InvalidArgumentError, "targets[0]"),
        ({"model": "vit", "targets": [1000, None]}, InvalidArgumentError, "targets[0]"),
        ({"model": "vit", "targets": [1]}, InvalidArgumentError, "targets"),
        ({"model": "vit", "blocks": [0, 6]}, InvalidArgumentError, "blocks[1]"),
        ({"model": "vit", "blocks": [2, 2]}, InvalidArgumentError, "blocks[1]"),
        ({"model": "vit", "top_k": 1001}, InvalidArgumentError, "top_k"),
        ({"model": "vit", "class_names": ["a"]}, InvalidArgumentError, "labels"),
        ({"model": "clip", "class_names": []}, InvalidArgumentError, "labels.class_names"),
        ({"model": "clip", "templates": ["a {}"]}, InvalidArgumentError, "labels.class_names"),
        ({"model": "clip", "class_names": ["a", "a"]}, InvalidArgumentError, "labels.class_names"),
        (
            {"model": "clip", "class_names": [f"c{i}" for i in range(10_001)]},
            InvalidArgumentError,
            "labels.class_names",
        ),
        (
            {"model": "clip", "class_names": ["a"], "templates": ["{}"] * 101},
            InvalidArgumentError,
            "labels.templates",
        ),
        ({"model": "clip", "class_names": ["a", "b"], "top_k": 3}, InvalidArgumentError, "top_k"),
        (
            {"model": "clip", "class_names": ["a"], "templates": ["no slot"]},
            InvalidArgumentError,
            "labels.templates",
        ),
        (
            {"model": "clip", "class_names": ["a", "b"], "targets": ["c", None]},
            InvalidArgumentError,
            "targets[0]",
        ),
        # Swin projects its last stage: it has no class token and earlier blocks are narrower.
        ({"model": "swin", "importance_maps": True}, FailedPreconditionError, "MODEL_UNSUPPORTED"),
        ({"model": "swin", "blocks": [0]}, InvalidArgumentError, "blocks"),
        ({"model": "gap", "importance_maps": True}, FailedPreconditionError, "MODEL_UNSUPPORTED"),
        ({"model": "vit", "keep_counts": [1]}, InvalidArgumentError, "keep_counts"),
        (
            {"model": "vit", "evaluate_importance": True},
            InvalidArgumentError,
            "evaluate_importance",
        ),
        (
            {**EVALUATE, "model": "vit", "keep_counts": [0, 101]},
            InvalidArgumentError,
            "keep_counts[1]",
        ),
        ({**EVALUATE, "model": "vit", "keep_counts": [-1]}, InvalidArgumentError, "keep_counts[0]"),
        (
            {**EVALUATE, "model": "vit", "keep_counts": [4, 4]},
            InvalidArgumentError,
            "keep_counts[1]",
        ),
        (
            {**EVALUATE, "model": "vit", "keep_counts": list(range(65))},
            InvalidArgumentError,
            "keep_counts",
        ),
        ({**EVALUATE, "model": "gap"}, FailedPreconditionError, "MODEL_UNSUPPORTED"),
        ({**EVALUATE, "model": "gapcls"}, FailedPreconditionError, "MODEL_UNSUPPORTED"),
    ],
)
def test_bad_projection_requests(
    pc: Client, kwargs: dict[str, object], error: type[VitscopeError], expected: str
) -> None:
    name = str(kwargs["model"])
    with pytest.raises(error) as caught:
        pc.project(list(pixels_for(pc, name).numpy()), **kwargs)  # type: ignore[arg-type]
    if error is InvalidArgumentError:
        assert [v.field for v in caught.value.field_violations] == [expected], caught.value
    else:
        assert caught.value.reason == expected, caught.value
    assert pc.project(list(pixels_for(pc, "vit", batch=1).numpy()), model="vit", blocks=[0]).images


def test_default_top_k_fits_a_small_label_set(pc: Client) -> None:
    """Unset top_k is 5 or the number of classes (and memories) if fewer; an explicit one
    that does not fit is refused."""
    model = build("clip")
    pixels = pixels_for(pc, "clip", batch=1)
    names = ["cat", "dog"]
    result = pc.project(
        list(pixels.numpy()), model="clip", class_names=names, templates=TEMPLATES, blocks=[1]
    )
    assert result.parameters["top_k"] == 2
    text = clip_text(model, "ViT-B-32", names, TEMPLATES)
    scores = clip_scores(model, text, clip_parts(model, pixels)["out.1"])
    np.testing.assert_array_equal(
        result.images[0].representations["residual"].top_classes[0], np.argsort(-scores[0], -1)
    )
    memories = pc.project_memories(
        0, model="clip", class_names=names, templates=TEMPLATES, images=list(pixels.numpy())
    )
    assert memories.parameters["top_k"] == 2
    assert memories.memories["mlp"].top_memories.shape == (2, 2)
    with pytest.raises(InvalidArgumentError) as caught:
        pc.project_memories(0, model="clip", class_names=names, top_k=3)
    assert [v.field for v in caught.value.field_violations] == ["top_k"]


def test_sliced_scores_match_the_reference(pc: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """With room for one image's scores at a time, the batch is projected slice by slice."""
    monkeypatch.setattr(project, "SCORE_BYTES", 1)
    model = build("vit")
    pixels = pixels_for(pc, "vit", batch=3)
    parts = timm_parts(model, pixels)
    result = pc.project(list(pixels.numpy()), model="vit", blocks=[0, 4])
    targets = parts["logits"].argmax(-1).numpy()
    expected = {
        rep: [timm_scores(model, parts, part, b) for b in (0, 4)]
        for rep, part in REPRESENTATION_PARTS.items()
    }
    check_tokens(result, expected, targets)


def test_memories_keep_the_fused_attention(pc: Client, projection_server: RunningServer) -> None:
    """A timm model's memories read fc1 and the attention's output-projection input, never
    its probabilities: timm's attention-dropout module (the unfused path) does not run."""
    attention = projection_server.registry.get("vit").adapter.root.blocks[3].attn
    if not attention.fused_attn:
        pytest.skip("timm's fused attention is off in this environment")
    calls: list[int] = []
    handle = attention.attn_drop.register_forward_hook(lambda *_: calls.append(1))
    try:
        images = list(pixels_for(pc, "vit", batch=1).numpy())
        mlp = pc.project_memories(3, model="vit", kinds=["mlp"], images=images).memories["mlp"]
        assert len(mlp.images) == 1
        assert calls == []
        pc.project_memories(3, model="vit", kinds=["attention"], images=images)
        assert calls == []
    finally:
        handle.remove()


def test_bad_memory_requests(pc: Client) -> None:
    with pytest.raises(InvalidArgumentError) as block:
        pc.project_memories(9, model="vit")
    assert [v.field for v in block.value.field_violations] == ["block"]
    with pytest.raises(InvalidArgumentError) as targets:
        pc.project_memories(0, model="vit", targets=[1])
    assert [v.field for v in targets.value.field_violations] == ["targets"]
    with pytest.raises(FailedPreconditionError) as unsupported:
        pc.project_memories(0, model="swin")
    assert unsupported.value.reason == "MODEL_UNSUPPORTED"
    assert (
        pc.project_memories(0, model="vit", kinds=["attention"]).memories["attention"].memory_count
        == 64
    )


def test_digits_identifiability_rises_with_depth_and_beats_the_random_twin(pc: Client) -> None:
    """Held-out digits, true labels as targets. Chance (top-1 of 10 classes) is 10%: the random
    twin stays there in every block; the trained model's patch tokens become identifiable in
    its last blocks (about 16% of them here; a 6-block model routes most class evidence to the
    class token, which ranks the true class first in every image)."""
    _, _, images, labels = digits_split()
    chosen = np.concatenate([np.flatnonzero(labels == d)[:3] for d in range(10)])
    digits = [images[i] for i in chosen]
    targets = [int(labels[i]) for i in chosen]
    rates, cls_first = {}, {}
    for model in ("vitscope-digits", "vitscope-digits-random"):
        result = pc.project(
            digits, model=model, targets=targets, representations=["residual"], top_k=1
        )
        rates[model] = [b["mean_identifiable_patch_percent"] for b in result.dataset]
        cls_first[model] = np.mean([image.blocks[-1]["cls_rank"] == 0 for image in result.images])
    trained, random = rates["vitscope-digits"], rates["vitscope-digits-random"]
    assert all(abs(rate - 10) < 2.5 for rate in random)
    assert trained[-1] > random[-1] + 4
    assert trained[-1] > max(trained[:4]) + 3
    assert cls_first["vitscope-digits"] >= 0.9 and cls_first["vitscope-digits-random"] <= 0.3


def test_gap_digits_identifiability_rises_with_depth_far_above_its_random_twin(
    pc: Client,
) -> None:
    """The average-pooled built-in twin (every patch token feeds the classifier) shows the
    paper's picture on held-out digits: patch tokens grow identifiable block by block, most of
    them by the last block, while its random twin stays at chance (10%)."""
    _, _, images, labels = digits_split()
    chosen = np.concatenate([np.flatnonzero(labels == d)[:3] for d in range(10)])
    digits = [images[i] for i in chosen]
    targets = [int(labels[i]) for i in chosen]
    rates, anyone = {}, {}
    for model in ("vitscope-digits-gap", "vitscope-digits-gap-random"):
        result = pc.project(
            digits, model=model, targets=targets, representations=["residual"], top_k=1
        )
        rates[model] = [b["mean_identifiable_patch_percent"] for b in result.dataset]
        anyone[model] = result.dataset[-1]["images_with_identifiable_percent"]
    trained, random = rates["vitscope-digits-gap"], rates["vitscope-digits-gap-random"]
    assert all(abs(rate - 10) < 5 for rate in random)
    assert trained[-1] > 60 and trained[-1] > random[-1] + 45
    assert trained[-1] > trained[-2] > max(trained[:3])
    assert anyone["vitscope-digits-gap"] >= 90


def test_cli_project_writes_table_plot_and_overlay(
    projection_server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "input.png"
    Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)).save(
        image
    )
    out = tmp_path / "out"
    target = ["--target", f"127.0.0.1:{projection_server.port}"]
    main(
        [
            *target,
            "project",
            str(image),
            "--model",
            "vit",
            "--compare",
            "gap",
            "--out",
            str(out),
            "--evaluate-maps",
        ]
    )
    printed = capsys.readouterr().out
    assert "ident%" in printed and "gap:" in printed and printed.count("\n    5 ") == 2
    assert "    random " in printed and printed.count("AUC") == 2
    assert Image.open(out / "identifiability.png").size == (600, 400)
    assert Image.open(out / "importance.png").size == (160, 160)
    with pytest.raises(SystemExit):
        main(
            [
                *target,
                "project",
                str(image),
                "--model",
                "vit",
                "--target",
                "nope",
                "--out",
                str(out),
            ]
        )
    assert "unknown class name 'nope'" in capsys.readouterr().err


def test_deadline_stops_the_work_and_frees_the_slot(
    pc: Client, projection_server: RunningServer
) -> None:
    """Encoding 1,000 names x 60 new templates takes many seconds; the deadline stops it (a
    finished encoding would be cached) and the single compute slot is free for the next call."""
    templates = [f"picture {i} of a {{}}." for i in range(60)]
    names = list(dict.fromkeys(open_clip.IMAGENET_CLASSNAMES))
    image = list(pixels_for(pc, "clip", batch=1).numpy())
    with pytest.raises(DeadlineExceededError):
        pc.project(image, model="clip", class_names=names, templates=templates, timeout=1.0)

    def returned() -> bool:
        gauge = "vitscope_requests_in_flight"
        return sample(projection_server, gauge, method="ProjectToClassSpace") == 0

    wait_until(returned, "the expired call's handler to return")
    assert not TEXT_EMBEDDINGS.holds(tuple(names), tuple(templates))
    quick = ["a photo of a {}."]
    assert pc.project(image, model="clip", class_names=NAMES, templates=quick, blocks=[0]).images
    assert TEXT_EMBEDDINGS.holds(tuple(NAMES), tuple(quick)), "a finished encoding is cached"


def test_projections_over_the_limits_are_refused_before_compute(tmp_path: Path) -> None:
    """The estimates refuse before the compute slot: the message limit per image, the
    server's result limit for captured activations and results of the whole request."""
    running = start(
        tmp_path, max_message_bytes=1 << 16, max_result_bytes=1 << 20, builtin_models=False
    )
    try:
        with Client(f"127.0.0.1:{running.port}", timeout=60) as client:
            rng = np.random.default_rng(0)
            image = [rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)]
            with pytest.raises(ResourceExhaustedError) as message:
                client.project(image, model="vit")
            with pytest.raises(ResourceExhaustedError) as result:
                client.project(image * 8, model="vit", tokens="prefix")
            with pytest.raises(ResourceExhaustedError) as memories:
                client.project_memories(0, model="vit", top_k=64)
            # Refused before any image is decoded: an undecodable one is never looked at.
            with pytest.raises(ResourceExhaustedError) as undecoded:
                client.project([b"not an image"] * 8, model="vit", tokens="prefix")
            for caught in (message, result, memories, undecoded):
                assert caught.value.reason == "RESULT_TOO_LARGE"
                assert caught.value.retry_after is None
            assert client.project(image, model="vit", blocks=[5], tokens="prefix").images
    finally:
        running.stop(0)


def reference_keep_curve(
    run: Callable[[torch.Tensor], torch.Tensor],
    embedded: torch.Tensor,
    orders: np.ndarray,
    counts: list[int],
    prefix: int,
    targets: np.ndarray,
) -> tuple[list[float], float]:
    """Per count: every image's prefix tokens plus its first n patches of `orders` [B, P], in
    sequence order, through `run`; accuracy against targets and sum / (max x N)."""
    accuracy = []
    for n in counts:
        rows = [
            torch.cat([embedded[i, :prefix], embedded[i, prefix + np.sort(order[:n])]])
            for i, order in enumerate(orders)
        ]
        with torch.no_grad():
            predicted = run(torch.stack(rows)).argmax(-1).numpy()
        accuracy.append(float((predicted == targets).mean()))
    return accuracy, sum(accuracy) / (max(accuracy) * len(accuracy)) if max(accuracy) else 0.0


def check_evaluation(
    result: ClassProjection,
    run: Callable[[torch.Tensor], torch.Tensor],
    embedded: torch.Tensor,
    counts: list[int],
    seed: int,
    prefix: int,
    targets: np.ndarray,
) -> None:
    """Importance order: the returned summed maps, descending, ties by position; random order:
    one torch.randperm per image from a generator seeded with `seed`."""
    evaluation = result.importance_evaluation
    assert evaluation is not None
    assert evaluation.keep_counts == counts == result.parameters["keep_counts"]
    assert result.parameters["evaluation_seed"] == str(seed)
    summed = np.stack([image.importance.summed.reshape(-1) for image in result.images])  # type: ignore[union-attr]
    by_importance = np.argsort(-summed, axis=1, kind="stable")
    generator = torch.Generator().manual_seed(seed)
    at_random = np.stack(
        [torch.randperm(summed.shape[1], generator=generator).numpy() for _ in result.images]
    )
    for curve, orders in (
        (evaluation.importance_order, by_importance),
        (evaluation.random_order, at_random),
    ):
        accuracy, auc = reference_keep_curve(run, embedded, orders, counts, prefix, targets)
        assert curve.accuracy == pytest.approx(accuracy, abs=1e-6)
        assert curve.normalized_auc == pytest.approx(auc, abs=1e-6)


@pytest.mark.parametrize(
    ("name", "counts"), [("vit", [0, 1, 10, 50, 100]), ("deit", [0, 3, 7, 16])]
)
def test_importance_evaluation_runs_the_blocks_on_kept_tokens(
    pc: Client, name: str, counts: list[int]
) -> None:
    """timm ViT (class token) and distilled DeiT (class and distillation tokens, both heads
    averaged): blocks, norm and head run by hand on the tokens entering block 0."""
    model = build(name)
    pixels = pixels_for(pc, name, batch=6)
    parts = timm_parts(model, pixels)
    targets = parts["logits"].argmax(-1).numpy()
    targets[0] = (targets[0] + 1) % model.num_classes
    result = pc.project(
        list(pixels.numpy()),
        model=name,
        targets=[int(targets[0]), *[None] * 5],
        blocks=[0, 1],
        representations=["residual"],
        evaluate_importance=True,
        importance_maps=True,
        keep_counts=counts[::-1],
        evaluation_seed=11,
    )
    prefix = model.num_prefix_tokens

    def run(tokens: torch.Tensor) -> torch.Tensor:
        for block in model.blocks:
            tokens = block(tokens)
        tokens = model.norm(tokens)
        if prefix == 2:
            return (model.head(tokens[:, 0]) + model.head_dist(tokens[:, 1])) / 2
        return model.head(model.fc_norm(tokens[:, 0]))

    check_evaluation(result, run, parts["in.0"], counts, 11, prefix, targets)
    assert result.provenance["seed"] == "11"


def test_clip_importance_evaluation_scores_against_the_label_set(pc: Client) -> None:
    model = build("clip")
    pixels = pixels_for(pc, "clip", batch=6)
    parts = clip_parts(model, pixels)
    text = clip_text(model, "ViT-B-32", NAMES, TEMPLATES)
    targets = (F.normalize(parts["embedding"], dim=-1) @ text.T).argmax(-1).numpy()
    result = pc.project(
        list(pixels.numpy()),
        model="clip",
        class_names=NAMES,
        templates=TEMPLATES,
        representations=["residual"],
        importance_maps=True,
        evaluate_importance=True,
    )
    visual = model.visual

    def run(tokens: torch.Tensor) -> torch.Tensor:
        for block in visual.transformer.resblocks:
            tokens = block(tokens)
        return F.normalize(visual.ln_post(tokens[:, 0]) @ visual.proj, dim=-1) @ text.T

    check_evaluation(result, run, parts["in.0"], [0, 1, 2, 4, 8, 16], 0, 1, targets)
    assert result.importance_evaluation.importance_order.accuracy[-1] == 1.0  # type: ignore[union-attr]


def test_digits_importance_order_beats_random_order(pc: Client) -> None:
    """Held-out digits, true labels as targets: with every token kept the accuracy is the
    model's own; with 1 to 8 of the 49 patch tokens kept, the importance order keeps more of
    it on average than the random order (about 22% against 12% here)."""
    _, _, images, labels = digits_split()
    chosen = np.concatenate([np.flatnonzero(labels == d)[:3] for d in range(10)])
    targets = [int(labels[i]) for i in chosen]
    result = pc.project(
        [images[i] for i in chosen],
        model="vitscope-digits",
        targets=targets,
        representations=["residual"],
        top_k=1,
        importance_maps=True,
        evaluate_importance=True,
    )
    evaluation = result.importance_evaluation
    assert evaluation is not None
    assert evaluation.keep_counts == [0, 1, 2, 4, 8, 16, 32, 49]
    # The model's own predictions through another RPC (GetActivations' top prediction).
    plain = pc.activations(
        [images[i] for i in chosen], [], model="vitscope-digits", top_predictions=1
    )
    own = np.mean([int(top[0].class_name) for top in plain.predictions] == np.asarray(targets))
    assert evaluation.importance_order.accuracy[-1] == pytest.approx(own)
    assert evaluation.random_order.accuracy[-1] == pytest.approx(own)
    few = slice(1, 5)
    assert np.mean(evaluation.importance_order.accuracy[few]) >= np.mean(
        evaluation.random_order.accuracy[few]
    )


@pytest.mark.parametrize(
    ("architecture", "kwargs", "runs_on_subsets"),
    [
        ("test_vit", {}, True),
        ("deit_tiny_distilled_patch16_224", {"img_size": 32, "depth": 1}, True),
        # Eva-style blocks need their rotary positions: a token subset cannot run through them.
        (
            "eva02_tiny_patch14_224",
            {"img_size": 28, "patch_size": 4, "depth": 1, "embed_dim": 32, "num_heads": 2},
            False,
        ),
    ],
)
def test_only_plain_vits_are_evaluated_on_token_subsets(
    architecture: str, kwargs: dict[str, object], runs_on_subsets: bool
) -> None:
    spec = ModelSpec(
        name="m",
        family="timm",
        architecture=architecture,
        kwargs={**kwargs, "global_pool": "token", "num_classes": 5},
    )
    head = load_model(spec, torch.device("cpu")).adapter.class_head()
    assert not isinstance(head, Missing)
    assert head.runs_on_token_subsets() is runs_on_subsets
