"""Sparse autoencoders: the file format, the served SAE sites, activation datasets and
training, each against an independent computation (numpy with the file's weights, a plain
forward hook, a one-shot numpy FVU)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from support.features_reference import as_input, build_digits_model, normalize
from support.servers import start

from vitscope import Client, InvalidArgumentError, NotFoundError
from vitscope import interventions as iv
from vitscope.explain import MethodOptions
from vitscope.features import Feature
from vitscope.oip import grpc_predict_v2_pb2 as oip
from vitscope.oip import grpc_predict_v2_pb2_grpc as oip_grpc
from vitscope_server.builtin import BUILTIN_SAES, builtin_specs
from vitscope_server.builtin.digits_data import digits_split
from vitscope_server.cli import main as server_main
from vitscope_server.core.model.loading import load_model
from vitscope_server.core.model.sae import SaeKind, SaeOutput, SparseAutoencoder
from vitscope_server.core.model.sae_files import read_sae, write_sae
from vitscope_server.core.model.sites import resolve_site
from vitscope_server.core.model.specs import SaeSource
from vitscope_server.core.model.splice import replaced_site
from vitscope_server.core.runtime.errors import InvalidArgument
from vitscope_server.core.sae.activation_data import ActivationDataset
from vitscope_server.core.sae.quality import QualityAccumulator
from vitscope_server.core.sae.recipe import Recipe
from vitscope_server.core.sae.train import TrainOptions, train_sae
from vitscope_server.model_selection import model_specs
from vitscope_server.settings import ServerSettings
from vitscope_server.transport.app import RunningServer

DIGITS = "vitscope-digits"
SITE = "blocks.2.out"
BLOCK = 2


def random_sae(kind: SaeKind, d_in: int = 64, d_sae: int = 256, seed: int = 0) -> SparseAutoencoder:
    generator = torch.Generator().manual_seed(seed)
    sae = SparseAutoencoder(d_in, d_sae, kind, k=12 if kind is SaeKind.TOPK else 0)
    with torch.no_grad():
        for parameter in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec):
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
        sae.threshold.copy_(torch.rand(d_sae, generator=generator))
    return sae


def numpy_codes(folder: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes and reconstruction of x [N, d] by SAELens's arithmetic, straight from the files."""
    config = json.loads((folder / "cfg.json").read_text())
    weights = {
        k: v.astype(np.float64)
        for k, v in load_file(str(folder / "sae_weights.safetensors")).items()
    }
    pre = (x.astype(np.float64) - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]
    if config["architecture"] == "standard":
        codes = np.maximum(pre, 0)
    elif config["architecture"] == "jumprelu":
        codes = np.where(pre > weights["threshold"], np.maximum(pre, 0), 0)
    else:
        keep = np.argsort(-pre, axis=-1)[..., : config["k"]]
        codes = np.zeros_like(pre)
        np.put_along_axis(codes, keep, np.maximum(np.take_along_axis(pre, keep, -1), 0), -1)
    return codes, codes @ weights["W_dec"] + weights["b_dec"]


