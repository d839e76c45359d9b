"""What SAE extraction, training and serving cost over doing the same work in-process.

Run as `HF_HUB_OFFLINE=1 .venv/bin/python bench/sae.py` (or `make bench-sae`). Everything
runs in this one process on CPU with the built-in digits model (blocks.3.out, 64 channels):

- ratio_extract_vs_inprocess: `extract_activations` images/s (the model's own transform,
  the hooked forward, token selection, shard files written and renamed) over a plain loop
  doing the same transform and a forward with one forward hook, keeping the tokens in memory.
- ratio_train_vs_inprocess: `train_sae` tokens/s (initialization, batches streamed from the
  dataset's shards, checkpoints) over the same initialization (`new_state`) and a loop of the
  same recipe's steps (`train_step`) on batches already in memory.
- ratio_latents_vs_site: GetActivations of `blocks.3.out@sae:bench` (dense latents, 8x the
  site's bytes) over GetActivations of `blocks.3.out` followed by an in-process encode with
  the SAE's file weights; ratio_latent_means_vs_site the same with the latents' mean over
  patch tokens (REDUCTION_MEAN on the server, the same mean after the local encode), which
  sends little: it separates the encode from the transfer of dense latents.

Each comparison alternates its two sides round by round after a warm-up; each ratio is the
median over rounds of the pair's ratio (neighbors cancel drift in machine load). Both sides
use the same torch thread count (--threads, default 2). The last line printed is one JSON
object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from vitscope.client import Client
from vitscope_server.builtin import DIGITS_NAME, builtin_specs
from vitscope_server.builtin.digits_data import digits_split
from vitscope_server.core.model.datasets import BUILTIN_DIGITS_TRAIN, Shard, dataset
from vitscope_server.core.model.loading import LoadedModel, load_model
from vitscope_server.core.model.sae_files import read_sae
from vitscope_server.core.sae.activation_data import (
    ActivationDataset,
    ExtractConfig,
    extract_activations,
)
from vitscope_server.core.sae.recipe import Recipe
from vitscope_server.core.sae.train import (
    TrainOptions,
    new_state,
    total_steps,
    train_sae,
    train_step,
    write_trained_sae,
)
from vitscope_server.settings import ServerSettings
from vitscope_server.transport.app import create_server

SITE = "blocks.3.out"
BLOCK = 3
TARGETS = {
    "ratio_latents_vs_site": ("<=", 1.1),
    "ratio_train_vs_inprocess": (">=", 0.9),
    "ratio_extract_vs_inprocess": (">=", 0.9),
}


def paired_median(first: Callable[[], float], second: Callable[[], float], rounds: int) -> float:
    """Median of first()/second() over alternating rounds, after one warm-up of each."""
    first(), second()
    return statistics.median(first() / second() for _ in range(rounds))


def timed(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


class _Stop(Exception):
    """Ends the baseline's forward after the block it reads, as extraction's does."""


def inprocess_extract(loaded: LoadedModel, images: int, batch: int) -> None:
    """The model's own transform and a forward with a plain hook that keeps the block's
    tokens in memory and stops the forward there."""
    _, load = dataset(BUILTIN_DIGITS_TRAIN)
    adapter, kept = loaded.adapter, []

    def hook(module: torch.nn.Module, args: object, output: torch.Tensor) -> None:
        kept.append(output.reshape(-1, output.shape[-1]).clone())
        raise _Stop

    block = adapter.root.get_submodule(adapter.blocks[BLOCK].path)
    handle = block.register_forward_hook(hook)
    try:
        for start in range(0, images, batch):
            inputs = [load(i).pixels for i in range(start, min(start + batch, images))]
            pixels = torch.stack([adapter.preprocess(image_of(p)) for p in inputs])
            with torch.inference_mode(), contextlib.suppress(_Stop):
                adapter.forward(pixels)
    finally:
        handle.remove()


def image_of(pixels: object) -> object:
    from PIL import Image

    return Image.fromarray(pixels).convert("RGB")  # type: ignore[arg-type]


def extraction_ratio(loaded: LoadedModel, work: Path, images: int, rounds: int) -> float:
    config = ExtractConfig(site=SITE, images_per_shard=256, batch=128)
    counter = iter(range(1_000_000))

    def extract() -> float:
        out = work / f"extract-{next(counter)}"
        return timed(lambda: extract_limited(loaded, out, config, images))

    return paired_median(
        lambda: images / extract(),
        lambda: images / timed(lambda: inprocess_extract(loaded, images, 128)),
        rounds,
    )


def extract_limited(loaded: LoadedModel, out: Path, config: ExtractConfig, images: int) -> None:
    """Extraction of the first `images` training digits: the shard files covering them, each
    as the one worker of a slice (--shard) holding just that file."""
    files = -(-len(dataset(BUILTIN_DIGITS_TRAIN)[0]) // config.images_per_shard)
    for index in range(-(-images // config.images_per_shard)):
        extract_activations(loaded, BUILTIN_DIGITS_TRAIN, out, config, Shard(index, files))


def training_ratio(data: ActivationDataset, work: Path, recipe: Recipe, rounds: int) -> float:
    counter = iter(range(1_000_000))
    tokens = recipe.steps * recipe.batch_size
    memory = torch.cat([data.shard(i) for i in range(data.num_shards)])
    options = TrainOptions(log_every=10**9, checkpoint_every=10**9)

    def trainer() -> float:
        return tokens / timed(
            lambda: train_sae(data, recipe, work / f"train-{next(counter)}", options)
        )

    def inprocess() -> float:
        total = total_steps(recipe, data)
        generator = torch.Generator().manual_seed(recipe.seed)
        order = torch.randperm(len(memory), generator=generator)

        def loop() -> None:
            state = new_state(data, recipe, torch.device("cpu"))
            for step in range(recipe.steps):
                rows = order[(step * recipe.batch_size) % len(memory) :][: recipe.batch_size]
                train_step(state, recipe, memory[rows], total)

        return tokens / timed(loop)

    return paired_median(trainer, inprocess, rounds)


def latents_ratios(sae_folder: Path, rounds: int, batch: int, threads: int) -> tuple[float, float]:
    """(dense latents, latents' means): each over the site's tokens sent and encoded here."""
    settings = ServerSettings(
        host="127.0.0.1",
        port=0,
        metrics_port=-1,
        device="cpu",
        torch_threads=threads,
        default_model=DIGITS_NAME,
        saes=[f"{DIGITS_NAME}:bench={sae_folder}"],
    )
    server = create_server(settings)
    chosen = list(digits_split()[2][:batch])
    sae = read_sae(sae_folder).module
    try:
        assert server.registry.wait_until_settled(timeout=120)
        with Client(f"127.0.0.1:{server.port}") as client:
            latents = f"{SITE}@sae:bench"

            def by_site(reduce: bool) -> float:
                def work() -> None:
                    tokens = client.activations(chosen, [SITE])[SITE]
                    with torch.inference_mode():
                        codes = sae.encode(torch.from_numpy(tokens))
                        if reduce:
                            codes[:, 1:].mean(dim=1)

                return timed(work)

            dense = paired_median(
                lambda: timed(lambda: client.activations(chosen, [latents])),
                lambda: by_site(False),
                rounds,
            )
            means = paired_median(
                lambda: timed(lambda: client.activations(chosen, [latents], reduction="mean")),
                lambda: by_site(True),
                rounds,
            )
            return dense, means
    finally:
        server.stop(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=256, help="images per extraction round")
    parser.add_argument("--steps", type=int, default=100, help="training steps per round")
    parser.add_argument("--batch", type=int, default=32, help="images per GetActivations call")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = next(s for s in builtin_specs() if s.name == DIGITS_NAME).model_copy(update={"saes": []})
    loaded = load_model(spec, torch.device("cpu"))
    recipe = Recipe(
        expansion=8,
        latents_per_token=16,
        batch_size=1024,
        steps=args.steps,
        warmup_steps=5,
        init_tokens=8192,
    )
    with tempfile.TemporaryDirectory() as temp:
        work = Path(temp)
        extract = extraction_ratio(loaded, work, args.images, args.rounds)
        train_folder = work / "data"
        extract_activations(
            loaded,
            BUILTIN_DIGITS_TRAIN,
            train_folder,
            ExtractConfig(site=SITE, images_per_shard=1000, batch=250),
        )
        data = ActivationDataset(train_folder)
        train = training_ratio(data, work, recipe, args.rounds)
        state = train_sae(data, recipe, work / "sae", TrainOptions(log_every=10**9))
        write_trained_sae(work / "sae", state, recipe, data, {}, "bench")
        latents, latent_means = latents_ratios(
            work / "sae", args.rounds * 4, args.batch, args.threads
        )
    results = {
        "ratio_latents_vs_site": latents,
        "ratio_train_vs_inprocess": train,
        "ratio_extract_vs_inprocess": extract,
    }
    met = {
        name: (value <= bound if op == "<=" else value >= bound)
        for name, value in results.items()
        for op, bound in [TARGETS[name]]
    }
    print(
        json.dumps(
            {
                **results,
                "ratio_latent_means_vs_site": latent_means,
                "targets": {k: f"{o} {b}" for k, (o, b) in TARGETS.items()},
                "meets_targets": met,
                "threads": args.threads,
                "device": "cpu",
            }
        )
    )


if __name__ == "__main__":
    main()
