"""The residual patching sweep with nnsight, run in nnsight's own virtualenv: reads the
model spec and pixels from an .npz, prints the seconds per sweep (median) as JSON."""

from __future__ import annotations

import json
import statistics
import sys
import time

import numpy as np
import timm
import torch
from nnsight import NNsight


def main() -> None:
    data = np.load(sys.argv[1])
    spec = json.loads(str(data["spec"]))
    torch.set_num_threads(int(spec["threads"]))
    torch.manual_seed(spec["seed"])
    model = timm.create_model(spec["architecture"], pretrained=False, **spec["kwargs"]).eval()
    wrapped = NNsight(model)
    base, source = torch.from_numpy(data["base"]), torch.from_numpy(data["source"])
    prefix, (rows, cols), chunk = spec["prefix"], spec["grid"], spec["chunk"]
    blocks = len(model.blocks)
    variants = [
        (b, prefix + r * cols + c) for b in range(blocks) for r in range(rows) for c in range(cols)
    ]

    def sweep() -> np.ndarray:
        """Containers made outside each trace receive its values (nnsight runs the trace's
        body on its own and hands back only what it was given)."""
        saved: dict[int, torch.Tensor] = {}
        outputs: list[torch.Tensor] = []
        with torch.no_grad():
            with wrapped.trace(source):
                for b in range(blocks):
                    saved[b] = wrapped.blocks[b].output.save()
            for first in range(0, len(variants), chunk):
                part = variants[first : first + chunk]
                with wrapped.trace(base.repeat(len(part), 1, 1, 1)):
                    for b in range(blocks):
                        here = [(j, t) for j, (block, t) in enumerate(part) if block == b]
                        if here:
                            hidden = wrapped.blocks[b].output
                            for j, t in here:
                                hidden[j, t] = saved[b][0, t]
                    outputs.append(wrapped.output.save())
        return torch.cat([torch.as_tensor(o) for o in outputs]).numpy()

    sweep()
    times = []
    for _ in range(int(spec["rounds"])):
        started = time.perf_counter()
        logits = sweep()
        times.append(time.perf_counter() - started)
    np.save(sys.argv[2], logits)
    print(json.dumps({"seconds": statistics.median(times)}))


if __name__ == "__main__":
    main()