@pytest.mark.parametrize("kind", list(SaeKind))
def test_codes_equal_a_plain_computation_with_the_files_weights(
    tmp_path: Path, kind: SaeKind
) -> None:
    sae = random_sae(kind)
    write_sae(tmp_path, sae, SITE, {"model": DIGITS})
    loaded = read_sae(tmp_path)
    assert loaded.site == SITE and loaded.module.kind is kind
    x = np.random.default_rng(1).normal(size=(40, 64)).astype(np.float32)
    codes, recon = numpy_codes(tmp_path, x)
    ours = loaded.module.encode(torch.from_numpy(x))
    assert ((ours > 0).numpy() == (codes > 0)).all()
    np.testing.assert_allclose(ours.numpy(), codes, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        loaded.module(torch.from_numpy(x)).detach().numpy(), recon, rtol=1e-4, atol=1e-4
    )


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset of blocks.2.out over the held-out digits and a TopK SAE trained on it."""
    base = tmp_path_factory.mktemp("sae")
    common = ["--model", DIGITS, "--threads", "2"]
    server_main(
        [
            "extract",
            *common,
            "--data",
            "builtin-digits",
            "--site",
            SITE,
            "--out",
            str(base / "data"),
            "--images-per-shard",
            "250",
            "--batch",
            "125",
        ]
    )
    server_main(
        [
            "train-sae",
            "--threads",
            "2",
            "--dataset",
            str(base / "data"),
            "--out",
            str(base / "topk"),
            "--expansion",
            "4",
            "--latents-per-token",
            "8",
            "--batch-size",
            "256",
            "--steps",
            "120",
            "--warmup-steps",
            "10",
            "--init-tokens",
            "4096",
        ]
    )
    return base


@pytest.fixture(scope="module")
def sae_server(
    tmp_path_factory: pytest.TempPathFactory, workspace: Path
) -> Iterator[RunningServer]:
    digits = next(s for s in builtin_specs() if s.name == DIGITS)
    entry = digits.model_dump(mode="json") | {
        "name": "digits-sae",
        "saes": [
            {"name": "topk", "path": str(workspace / "topk")},
            {"name": "missing", "path": str(workspace / "nowhere")},
        ],
    }
    running = start(
        tmp_path_factory.mktemp("server"),
        models=[entry],
        default_model="digits-sae",
        builtin_models=False,
    )
    yield running
    running.stop(0)


@pytest.fixture(scope="module")
def sae_client(sae_server: RunningServer) -> Iterator[Client]:
    with Client(f"127.0.0.1:{sae_server.port}", timeout=60) as client:
        yield client


def hooked_site(pixels: torch.Tensor) -> np.ndarray:
    """blocks.2.out [B, T, D] of the digits model read with a plain forward hook."""
    model = build_digits_model()
    store: dict[str, torch.Tensor] = {}
    handle = model.blocks[BLOCK].register_forward_hook(lambda m, a, o: store.__setitem__("x", o))
    try:
        model(normalize(pixels))
    finally:
        handle.remove()
    return store["x"].numpy()


def test_served_latents_equal_a_plain_encode_of_a_hooked_forward(
    sae_client: Client, workspace: Path
) -> None:
    images = digits_split()[2][:5]
    sites = [SITE, f"{SITE}@sae:topk", f"{SITE}@sae:topk.recon", f"{SITE}@sae:topk.error"]
    result = sae_client.activations(list(images), sites)
    reference = hooked_site(as_input(images))
    np.testing.assert_allclose(result[SITE], reference, rtol=1e-5, atol=1e-5)
    codes, recon = numpy_codes(workspace / "topk", reference.reshape(-1, reference.shape[-1]))
    latents = result[f"{SITE}@sae:topk"]
    assert latents.shape == (5, reference.shape[1], 256)
    np.testing.assert_allclose(latents.reshape(codes.shape), codes, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        result[f"{SITE}@sae:topk.recon"].reshape(recon.shape), recon, rtol=1e-4, atol=1e-4
    )
    # The error term puts the site back together, to float32 rounding.
    np.testing.assert_allclose(
        result[f"{SITE}@sae:topk.recon"] + result[f"{SITE}@sae:topk.error"], result[SITE], atol=1e-5
    )


def test_an_image_alone_gets_the_latents_it_gets_in_a_batch(sae_client: Client) -> None:
    images = list(digits_split()[2][10:16])
    site = f"{SITE}@sae:topk"
    batch = sae_client.activations(images, [site])[site]
    for index in (0, 3):
        alone = sae_client.activations([images[index]], [site])[site]
        assert np.array_equal(alone[0], batch[index])


def test_sae_sites_take_token_selection_and_reductions(sae_client: Client) -> None:
    images = list(digits_split()[2][:3])
    site = f"{SITE}@sae:topk"
    full = sae_client.activations(images, [site])[site]
    maps = sae_client.activations(images, [site], reduction="patch_map", channels=[3, 200])[site]
    assert maps.shape == (3, 2, 7, 7)
    np.testing.assert_array_equal(maps[:, 1], full[:, 1:, 200].reshape(3, 7, 7))
    mean = sae_client.activations(images, [site], reduction="mean")[site]
    np.testing.assert_allclose(mean, full[:, 1:].mean(axis=1), rtol=1e-6, atol=1e-6)


def test_unknown_sae_sites_are_not_found(sae_client: Client) -> None:
    image = [digits_split()[2][0]]
    with pytest.raises(NotFoundError, match="serves no SAE 'nope'"):
        sae_client.activations(image, [f"{SITE}@sae:nope"])
    with pytest.raises(NotFoundError, match=r"reads 'blocks\.2\.out'"):
        sae_client.activations(image, ["blocks.1.out@sae:topk"])
    # An SAE whose files are missing leaves the model serving, its site listed as unavailable.
    unavailable = sae_client.describe().unavailable_sites
    assert "nowhere" in unavailable["@sae:missing"]


def test_streamed_fvu_equals_a_one_shot_numpy_computation(workspace: Path) -> None:
    data = ActivationDataset(workspace / "data")
    sae = read_sae(workspace / "topk").module
    quality = QualityAccumulator(sae.d_in, sae.d_sae)
    everything = []
    for index in range(data.num_shards):
        x = data.shard(index)
        for start_row in range(0, len(x), 3001):
            chunk = x[start_row : start_row + 3001]
            codes = sae.encode(chunk)
            quality.add(chunk, codes, sae.decode(codes))
        everything.append(x.numpy())
    x = np.concatenate(everything).astype(np.float64)
    _, recon = numpy_codes(workspace / "topk", x)
    fvu = ((x - recon) ** 2).sum() / ((x - x.mean(axis=0)) ** 2).sum()
    report = quality.report()
    assert report.tokens == len(x)
    assert report.fvu == pytest.approx(fvu, rel=1e-5)
    assert 0 < report.fvu < 1
    assert report.l0 <= 8


def test_the_trained_sae_records_its_provenance_and_metrics(workspace: Path) -> None:
    config = json.loads((workspace / "topk" / "cfg.json").read_text())
    assert config["architecture"] == "topk" and config["k"] == 8
    assert config["metadata"]["hook_name"] == SITE
    recorded = config["metadata"]["vitscope"]
    assert recorded["model"] == DIGITS
    assert recorded["dataset"]["site"] == SITE and recorded["dataset"]["num_images"] == 1000
    assert recorded["recipe"]["seed"] == 0 and recorded["steps"] == 120
    assert 0 < recorded["metrics"]["fvu"] < 1
    manifest = json.loads((workspace / "data" / "manifest.json").read_text())
    assert manifest["num_shards"] == 4 and manifest["image_list_digest"].startswith("sha256:")


def _train(
    data: ActivationDataset, out: Path, recipe: Recipe, stop_after: int = 0
) -> dict[str, torch.Tensor]:
    state = train_sae(
        data, recipe, out, TrainOptions(log_every=1000, checkpoint_every=7, stop_after=stop_after)
    )
    return {k: v.clone() for k, v in state.sae.state_dict().items()}


@pytest.mark.parametrize("kind", ["batchtopk", "relu"])
def test_training_is_reproducible_and_a_resumed_run_equals_a_straight_one(
    workspace: Path, tmp_path: Path, kind: str
) -> None:
    data = ActivationDataset(workspace / "data")
    recipe = Recipe(
        kind=kind,
        expansion=2,
        latents_per_token=6,
        batch_size=512,
        steps=40,
        warmup_steps=5,
        init_tokens=2048,
        dead_after_tokens=2000,
    )
    straight = _train(data, tmp_path / "a", recipe)
    again = _train(data, tmp_path / "b", recipe)
    _train(data, tmp_path / "c", recipe, stop_after=17)
    resumed = _train(data, tmp_path / "c", recipe)
    for name, value in straight.items():
        assert torch.equal(value, again[name]), name
        assert torch.equal(value, resumed[name]), name
    norms = straight["W_dec"].norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


def test_extraction_resumes_and_indexed_workers_write_the_same_shards(
    workspace: Path, tmp_path: Path
) -> None:
    out = tmp_path / "data"
    common = [
        "--model",
        DIGITS,
        "--threads",
        "2",
        "--data",
        "builtin-digits",
        "--site",
        SITE,
        "--out",
        str(out),
        "--images-per-shard",
        "250",
        "--batch",
        "125",
    ]
    for worker in ("0/2", "1/2"):
        server_main(["extract", *common, "--shard", worker])
    (out / "shard-00002.safetensors").unlink()
    server_main(["extract", *common])
    for index in range(4):
        name = f"shard-{index:05d}.safetensors"
        ours, theirs = load_file(str(out / name)), load_file(str(workspace / "data" / name))
        assert all(np.array_equal(ours[k], theirs[k]) for k in ("activations", "image", "token"))
    with pytest.raises(SystemExit, match="holds another dataset"):
        server_main(["extract", *common[:-4], "--images-per-shard", "100"])


def test_an_sae_of_the_wrong_width_is_listed_unavailable(tmp_path: Path) -> None:
    write_sae(tmp_path / "wide", random_sae(SaeKind.RELU, d_in=32), SITE, {})
    spec = next(s for s in builtin_specs() if s.name == DIGITS)
    spec = spec.model_copy(update={"saes": [SaeSource(name="wide", path=tmp_path / "wide")]})
    loaded = load_model(spec, torch.device("cpu"))
    notes = {note.site: note.reason for note in loaded.adapter.notes}
    assert "has 64 channels, the SAE reads 32" in notes[f"{SITE}@sae:wide"]
    assert not loaded.adapter.saes


def test_describe_model_lists_the_sae_its_sites_and_metrics(sae_client: Client) -> None:
    description = sae_client.describe()
    sae = description.saes["topk"]
    assert (sae["site"], sae["input_width"], sae["width"], sae["kind"], sae["k"]) == (
        SITE,
        64,
        256,
        "topk",
        8,
    )
    assert sae["trained_as"] == "topk" and 0 < sae["metrics"]["fvu"] < 1
    assert description.sites[f"{SITE}@sae:topk"]["shape"] == ["1", "50", "256"]
    assert description.sites[f"{SITE}@sae:topk.error"]["shape"] == ["1", "50", "64"]


def test_saes_register_from_a_folder_and_a_flag(workspace: Path, tmp_path: Path) -> None:
    root = tmp_path / "saes"
    (root / DIGITS).mkdir(parents=True)
    (root / DIGITS / "resid").symlink_to(workspace / "topk")
    settings = ServerSettings(saes_dir=root, saes=[f"{DIGITS}:again={workspace / 'topk'}"])
    specs, _ = model_specs(settings)
    digits = next(spec for spec in specs if spec.name == DIGITS)
    assert {sae.name: sae.path for sae in digits.saes}.items() >= {
        "resid": root / DIGITS / "resid",
        "again": workspace / "topk",
    }.items()
    with pytest.raises(InvalidArgument, match="not served"):
        model_specs(ServerSettings(saes=[f"nobody:x={workspace}"]))
    with pytest.raises(InvalidArgument, match="MODEL:NAME=FOLDER"):
        model_specs(ServerSettings(saes=["no-folder"]))


def hooked_logits(pixels: torch.Tensor, replacement: np.ndarray | None) -> np.ndarray:
    """The digits model's logits with blocks.2.out replaced (a plain forward hook)."""
    model = build_digits_model()
    hook = None
    if replacement is not None:
        value = torch.from_numpy(replacement.astype(np.float32))
        hook = model.blocks[BLOCK].register_forward_hook(lambda m, a, o: value)
    try:
        return model(normalize(pixels)).double().numpy()
    finally:
        if hook is not None:
            hook.remove()


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def test_an_undecodable_image_in_a_later_batch_is_named_by_its_own_index(
    sae_client: Client,
) -> None:
    images: list[object] = list(digits_split()[2][:20])
    images[13] = b"not an image"
    with pytest.raises(InvalidArgumentError) as refused:
        sae_client.evaluate_sae(images, "topk", batch=8)
    assert [v.field for v in refused.value.field_violations] == ["images[13].encoded"]


