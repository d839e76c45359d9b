"""What OptimizeFeatures costs over the same optimization written as a plain loop, and what
batching K features into one request buys.

Run as `HF_HUB_OFFLINE=1 .venv/bin/python bench/feature_viz.py [--steps N] [--rounds R]`.
Everything runs in this one process on CPU: a real vitscope server on a loopback port serving
vit_tiny_patch16_224 at 224 px (random init, seed 0) and, for the baseline, an identical timm
model optimized by a loop written here from docs/methods.md section 2 (8 copies, color shift,
decaying offset, jitter, TV on the augmented batch, Adam (0.5, 0.99), cosine, clamp).

Fairness choices:
- The feature sits in the last block (blocks.11.mlp.hidden), so the service's early stop after
  the deepest needed block saves nothing the baseline pays for (only the final norm and head).
- Both sides run with the same torch thread count (--threads) and the same seed; the service's
  time is the whole call (request to final message: PNGs, patch map and final forward included).
- Sides alternate round by round after one warm-up round; a ratio is the median over rounds
  of that round's ratio.
- batched_speedup compares one request optimizing K features (K images, 8K copies per step)
  with K sequential one-feature requests, all through the service. On a CPU a batch of 8K
  images costs about K times a batch of 8, so this gains far less than on a GPU, where a batch
  of 8 leaves most of the device idle.

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np
import timm
import torch
import yaml
from torch import nn

from vitscope.client import Client
from vitscope_server.settings import ServerSettings
from vitscope_server.transport.app import create_server

ARCHITECTURE = "vit_tiny_patch16_224"
MODEL = "vit-tiny"
BLOCK = 11
SITE = f"blocks.{BLOCK}.mlp.hidden"
SIZE = 224
COPIES = 8
LEARNING_RATE = 0.1
TV_WEIGHT = 0.0005
TARGETS = {"ratio_vs_inprocess": 0.95, "batched_speedup": 2.0}


def inprocess_loop(
    model: nn.Module, channel: int, steps: int, seed: int, mean: torch.Tensor, std: torch.Tensor
) -> np.ndarray:
    """The paper's recipe for one feature as a plain loop; returns the uint8 image."""
    generator = torch.Generator().manual_seed(seed)
    device = mean.device
    pixels = torch.rand(1, 3, SIZE, SIZE, generator=generator).to(device).requires_grad_()
    optimizer = torch.optim.Adam([pixels], lr=LEARNING_RATE, betas=(0.5, 0.99), eps=1e-8)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    jitter = round(32 * SIZE / 224)
    store: dict[str, torch.Tensor] = {}
    handle = model.blocks[BLOCK].mlp.act.register_forward_hook(
        lambda m, a, o: store.__setitem__("h", o)
    )
    try:
        for step in range(steps):
            subtract = (torch.rand(COPIES, 3, generator=generator) * 2 - 1).to(device)
            divide = (torch.rand(COPIES, 3, generator=generator) * 2 - 1).to(device)
            offset = torch.randn(COPIES, 3, generator=generator).to(device)
            shift = torch.randint(-jitter, jitter + 1, (2,), generator=generator).tolist()
            batch = pixels.expand(COPIES, -1, -1, -1)
            batch = (batch - subtract[:, :, None, None]) / divide.exp()[:, :, None, None]
            batch = batch + offset[:, :, None, None] * 0.5 * (steps - step) / steps
            batch = torch.roll(batch, shifts=(shift[0], shift[1]), dims=(2, 3))
            model((batch - mean) / std)
            objective = store["h"][:, 1:, channel].mean()
            differences = (
                batch[..., :, 1:] - batch[..., :, :-1],
                batch[..., 1:, :] - batch[..., :-1, :],
                batch[..., 1:, 1:] - batch[..., :-1, :-1],
                batch[..., 1:, :-1] - batch[..., :-1, 1:],
            )
            tv = sum(d.flatten(2).norm(dim=2).mean() for d in differences)
            loss = -objective + TV_WEIGHT * tv
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                pixels.clamp_(0, 1)
    finally:
        handle.remove()
    image = (pixels.detach()[0].permute(1, 2, 0) * 255).round().to(torch.uint8)
    return image.cpu().numpy()


