"""What each Explain method costs in forward passes of the same batch, and the service
against an in-process implementation of the same methods written here.

Run as `HF_HUB_OFFLINE=1 .venv/bin/python bench/explain.py [--rounds N] [--threads T]
[--steps S] [--warmup-rounds W]`. Everything runs on CPU: vit_base_patch16_224 (random init,
seed 0), a batch of 8 skimage photos preprocessed once with the model's own transform.

Sides, alternating round by round after `--warmup-rounds` untimed rounds (default 1; a
plain forward and a one-image call warm up in any case):
- forward: the served model's plain forward (inference mode), the unit of cost;
- service: Explain through a real server on a loopback port and the real client, one call per
  method: rollout, relevancy, integrated gradients (`--steps` points, black baseline, in the
  batch size the server picks);
- in-process: the same three methods written plainly here on the same model object: hooks
  on timm's attention dropout with fused attention off, a float matrix product for rollout,
  retained gradients for relevancy, interpolated batches of the same size for integrated
  gradients (with the prediction's forward and S(x') for completeness, as the service).
Per method, *_vs_forward is the median over rounds of service time / forward time;
ratio_vs_inprocess is the median of (the three service times summed) / (the three
in-process times summed).

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from photos import NAMES, photos
from torch import nn

from vitscope.client import Client
from vitscope.explain import MethodOptions
from vitscope_server.settings import ServerSettings
from vitscope_server.transport.app import create_server

ARCHITECTURE = "vit_base_patch16_224"
MODEL = "vitb"
IG = "integrated_gradients"
METHODS = ("rollout", "relevancy", IG)
TARGET_RATIO = 1.1


def timed(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def attention(
    model: nn.Module, pixels: torch.Tensor, keep_grad: bool
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits and every block's attention probabilities, read at the attention dropout with
    fused attention off for this forward (as the server does)."""
    probs: list[torch.Tensor] = []

    def keep(module: nn.Module, args: object, output: torch.Tensor) -> None:
        if keep_grad:
            output.retain_grad()
        probs.append(output)

    handles = [block.attn.attn_drop.register_forward_hook(keep) for block in model.blocks]
    fused = [block.attn.fused_attn for block in model.blocks]
    for block in model.blocks:
        block.attn.fused_attn = False
    try:
        logits = model(pixels)
    finally:
        for handle in handles:
            handle.remove()
        for block, value in zip(model.blocks, fused, strict=True):
            block.attn.fused_attn = value
    return logits, probs