def test_evaluate_sae_equals_an_independent_computation(
    sae_client: Client, workspace: Path
) -> None:
    images, labels = digits_split()[2][:40], digits_split()[3][:40]
    progress: list[int] = []
    result = sae_client.evaluate_sae(
        list(images),
        "topk",
        labels=[int(x) for x in labels],
        batch=16,
        on_progress=lambda p: progress.append(p.images_done),
    )
    assert progress == [16, 32, 40]
    pixels = as_input(images)
    x = hooked_site(pixels)
    codes, recon = numpy_codes(workspace / "topk", x.reshape(-1, x.shape[-1]).astype(np.float64))
    flat = x.reshape(-1, x.shape[-1]).astype(np.float64)
    fvu = ((flat - recon) ** 2).sum() / ((flat - flat.mean(axis=0)) ** 2).sum()
    assert result.tokens == flat.shape[0] and result.images == 40
    assert result.fvu == pytest.approx(fvu, rel=1e-4)
    assert result.l0 == pytest.approx((codes > 0).sum(axis=1).mean(), rel=1e-6)
    assert result.dead_fraction == pytest.approx(((codes > 0).sum(axis=0) == 0).mean())
    assert sum(result.histogram_counts) == round(256 * (1 - result.dead_fraction))
    clean = log_softmax(hooked_logits(pixels, None))
    spliced = log_softmax(hooked_logits(pixels, recon.reshape(x.shape)))
    zero = log_softmax(hooked_logits(pixels, np.zeros_like(x)))
    rows = np.arange(40)
    losses = [-(lp[rows, labels]).mean() for lp in (clean, spliced, zero)]
    splice = result.splice
    assert splice is not None and splice["labels"] == "given"
    assert splice["top1_agreement"] == pytest.approx((clean.argmax(1) == spliced.argmax(1)).mean())
    assert splice["kl_clean_spliced"] == pytest.approx(
        (np.exp(clean) * (clean - spliced)).sum(1).mean(), rel=1e-3, abs=1e-5
    )
    assert [
        splice["loss_clean"],
        splice["loss_spliced"],
        splice["loss_zero_ablated"],
    ] == pytest.approx(losses, rel=1e-4)
    recovered = (losses[2] - losses[1]) / (losses[2] - losses[0])
    assert splice["loss_recovered"] == pytest.approx(recovered, rel=1e-3)


