"""A residual activation-patching sweep (every block x every patch position, one base/source
pair) through the service, against the same sweep in-process with plain forward hooks and
with nnsight.

Run as `HF_HUB_OFFLINE=1 .venv/bin/python bench/interventions.py [--rounds N] [--threads T]
[--size S]`. CPU: vit_tiny_patch16_224 (random init, seed 0) at S x S pixels (default 96,
a 6 x 6 grid: 432 variants), two skimage photos as base and source.

Sides, each timed over `--rounds` rounds after one untimed round, median kept:
- service: Intervene's PATCH_POSITIONS sweep through a real server on a loopback port and
  the real client, in the variants per forward the server picks;
- hooks: the same sweep written here with plain forward hooks on the same model object:
  one source forward caching every block's output, then batches of the same number of
  variants, each row patched at its block and token;
- nnsight: the same batches with nnsight (its own virtualenv, beside the interpreter's
  environment, created with `pip install nnsight timm`; skipped with the reason when absent).
Every side's logits are checked against the service's. ratio_vs_hooks and
ratio_vs_nnsight are service time / the other's time (below 1: the service is faster).

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


def median_time(call: Any, rounds: int) -> tuple[float, Any]:
    result = call()
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=96)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kwargs = {"img_size": args.size}
    spec = {
        "name": "tiny",
        "family": "timm",
        "architecture": ARCHITECTURE,
        "seed": 0,
        "kwargs": kwargs,
    }
    folder = Path(tempfile.mkdtemp())
    (folder / "models.yaml").write_text(yaml.safe_dump({"models": [spec]}))
    settings = ServerSettings(
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        models_file=folder / "models.yaml",
        torch_threads=args.threads,
    )
    running = create_server(settings)
    try:
        assert running.registry.wait_until_settled(timeout=300)
        adapter = running.registry.get("tiny").adapter
        pictures = photos()[:2]
        base, source = (adapter.preprocess(p)[None] for p in pictures)
        with Client(f"127.0.0.1:{running.port}", timeout=600) as client:

            def service() -> Any:
                return client.patching_sweep(
                    [base[0].numpy()], [source[0].numpy()], model="tiny", metric="kl"
                )

            service_s, swept = median_time(service, args.rounds)
            chunk = swept.variants_per_forward
            grid, prefix = adapter.grid, adapter.num_prefix_tokens
            model = running.registry.get("tiny").adapter.root
            hooks_s, hooks_logits = median_time(
                lambda: hooks_sweep(model, base, source, prefix, grid, chunk), args.rounds
            )
            base_logp = torch.log_softmax(model(base).detach(), -1)
            kl = (
                base_logp.exp()
                * (base_logp - torch.log_softmax(torch.from_numpy(hooks_logits), -1))
            ).sum(-1)
            np.testing.assert_allclose(
                kl.numpy().reshape(swept.values.shape[1:]), swept.values[0], atol=1e-5
            )
            nn_spec = {
                **spec,
                "threads": args.threads,
                "prefix": prefix,
                "grid": list(grid),
                "chunk": chunk,
                "rounds": args.rounds,
            }
            nnsight_s, nnsight_logits, why = nnsight_side(nn_spec, base, source, folder)
            if nnsight_logits is not None:
                np.testing.assert_allclose(nnsight_logits, hooks_logits, atol=1e-4)
    finally:
        running.stop(0)
    variants = int(np.prod(swept.sweep_shape))
    summary = {
        "model": ARCHITECTURE,
        "size": args.size,
        "variants": variants,
        "variants_per_forward": chunk,
        "service_s": round(service_s, 4),
        "hooks_s": round(hooks_s, 4),
        "nnsight_s": None if nnsight_s is None else round(nnsight_s, 4),
        "nnsight_skipped": why,
        "ratio_vs_hooks": round(service_s / hooks_s, 3),
        "ratio_vs_nnsight": None if nnsight_s is None else round(service_s / nnsight_s, 3),
        "variants_per_s": round(variants / service_s, 1),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