def rollout(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        _, probs = attention(model, pixels, keep_grad=False)
        eye = torch.eye(probs[0].shape[-1])
        joint = eye
        for a in probs:
            mixed = 0.5 * a.mean(dim=1) + 0.5 * eye
            joint = (mixed / mixed.sum(dim=-1, keepdim=True)) @ joint
        return joint[:, 0, 1:]


def relevancy(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad():
        logits, probs = attention(model, pixels.clone().requires_grad_(True), keep_grad=True)
        targets = logits.argmax(dim=-1)
        logits.gather(1, targets[:, None]).sum().backward()
    with torch.no_grad():
        joint = torch.eye(probs[0].shape[-1]).expand(pixels.shape[0], -1, -1)
        for a in probs:
            assert a.grad is not None
            joint = joint + (a.grad * a).clamp(min=0).mean(dim=1) @ joint
        return joint[:, 0, 1:]


def integrated_gradients(
    model: nn.Module, pixels: torch.Tensor, reference: torch.Tensor, steps: int, batch: int
) -> torch.Tensor:
    with torch.no_grad():
        targets = model(pixels).argmax(dim=-1)
    alphas = (torch.arange(steps) + 0.5) / steps
    points = [(i, a) for i in range(pixels.shape[0]) for a in alphas.tolist()]
    total = torch.zeros_like(pixels)
    for start in range(0, len(points), batch):
        chunk = points[start : start + batch]
        index = torch.tensor([i for i, _ in chunk])
        alpha = torch.tensor([a for _, a in chunk]).view(-1, 1, 1, 1)
        inputs = (reference[index] + alpha * (pixels[index] - reference[index])).requires_grad_(
            True
        )
        with torch.enable_grad():
            model(inputs).gather(1, targets[index][:, None]).sum().backward()
        assert inputs.grad is not None
        total.index_add_(0, index, inputs.grad)
    with torch.no_grad():  # S(x') for the completeness check, as the service reports it
        model(reference)
    return (pixels - reference) * total / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=50, help="integrated gradients' points")
    parser.add_argument(
        "--warmup-rounds", type=int, default=1, help="untimed rounds before the timed ones"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    settings = ServerSettings(
        host="127.0.0.1",
        port=0,
        metrics_port=-1,
        ui_port=-1,
        builtin_models=False,
        models=[f"{MODEL}=timm:{ARCHITECTURE}@random"],
        default_model=MODEL,
        torch_threads=args.threads,
        # A loaded machine's integrated-gradients call can outlast the default connection age.
        max_connection_age_seconds=86400,
    )
    server = create_server(settings)
    try:
        assert server.registry.wait_until_settled(timeout=300)
        loaded = server.registry.get(MODEL)
        model, config = loaded.adapter.root, loaded.adapter.data_config
        pixels = torch.stack([loaded.adapter.preprocess(p) for p in photos()])
        mean = torch.tensor(config.mean).view(1, 3, 1, 1)
        black = (torch.zeros_like(pixels) - mean) / torch.tensor(config.std).view(1, 3, 1, 1)
        arrays = [p.numpy() for p in pixels]
        with Client(f"127.0.0.1:{server.port}", timeout=3600) as client:
            options = {IG: MethodOptions(steps=args.steps)}

            def service(method: str) -> Callable[[], object]:
                return lambda: client.explain(arrays, [method], options=options)

            batch = client.explain(arrays[:1], [IG], options={IG: MethodOptions(steps=1)})
            ig_batch = int(batch.methods[IG]["batch_size"])
            sides: dict[str, Callable[[], object]] = {
                "forward": lambda: model(pixels),
                **{f"service.{m}": service(m) for m in METHODS},
                "inprocess.rollout": lambda: rollout(model, pixels),
                "inprocess.relevancy": lambda: relevancy(model, pixels),
                f"inprocess.{IG}": lambda: integrated_gradients(
                    model, pixels, black, args.steps, ig_batch
                ),
            }
            with torch.inference_mode():
                sides["forward"]()
            seconds: dict[str, list[float]] = {name: [] for name in sides}
            for round_index in range(args.warmup_rounds + args.rounds):
                for name, call in sides.items():
                    if name == "forward":
                        with torch.inference_mode():
                            elapsed = timed(call)
                    else:
                        elapsed = timed(call)
                    if round_index >= args.warmup_rounds:
                        seconds[name].append(elapsed)
                    print(f"round {round_index} {name:26} {elapsed:.3f} s", flush=True)
    finally:
        server.stop(0)

    def median_ratio(side: list[float], base: list[float]) -> float:
        return statistics.median(s / b for s, b in zip(side, base, strict=True))

    forward = seconds["forward"]
    service_total = [sum(v) for v in zip(*(seconds[f"service.{m}"] for m in METHODS), strict=True)]
    inprocess_total = [
        sum(v) for v in zip(*(seconds[f"inprocess.{m}"] for m in METHODS), strict=True)
    ]
    ratio = median_ratio(service_total, inprocess_total)
    result = {
        "benchmark": "explain",
        "model": ARCHITECTURE,
        "batch": len(NAMES),
        "threads": args.threads,
        "rounds": args.rounds,
        "ig_steps": args.steps,
        "ig_batch_size": ig_batch,
        "seconds": {name: round(statistics.median(v), 3) for name, v in seconds.items()},
        "rollout_vs_forward": round(median_ratio(seconds["service.rollout"], forward), 3),
        "relevancy_vs_forward": round(median_ratio(seconds["service.relevancy"], forward), 3),
        "ig_vs_forward": round(median_ratio(seconds[f"service.{IG}"], forward), 3),
        "ratio_vs_inprocess": round(ratio, 3),
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio <= TARGET_RATIO,
        "torch": torch.__version__,
        "numpy": np.__version__,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