def test_splicing_with_the_error_term_reproduces_the_clean_output(
    sae_server: RunningServer,
) -> None:
    loaded = sae_server.registry.get("digits-sae")
    adapter = loaded.adapter
    site = resolve_site(adapter, SITE)
    sae = adapter.saes["topk"].module
    pixels = normalize(as_input(digits_split()[2][:8]))
    with torch.inference_mode():
        clean = adapter.forward(pixels)
        with replaced_site(
            adapter, site, lambda x: sae.read(x, SaeOutput.RECON) + sae.read(x, SaeOutput.ERROR)
        ):
            spliced = adapter.forward(pixels)
        with replaced_site(adapter, site, lambda x: sae.read(x, SaeOutput.RECON)):
            reconstructed = adapter.forward(pixels)
    torch.testing.assert_close(spliced, clean, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(reconstructed, clean, atol=1e-3)


def test_top_images_of_a_latent_equal_a_brute_force_search(sae_client: Client) -> None:
    images = list(digits_split()[2][:24])
    site = f"{SITE}@sae:topk"
    latents = sae_client.activations(images, [site])[site][:, 1:]  # patch tokens
    channels = [int(c) for c in np.argsort(-latents.mean(axis=(0, 1)))[:3]]
    top = sae_client.top_activating_images(site, channels, images=images, top_k=4, batch=7)
    assert top.scanned_image_count == 24
    for channel in channels:
        scores = latents[:, :, channel].mean(axis=1)
        expected = sorted(range(24), key=lambda i: (-scores[i], i))[:4]
        assert [hit.index for hit in top.channels[channel]] == expected
        for hit in top.channels[channel]:
            np.testing.assert_allclose(hit.score, scores[hit.index], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(
                hit.patch_map, latents[hit.index, :, channel].reshape(7, 7), rtol=1e-5, atol=1e-6
            )


def test_feature_maps_and_optimization_read_sae_latents(sae_client: Client) -> None:
    images = list(digits_split()[2][:3])
    site = f"{SITE}@sae:topk"
    means = sae_client.activations(images, [site], reduction="mean")[site]
    explained = sae_client.explain(
        images, ["feature_map"], options={"feature_map": MethodOptions(site=site)}
    )
    maps = sae_client.activations(images, [site], reduction="patch_map", channels=list(range(256)))[
        site
    ]
    for index, image in enumerate(explained.images):
        got = image.maps["feature_map"]
        assert got.channel == means[index].argmax()
        np.testing.assert_allclose(got.grid_map, maps[index, got.channel], rtol=1e-5, atol=1e-6)
    channel = int(means.mean(axis=0).argmax())
    result = sae_client.optimize_features(
        [Feature(site=site, channel=channel)], steps=12, copies=2, seed=0
    )
    optimized = result.features[0]
    assert optimized.site == site and optimized.channel == channel
    # The optimized image drives the latent above its mean over these digits.
    reached = sae_client.activations(
        [np.asarray(optimized.image.convert("L"))], [site], reduction="mean"
    )[site]
    assert reached[0, channel] > means[:, channel].mean()


def test_open_inference_protocol_outputs_sae_sites(
    sae_server: RunningServer, sae_client: Client
) -> None:
    from test_oip import Outputs, _output, _pixels_request

    site = f"{SITE}@sae:topk"
    images = [np.repeat(d[..., None], 3, axis=-1) for d in digits_split()[2][:2]]
    with grpc.insecure_channel(f"127.0.0.1:{sae_server.port}") as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        metadata = stub.ModelMetadata(oip.ModelMetadataRequest(name="digits-sae"))
        outputs = {o.name: list(o.shape) for o in metadata.outputs}
        assert outputs[site] == [-1, 50, 256] and outputs[f"{site}.error"] == [-1, 50, 64]
        response = stub.ModelInfer(_pixels_request("digits-sae", images, [Outputs(name=site)]))
    expected = sae_client.activations(images, [site])[site]
    np.testing.assert_array_equal(_output(response, site), expected)


def test_the_built_in_sae_is_served_with_its_card_metrics(client: Client) -> None:
    folder = BUILTIN_SAES / DIGITS / "resid3-topk"
    recorded = json.loads((folder / "evaluation.json").read_text())
    sae = client.describe(DIGITS).saes["resid3-topk"]
    assert (sae["site"], sae["width"], sae["kind"], sae["k"]) == ("blocks.3.out", 512, "topk", 16)
    assert sae["metrics"]["fvu"] == pytest.approx(recorded["fvu"])
    assert recorded["splice"]["loss_recovered"] > 0.95 and recorded["fvu"] < 0.05
    digit = [digits_split()[2][0]]
    latents = client.activations(digit, ["blocks.3.out@sae:resid3-topk"], model=DIGITS)
    assert (latents["blocks.3.out@sae:resid3-topk"] > 0).sum(axis=-1).max() <= 16


@pytest.mark.parametrize("sampled", [False, True])
def test_dataset_rows_are_the_hooked_sites_tokens(
    workspace: Path, tmp_path: Path, sampled: bool
) -> None:
    out = workspace / "data"
    if sampled:
        out = tmp_path / "sampled"
        flags = ["--tokens", "patches", "--tokens-per-image", "5", "--seed", "3", "--shard", "0/4"]
        common = ["--model", DIGITS, "--threads", "2", "--data", "builtin-digits", "--site", SITE]
        server_main(["extract", *common, "--out", str(out), "--images-per-shard", "250", *flags])
    shard = load_file(str(out / "shard-00000.safetensors"))
    images = digits_split()[2][:4]
    reference = hooked_site(as_input(images))
    chosen = shard["image"] < 4
    per_image = np.bincount(shard["image"][chosen])
    assert list(per_image) == [5 if sampled else 50] * 4
    if sampled:
        assert (shard["token"][chosen] >= 1).all(), "patch tokens only"
    expected = reference[shard["image"][chosen], shard["token"][chosen]]
    np.testing.assert_allclose(shard["activations"][chosen], expected, rtol=1e-5, atol=1e-5)


def test_edits_in_an_sae_s_space_keep_its_error_term(sae_client: Client, workspace: Path) -> None:
    """Zeroing latents moves the tokens by the latents' decoder rows; scaling the error
    adds to the tokens what the error grows by; each equals a plain computation."""
    images = digits_split()[2][:3]
    pixels = as_input(images)
    x = hooked_site(pixels).astype(np.float64)
    flat = x.reshape(-1, x.shape[-1])
    codes, recon = numpy_codes(workspace / "topk", flat)
    busiest = [int(j) for j in np.argsort(-(codes > 0).sum(axis=0))[:2]]
    assert (codes[:, busiest] > 0).sum() > 10
    decoder = load_file(str(workspace / "topk" / "sae_weights.safetensors"))["W_dec"]
    zeroed = codes.copy()
    zeroed[:, busiest] = 0.0
    without = flat + (zeroed - codes) @ decoder.astype(np.float64)
    doubled_error = flat + (flat - recon)
    site = f"{SITE}@sae:topk"
    result = sae_client.intervene(
        list(images),
        [
            iv.variant([iv.edit(site, "zero", channels=busiest)]),
            iv.variant([iv.edit(f"{site}.error", "scale", factor=2.0)]),
            iv.variant([iv.edit(site, "scale", factor=1.0)]),
        ],
        logits=True,
    )
    latents_off, error_doubled, untouched = result.variants
    for outcome, tokens in ((latents_off, without), (error_doubled, doubled_error)):
        expected = hooked_logits(pixels, tokens.reshape(x.shape))
        np.testing.assert_allclose(outcome.logits, expected, rtol=1e-4, atol=1e-4)
    plain = hooked_logits(pixels, None)
    np.testing.assert_allclose(untouched.logits, plain, rtol=1e-5, atol=1e-5)
    assert not np.allclose(latents_off.logits, plain, atol=1e-3)
