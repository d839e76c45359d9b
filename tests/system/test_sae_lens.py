"""The file format against the real `sae-lens` package, run in a virtualenv of its own
(tests/external_clients.py): SAEs vitscope trained give sae-lens the same codes, and SAEs
sae-lens writes load into vitscope with the same codes. sae-lens is started twice in all
(it takes seconds to import): once to write its SAEs, once to encode every folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from support.external_clients import SAE_LENS, run_external

from vitscope_server.builtin import builtin_specs
from vitscope_server.core.model.loading import load_model
from vitscope_server.core.model.sae_files import read_sae, write_sae
from vitscope_server.core.sae.activation_data import (
    ActivationDataset,
    ExtractConfig,
    extract_activations,
)
from vitscope_server.core.sae.recipe import Recipe
from vitscope_server.core.sae.train import TrainOptions, train_sae, write_trained_sae

SITE = "blocks.1.out"
KINDS = {"topk": "topk", "batchtopk": "jumprelu", "relu": "standard"}


def run_sae_lens(*args: str) -> None:
    result = run_external("sae_lens_roundtrip.py", *args, environment=SAE_LENS)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SAEs of each kind trained by vitscope, SAEs written by sae-lens and rewritten by
    vitscope, and sae-lens's codes of one input by each."""
    base = tmp_path_factory.mktemp("sae-lens")
    spec = next(s for s in builtin_specs() if s.name == "vitscope-digits")
    loaded = load_model(spec, torch.device("cpu"))
    config = ExtractConfig(site=SITE, images_per_shard=500, batch=250)
    extract_activations(loaded, "builtin-digits", base / "data", config)
    data = ActivationDataset(base / "data")
    for kind in KINDS:
        recipe = Recipe(
            kind=kind,
            expansion=2,
            latents_per_token=6,
            batch_size=512,
            steps=30,
            warmup_steps=3,
            init_tokens=2048,
        )
        state = train_sae(data, recipe, base / "trained" / kind, TrainOptions(log_every=100))
        write_trained_sae(base / "trained" / kind, state, recipe, data, {}, "test")
    written = [base / "written" / name for name in KINDS.values()]
    run_sae_lens("write", SITE, *map(str, written))
    for folder in written:
        write_sae(base / "rewritten" / folder.name, read_sae(folder).module, SITE, {})
    x = np.concatenate(
        [data.shard(1)[:300].numpy(), np.random.default_rng(0).normal(size=(200, 64))]
    )
    np.save(base / "x.npy", x.astype(np.float32))
    every = [
        base / group / name
        for group in ("trained", "written", "rewritten")
        for name in (KINDS if group == "trained" else KINDS.values())
    ]
    run_sae_lens("encode", str(base / "x.npy"), *map(str, every))
    return base


def assert_same_codes(folder: Path, x: np.ndarray) -> None:
    theirs = np.load(folder / "sae_lens_codes.npz")
    ours = read_sae(folder).module
    codes = ours.encode(torch.from_numpy(x))
    assert np.array_equal(codes.numpy() > 0, theirs["codes"] > 0)
    np.testing.assert_allclose(codes.numpy(), theirs["codes"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours.decode(codes).numpy(), theirs["recon"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", list(KINDS))
def test_an_sae_vitscope_trained_gives_sae_lens_the_same_codes(folders: Path, kind: str) -> None:
    folder = folders / "trained" / kind
    assert str(np.load(folder / "sae_lens_codes.npz")["architecture"]) == KINDS[kind]
    assert_same_codes(folder, np.load(folders / "x.npy"))


@pytest.mark.parametrize("architecture", list(KINDS.values()))
def test_sae_lens_files_load_into_vitscope_with_the_same_codes(
    folders: Path, architecture: str
) -> None:
    written = folders / "written" / architecture
    assert read_sae(written).site == SITE and read_sae(written).module.d_sae == 128
    assert_same_codes(written, np.load(folders / "x.npy"))
    # vitscope writes it back in a form sae-lens reads the same way.
    again = np.load(folders / "rewritten" / architecture / "sae_lens_codes.npz")["codes"]
    np.testing.assert_array_equal(again, np.load(written / "sae_lens_codes.npz")["codes"])
