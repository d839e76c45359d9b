"""A residual activation-patching sweep (every block x every patch position, one base/source
pair) through the service, against the same sweep in-process with plain forward hooks and
with nnsight.

Run as `HF_HUB_OFFLINE=1 .venv/bin/python bench/interventions.py [--rounds N] [--threads T]
[--size S]`. CPU: vit_tiny_patch16_224 (random init, seed 0) at S x S pixels (default 96,
a 6 x 6 grid: 432 variants), two skimage photos as base and source.

Sides, alternating round by round after one untimed round of each (the machine's load
changes over a run; each round's ratios compare sides run back to back):
- service: Intervene's PATCH_POSITIONS sweep through a real server on a loopback port and
  the real client, in the variants per forward the server picks;
- hooks: the same sweep written here with plain forward hooks on the same model object:
  one source forward caching every block's output, then batches of the same number of
  variants, each row patched at its block and token;
- nnsight: the same batches with nnsight (its own virtualenv, beside the interpreter's
  environment, created with `pip install nnsight timm`; skipped with the reason when absent).
Every side's result is checked against the hooks'. ratio_vs_hooks and ratio_vs_nnsight
are the medians over rounds of service time / the other's time (below 1: the service is
faster); variants_per_s is the variants over the service's median time.

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from photos import photos

from vitscope.client import Client
from vitscope_server.settings import ServerSettings
from vitscope_server.transport.app import create_server

ARCHITECTURE = "vit_tiny_patch16_224"
NNSIGHT_PYTHON = Path(sys.prefix) / "nnsight" / "bin" / "python"
SCRIPT = Path(__file__).resolve().parent / "external" / "nnsight_sweep.py"


def hooks_sweep(
    model: torch.nn.Module,
    base: torch.Tensor,
    source: torch.Tensor,
    prefix: int,
    grid: tuple[int, int],
    chunk: int,
) -> np.ndarray:
    """The sweep with plain hooks: cached source outputs, each row patched at one token."""
    blocks = list(model.blocks)
    cached: dict[int, torch.Tensor] = {}
    handles = [
        b.register_forward_hook(lambda m, a, o, i=i: cached.__setitem__(i, o))
        for i, b in enumerate(blocks)
    ]
    with torch.inference_mode():
        model(source)
    for h in handles:
        h.remove()
    rows, cols = grid
    variants = [
        (b, prefix + r * cols + c)
        for b in range(len(blocks))
        for r in range(rows)
        for c in range(cols)
    ]
    outputs = []
    for first in range(0, len(variants), chunk):
        part = variants[first : first + chunk]

        def patch(
            module: Any,
            args: Any,
            output: torch.Tensor,
            block: int,
            part: list[tuple[int, int]] = part,
        ) -> torch.Tensor:
            edited = output.clone()
            for j, (b, token) in enumerate(part):
                if b == block:
                    edited[j, token] = cached[block][0, token]
            return edited

        handles = [
            b.register_forward_hook(lambda m, a, o, i=i: patch(m, a, o, i))
            for i, b in enumerate(blocks)
        ]
        with torch.inference_mode():
            outputs.append(model(base.repeat(len(part), 1, 1, 1)))
        for h in handles:
            h.remove()
    return torch.cat(outputs).numpy()


def timed(call: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    result = call()
    return time.perf_counter() - started, result


def nnsight_side(
    spec: dict[str, Any], base: torch.Tensor, source: torch.Tensor, folder: Path
) -> tuple[float | None, np.ndarray | None, str]:
    if not NNSIGHT_PYTHON.exists():
        return None, None, f"no nnsight virtualenv at {NNSIGHT_PYTHON.parent.parent}"
    data = folder / "inputs.npz"
    np.savez(data, spec=json.dumps(spec), base=base.numpy(), source=source.numpy())
    logits = folder / "nnsight_logits.npy"
    done = subprocess.run(
        [str(NNSIGHT_PYTHON), str(SCRIPT), str(data), str(logits)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        return None, None, done.stderr.strip().splitlines()[-1][:300] if done.stderr else "failed"
    return float(json.loads(done.stdout.strip().splitlines()[-1])["seconds"]), np.load(logits), ""


def check_kl(model: torch.nn.Module, base: torch.Tensor, logits: np.ndarray, swept: Any) -> None:
    """The hooks' logits give the service's KL per variant."""
    with torch.inference_mode():
        base_log = torch.log_softmax(model(base), -1)
    patched = torch.log_softmax(torch.from_numpy(logits), -1)
    kl = (base_log.exp() * (base_log - patched)).sum(-1).numpy()
    np.testing.assert_allclose(kl.reshape(swept.values.shape[1:]), swept.values[0], atol=1e-5)


def serve(folder: Path, spec: dict[str, Any], threads: int) -> Any:
    (folder / "models.yaml").write_text(yaml.safe_dump({"models": [spec]}))
    settings = ServerSettings(
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        models_file=folder / "models.yaml",
        torch_threads=threads,
    )
    running = create_server(settings)
    assert running.registry.wait_until_settled(timeout=300)
    return running


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=96)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = {"name": "tiny", "family": "timm", "architecture": ARCHITECTURE, "seed": 0}
    spec["kwargs"] = {"img_size": args.size}
    folder = Path(tempfile.mkdtemp())
    running = serve(folder, spec, args.threads)
    times: dict[str, list[float]] = {"service": [], "hooks": [], "nnsight": []}
    why = ""
    try:
        adapter = running.registry.get("tiny").adapter
        model = adapter.root
        base, source = (adapter.preprocess(p)[None] for p in photos()[:2])
        grid, prefix = adapter.grid, adapter.num_prefix_tokens
        with Client(f"127.0.0.1:{running.port}", timeout=600) as client:

            def service() -> Any:
                pair = ([base[0].numpy()], [source[0].numpy()])
                return client.patching_sweep(*pair, model="tiny", metric="kl")

            swept = service()
            chunk = swept.variants_per_forward
            extra = {"threads": args.threads, "prefix": prefix, "grid": list(grid)}
            nn_spec = {**spec, **extra, "chunk": chunk, "rounds": 1}
            hooks_logits = hooks_sweep(model, base, source, prefix, grid, chunk)
            check_kl(model, base, hooks_logits, swept)
            for _ in range(args.rounds):
                times["service"].append(timed(service)[0])
                times["hooks"].append(
                    timed(lambda: hooks_sweep(model, base, source, prefix, grid, chunk))[0]
                )
                seconds, logits, why = nnsight_side(nn_spec, base, source, folder)
                if seconds is not None and logits is not None:
                    np.testing.assert_allclose(logits, hooks_logits, atol=1e-4)
                    times["nnsight"].append(seconds)
    finally:
        running.stop(0)
    print(json.dumps(summary(args, swept, chunk, times, why)))


def summary(
    args: argparse.Namespace, swept: Any, chunk: int, times: dict[str, list[float]], why: str
) -> dict[str, Any]:
    variants = int(np.prod(swept.sweep_shape))
    service = statistics.median(times["service"])

    def ratio(side: str) -> float | None:
        if not times[side]:
            return None
        pairs = zip(times["service"], times[side], strict=False)
        return round(statistics.median(s / o for s, o in pairs), 3)

    def median(side: str) -> float | None:
        return round(statistics.median(times[side]), 4) if times[side] else None

    return {
        "model": ARCHITECTURE,
        "size": args.size,
        "rounds": args.rounds,
        "variants": variants,
        "variants_per_forward": chunk,
        "service_s": round(service, 4),
        "hooks_s": median("hooks"),
        "nnsight_s": median("nnsight"),
        "nnsight_skipped": why if not times["nnsight"] else "",
        "ratio_vs_hooks": ratio("hooks"),
        "ratio_vs_nnsight": ratio("nnsight"),
        "variants_per_s": round(variants / service, 1),
    }


if __name__ == "__main__":
    main()
