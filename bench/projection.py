"""What a full class-embedding projection costs over a plain forward of the same model.

Run as `HF_HUB_OFFLINE=1 .venv/bin/python bench/projection.py [--rounds N] [--threads T]`.
Everything runs in this one process on CPU: vit_base_patch16_224 (random init, seed 0), a batch
of 8 skimage photos preprocessed once with the model's own transform.

Sides, alternating round by round after one warm-up round:
- forward: the served model's plain forward (inference mode), the baseline;
- core: ProjectToClassSpace's core on the same prepared batch: all 12 blocks, all three
  representations, all 197 tokens, top-5, no importance maps;
- rpc: the same request through a real server on a loopback port and the real client.
Each ratio is the median over rounds of that round's side time / forward time.

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

from vitscope.client import Client
from vitscope_server.core.model.images import ImageInput
from vitscope_server.core.model.specs import ModelSpec
from vitscope_server.core.projection.project import (
    ProjectionLimits,
    ProjectionQuery,
    check_projection,
    prepare_projection,
    run_projections,
)
from vitscope_server.core.runtime.cancel import NEVER_CANCELLED
from vitscope_server.settings import ServerSettings
from vitscope_server.transport.app import create_server

ARCHITECTURE = "vit_base_patch16_224"
MODEL = "vitb"
TARGET_RATIO = 1.5


def timed(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def synchronize(device: torch.device) -> None:
    """Waits for queued GPU work, so that a side's time includes it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    spec = ModelSpec(name=MODEL, architecture=ARCHITECTURE, seed=0)
    settings = ServerSettings(
        host="127.0.0.1",
        port=0,
        metrics_port=-1,
        ui_port=-1,
        builtin_models=False,
        models=[f"{MODEL}=timm:{ARCHITECTURE}@random"],
        default_model=MODEL,
        torch_threads=args.threads,
        device=args.device,
    )
    server = create_server(settings)
    try:
        assert server.registry.wait_until_settled(timeout=300)
        loaded = server.registry.get(MODEL)
        assert loaded.spec.model_dump(include={"architecture", "seed"}) == spec.model_dump(
            include={"architecture", "seed"}
        )
        adapter = loaded.adapter
        pixels = torch.stack([adapter.preprocess(p) for p in photos()])
        on_device = pixels.to(loaded.device)
        images = [ImageInput(preprocessed=p.numpy()) for p in pixels]
        limits = ProjectionLimits(len(images), 10**8, settings.max_result_bytes, 1 << 30)
        checked = check_projection(loaded, ProjectionQuery(), len(images), limits)
        prepared = prepare_projection(loaded, images, checked, limits)

        def forward() -> None:
            with torch.inference_mode():
                adapter.forward(on_device)
                synchronize(loaded.device)

        def core() -> None:
            (outcome,) = run_projections([prepared], NEVER_CANCELLED)
            if isinstance(outcome, BaseException):
                raise outcome
            synchronize(loaded.device)

        with Client(f"127.0.0.1:{server.port}", timeout=600) as client:
            arrays = [p.numpy() for p in pixels]

            def rpc() -> None:
                client.project(arrays, model=MODEL)

            sides = {"forward": forward, "core": core, "rpc": rpc}
            for call in sides.values():
                call()
            seconds: dict[str, list[float]] = {name: [] for name in sides}
            for _ in range(args.rounds):
                for name, call in sides.items():
                    seconds[name].append(timed(call))
                    print(f"{name:8} {seconds[name][-1]:.3f} s", flush=True)
    finally:
        server.stop(0)

    ratios = {
        name: statistics.median(
            s / f for s, f in zip(seconds[name], seconds["forward"], strict=True)
        )
        for name in ("core", "rpc")
    }
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    result = {
        "benchmark": "projection",
        "model": ARCHITECTURE,
        "batch": len(NAMES),
        "threads": args.threads,
        "rounds": args.rounds,
        "ratio_vs_forward": round(ratios["core"], 3),
        "ratio_rpc_vs_forward": round(ratios["rpc"], 3),
        "images_per_s": round(len(NAMES) / medians["core"], 2),
        "images_per_s_rpc": round(len(NAMES) / medians["rpc"], 2),
        "seconds": {name: round(value, 3) for name, value in medians.items()},
        "target_ratio": TARGET_RATIO,
        "meets_target": ratios["core"] <= TARGET_RATIO,
        "torch": torch.__version__,
        "numpy": np.__version__,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