def timed(run: object) -> tuple[float, object]:
    started = time.perf_counter()
    value = run()  # type: ignore[operator]
    return time.perf_counter() - started, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="steps per single-feature run")
    parser.add_argument("--batched-steps", type=int, default=3, help="steps per K-feature run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--features", type=int, default=8, help="K")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda, both sides")
    parser.add_argument("--architecture", default=ARCHITECTURE, help="a timm ViT at 224 px")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with TemporaryDirectory() as tmp:
        models_file = Path(tmp) / "models.yaml"
        models_file.write_text(
            yaml.safe_dump(
                {"models": [{"name": MODEL, "family": "timm", "architecture": args.architecture}]}
            )
        )
        settings = ServerSettings.model_validate(
            {
                "host": "127.0.0.1",
                "port": 0,
                "metrics_port": -1,
                "ui_port": -1,
                "models_file": models_file,
                "builtin_models": False,
                "torch_threads": args.threads,
                "device": args.device,
            }
        )
        running = create_server(settings)
        assert running.registry.wait_until_settled(timeout=300)
        torch.manual_seed(0)
        model = timm.create_model(args.architecture, pretrained=False)
        model = model.to(args.device).eval().requires_grad_(False)
        config = model.pretrained_cfg
        mean = torch.tensor(config["mean"], device=args.device)[None, :, None, None]
        std = torch.tensor(config["std"], device=args.device)[None, :, None, None]
        try:
            with Client(f"127.0.0.1:{running.port}", timeout=3600) as client:
                results = measure(client, model, mean, std, args)
        finally:
            running.stop(0)
    print(json.dumps(results))


def measure(
    client: Client,
    model: nn.Module,
    mean: torch.Tensor,
    std: torch.Tensor,
    args: argparse.Namespace,
) -> dict[str, object]:
    def service(channels: list[int], steps: int) -> list[np.ndarray]:
        result = client.optimize_features(
            [(SITE, c) for c in channels], model=MODEL, steps=steps, seed=0
        )
        return [np.asarray(f.image) for f in result.features]

    single_ratios, service_seconds, loop_seconds = [], [], []
    pixel_difference = 0.0
    for round_index in range(args.rounds + 1):
        t_service, images = timed(lambda: service([7], args.steps))
        t_loop, image = timed(lambda: inprocess_loop(model, 7, args.steps, 0, mean, std))
        if round_index == 0:
            pixel_difference = float(
                np.abs(images[0].astype(float) - image.astype(float)).mean()  # type: ignore[index, union-attr]
            )
            continue
        single_ratios.append(t_loop / t_service)
        service_seconds.append(t_service)
        loop_seconds.append(t_loop)
        print(f"round {round_index}: service {t_service:.2f} s, loop {t_loop:.2f} s", flush=True)

    channels = list(range(0, 8 * args.features, 8))
    batched_ratios, batched_seconds, sequential_seconds = [], [], []
    for round_index in range(max(1, args.rounds - 1) + 1):
        t_batched, _ = timed(lambda: service(channels, args.batched_steps))
        t_sequential, _ = timed(lambda: [service([c], args.batched_steps) for c in channels])
        if round_index == 0:
            continue
        batched_ratios.append(t_sequential / t_batched)
        batched_seconds.append(t_batched)
        sequential_seconds.append(t_sequential)
        print(
            f"K={args.features}: one request {t_batched:.2f} s, sequential {t_sequential:.2f} s",
            flush=True,
        )

    steps_per_s = args.steps / statistics.median(service_seconds)
    results: dict[str, object] = {
        "steps_per_s": round(steps_per_s, 3),
        "inprocess_steps_per_s": round(args.steps / statistics.median(loop_seconds), 3),
        "ratio_vs_inprocess": round(statistics.median(single_ratios), 3),
        "batched_features_per_s": round(args.features / statistics.median(batched_seconds), 4),
        "sequential_features_per_s": round(
            args.features / statistics.median(sequential_seconds), 4
        ),
        "batched_speedup": round(statistics.median(batched_ratios), 3),
        "first_round_mean_abs_pixel_difference": round(pixel_difference, 3),
        "steps": args.steps,
        "batched_steps": args.batched_steps,
        "features": args.features,
        "rounds": args.rounds,
        "threads": args.threads,
        "device": args.device,
        "architecture": args.architecture,
        "service_seconds_single_feature": round(statistics.median(service_seconds), 3),
        "targets": TARGETS,
    }
    print(
        f"service {results['steps_per_s']} steps/s vs in-process "
        f"{results['inprocess_steps_per_s']}; K={args.features} batched speedup "
        f"{results['batched_speedup']}"
    )
    return results


if __name__ == "__main__":
    main()
