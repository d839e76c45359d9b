"""What learned inversion costs next to the forward pass, and how fast an inverse block trains.

Run as `HF_HUB_OFFLINE=1 .venv/bin/python bench/inversion.py [--rounds N] [--threads T]`.
Everything runs in this process on CPU with the built-in `vitscope-digits` model and its
committed inverter:

- ratio_vs_forward: time to invert a batch of held-out digits from the last block (depth 6:
  the chain of the 6 inverse blocks and the embedding inverse) / time of the model's own
  forward pass on the same batch. The two alternate round by round after a warm-up; the
  ratio is the median of per-round ratios.
- train_images_per_s: images per second through one training step of the inverse of the
  last block (frozen forward to get the pair, inverse forward, backward, Adam step), the
  work `vitscope-server train-inverter` repeats, batch 128.

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from PIL import Image

from vitscope_server.builtin import BUILTIN_INVERTERS, DIGITS_NAME, builtin_specs
from vitscope_server.builtin.digits_data import digits_split
from vitscope_server.core.inversion.invert import chain, representations
from vitscope_server.core.inversion.modules import build_module, chain_names, geometry_of
from vitscope_server.core.inversion.store import load_modules, read_manifest
from vitscope_server.core.inversion.train import training_pairs
from vitscope_server.core.model.loading import load_model
from vitscope_server.core.runtime.cancel import NEVER_CANCELLED


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    spec = next(s for s in builtin_specs() if s.name == DIGITS_NAME)
    loaded = load_model(spec, torch.device(args.device))
    adapter = loaded.adapter
    manifest = read_manifest(BUILTIN_INVERTERS / DIGITS_NAME)
    assert manifest is not None
    depth = len(adapter.blocks)
    modules = load_modules(manifest, chain_names(depth), loaded.device)
    test_digits = digits_split()[2][: args.batch]
    inputs = torch.stack(
        [adapter.preprocess(Image.fromarray(d).convert("RGB")) for d in test_digits]
    ).to(loaded.device)
    with torch.no_grad():
        tokens = representations(adapter, inputs, [depth], NEVER_CANCELLED)[depth]

    def timed(work: Callable[[], None]) -> float:
        started = time.perf_counter()
        with torch.no_grad():
            work()
        if loaded.device.type == "cuda":
            torch.cuda.synchronize(loaded.device)
        return time.perf_counter() - started

    def invert() -> None:
        chain(modules, tokens)

    def forward() -> None:
        adapter.forward(inputs)

    timed(invert)
    timed(forward)
    ratios, invert_s, forward_s = [], [], []
    for _ in range(args.rounds):
        i, f = timed(invert), timed(forward)
        invert_s.append(i)
        forward_s.append(f)
        ratios.append(i / f)

    name = f"blocks.{depth - 1}"
    torch.manual_seed(0)
    block = build_module(name, "block", geometry_of(loaded)).to(loaded.device).train()
    optimizer = torch.optim.Adam(block.parameters(), lr=1e-3)
    train_inputs = torch.cat([inputs, inputs])[:128]

    def step() -> None:
        source, target = training_pairs(loaded, name, train_inputs)
        loss = ((block(source) - target) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()
    started = time.perf_counter()
    for _ in range(args.train_steps):
        step()
    if loaded.device.type == "cuda":
        torch.cuda.synchronize(loaded.device)
    train_rate = args.train_steps * len(train_inputs) / (time.perf_counter() - started)

    result = {
        "ratio_vs_forward": round(statistics.median(ratios), 3),
        "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)],
        "invert_ms": round(1000 * statistics.median(invert_s), 2),
        "forward_ms": round(1000 * statistics.median(forward_s), 2),
        "train_images_per_s": round(train_rate, 1),
        "batch": len(inputs),
        "depth": depth,
        "threads": args.threads,
        "device": args.device,
    }
    print(
        f"invert from depth {depth}: {result['invert_ms']} ms, forward {result['forward_ms']} ms "
        f"(batch {len(inputs)}); training {name}'s inverse: {result['train_images_per_s']} img/s"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
