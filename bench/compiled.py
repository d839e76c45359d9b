"""compile_blocks against eager, through the service, same run.

Run as `HF_HUB_OFFLINE=1 .venv/bin/python bench/compiled.py [--reps N] [--threads T]
[--device cpu|cuda] [--architecture NAME]` (or `make bench-compiled`). Two real servers on
loopback ports serve the same randomly initialized model (vit_tiny_patch16_224 unless
--architecture names another timm ViT), one with `compile_blocks`; a batch of 8
skimage photos at 224 px goes to both as float32, asking for blocks.11.out. The first call
of the compiled server compiles (timed apart: a minute or more on a CPU); then the two
alternate call by call and the ratio is the median of per-round compiled / eager times.
The largest difference between the two results is reported against the documented
tolerance. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from photos import photos

from vitscope.client import Client
from vitscope_server.settings import ServerSettings
from vitscope_server.transport.app import RunningServer, create_server

ARCHITECTURE = "vit_tiny_patch16_224"
SITE = "blocks.11.out"
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15, help="timed rounds (default 15)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--architecture", default=ARCHITECTURE, help="a timm ViT (random init)")
    return parser.parse_args()


def server(args: argparse.Namespace, folder: Path, compiled: bool) -> RunningServer:
    models = folder / f"models-{compiled}.yaml"
    spec = {"name": "tiny", "family": "timm", "architecture": args.architecture, "seed": 0}
    models.write_text(yaml.safe_dump({"models": [spec]}))
    settings = ServerSettings(
        host="127.0.0.1",
        port=0,
        metrics_port=-1,
        models_file=models,
        builtin_models=False,
        default_model="tiny",
        device=args.device,
        torch_threads=args.threads,
        compile_blocks=compiled,
    )
    running = create_server(settings)
    assert running.registry.wait_until_settled(timeout=300)
    return running


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    folder = Path(__file__).resolve().parent / "results"
    folder.mkdir(exist_ok=True)
    eager_server, compiled_server = server(args, folder, False), server(args, folder, True)
    try:
        with (
            Client(f"127.0.0.1:{eager_server.port}", timeout=900) as eager,
            Client(f"127.0.0.1:{compiled_server.port}", timeout=900) as compiled,
        ):
            size = eager.describe("tiny").input_size[1]
            batch = [np.asarray(p.resize((size, size))) for p in photos()[:8]]
            started = time.perf_counter()
            fast = compiled.activations(batch, [SITE], model="tiny")[SITE]
            compile_seconds = time.perf_counter() - started
            slow = eager.activations(batch, [SITE], model="tiny")[SITE]
            difference = float(np.abs(fast - slow).max())
            within = bool(np.allclose(fast, slow, **TOLERANCE))
            ratios, times = [], {"eager": [], "compiled": []}
            for _ in range(args.reps):
                for name, client in (("eager", eager), ("compiled", compiled)):
                    started = time.perf_counter()
                    client.activations(batch, [SITE], model="tiny")
                    times[name].append(time.perf_counter() - started)
                ratios.append(times["compiled"][-1] / times["eager"][-1])
    finally:
        eager_server.stop(0)
        compiled_server.stop(0)
    report = {
        "ratio_compiled_vs_eager": round(statistics.median(ratios), 3),
        "eager_ms": round(statistics.median(times["eager"]) * 1e3, 2),
        "compiled_ms": round(statistics.median(times["compiled"]) * 1e3, 2),
        "first_compiled_call_s": round(compile_seconds, 1),
        "max_abs_difference": difference,
        "within_tolerance": within,
        "tolerance": TOLERANCE,
        "device": args.device,
        "architecture": args.architecture,
        "torch_threads": args.threads,
    }
    print(f"compiled / eager {report['ratio_compiled_vs_eager']} (lower is faster)")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
