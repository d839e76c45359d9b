"""Scores the built-in inverter on the 1,000 held-out test digits, per depth, for its card.

Run `python bench/evaluate_inverter.py` after retraining: it prints the
card's table (mean MSE and PSNR in [0, 1] pixels, learned chain from every depth) and writes
the card's figure (the first test digit of each class, reconstructed from every depth).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vitscope.overlay import grid
from vitscope_server.builtin import BUILTIN_INVERTERS, DIGITS_NAME, builtin_specs
from vitscope_server.builtin.digits_data import digits_split
from vitscope_server.core.inversion.invert import chain, representations
from vitscope_server.core.inversion.modules import chain_names, depth_site
from vitscope_server.core.inversion.store import load_modules, read_manifest
from vitscope_server.core.model.loading import load_model
from vitscope_server.core.model.pixels import denormalize
from vitscope_server.core.runtime.cancel import NEVER_CANCELLED

STORE = BUILTIN_INVERTERS / DIGITS_NAME


def evaluate(figure: Path) -> list[tuple[int, str, float, float]]:
    """(depth, site, mean MSE, PSNR of the mean MSE) per depth; writes the figure."""
    spec = next(s for s in builtin_specs() if s.name == DIGITS_NAME)
    loaded = load_model(spec, torch.device("cpu"))
    adapter = loaded.adapter
    manifest = read_manifest(STORE)
    assert manifest is not None
    _, _, test_images, test_labels = digits_split()
    inputs = torch.stack(
        [adapter.preprocess(Image.fromarray(d).convert("RGB")) for d in test_images]
    )
    depths = list(range(len(adapter.blocks) + 1))
    shown = [int((test_labels == c).nonzero()[0][0]) for c in range(10)]
    rows: list[tuple[int, str, float, float]] = []
    tiles: list[list[Image.Image]] = [[Image.fromarray(test_images[i])] for i in shown]
    with torch.no_grad():
        originals = denormalize(inputs, adapter.data_config)
        reps = representations(adapter, inputs, depths, NEVER_CANCELLED)
        for depth in depths:
            images = chain(load_modules(manifest, chain_names(depth), loaded.device), reps[depth])
            mse = float(((images - originals) ** 2).mean())
            rows.append((depth, depth_site(depth), mse, 10 * float(np.log10(1 / mse))))
            for row, index in zip(tiles, shown, strict=True):
                pixels = images[index].permute(1, 2, 0).clamp(0, 1).numpy()
                row.append(Image.fromarray(np.round(pixels * 255).astype(np.uint8)))
    captions = [["input", *(f"depth {d}" for d in depths)] for _ in shown]
    grid(tiles, captions, tile=72).save(figure)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--figure", type=Path, default=STORE / "reconstructions.png")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print("| depth | site | MSE | PSNR (dB) |\n|---:|---|---:|---:|")
    for depth, site, mse, psnr in evaluate(args.figure):
        print(f"| {depth} | `{site}` | {mse:.5f} | {psnr:.2f} |")
    print(f"wrote {args.figure}")


if __name__ == "__main__":
    main()
