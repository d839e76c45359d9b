"""Sharded top-activating-image scans for batch jobs (`vitscope-server scan`, `vitscope-server scan-merge`).

A dataset too large for one machine is split by its sorted item list into n contiguous
shards; shard i is scanned with the same core code as TopActivatingImages and written as
a JSON part file. Merging the parts keeps the best k per channel by (score, index), which
is exactly the top-k of one scan over everything. Each part records what produced it, so
parts of different scans are never merged.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitscope_server.core.activations.top_images import Hit, ScanItem, ScanQuery, TopImageScan, best
from vitscope_server.core.model.datasets import Shard, dataset, shard_range
from vitscope_server.core.model.loading import load_model
from vitscope_server.core.model.provenance import library_versions
from vitscope_server.core.model.specs import ModelSpec
from vitscope_server.core.runtime.atomic_files import write_text_atomically
from vitscope_server.core.runtime.cancel import NEVER_CANCELLED
from vitscope_server.core.runtime.errors import InvalidArgument, Reason

PART_FORMAT = "vitscope-scan/1"
# Fields every part of one scan shares.
IDENTITY = ("format", "model", "weights_identity", "site", "channels", "top_k", "data", "num_items")


def scan_shard(
    spec: ModelSpec,
    data: str,
    query: ScanQuery,
    shard: Shard,
    batch: int = 64,
    device: str = "cpu",
    max_pixels: int = 40_000_000,
) -> dict[str, Any]:
    """Scans shard `shard` of `data` and returns its part (JSON-ready)."""
    names, load = dataset(data)
    loaded = load_model(spec, torch.device(device))
    scan = TopImageScan(loaded, query)
    indices = shard_range(len(names), shard)
    for start in range(indices.start, indices.stop, batch):
        chunk = range(start, min(start + batch, indices.stop))
        items = [ScanItem(i, names[i], load(i)) for i in chunk]
        scan.add(scan.prepare(items, max_pixels), items, NEVER_CANCELLED)
    result = scan.result()
    return {
        "format": PART_FORMAT,
        "model": spec.name,
        "weights_identity": loaded.weights_identity,
        "site": result.query.site,
        "channels": list(result.query.channels),
        "top_k": result.query.top_k,
        "data": data,
        "num_items": len(names),
        "shards": [[shard.index, shard.count]],
        "scanned": result.scanned,
        "libraries": library_versions(),
        "device": device,
        "top": [_channel_json(c, hits) for c, hits in result.tops.items()],
    }


def _channel_json(channel: int, hits: Sequence[Hit]) -> dict[str, Any]:
    return {
        "channel": channel,
        "top": [
            {
                "index": h.index,
                "path": h.path,
                "score": h.score,
                "patch_map": np.asarray(h.patch_map).tolist(),
            }
            for h in hits
        ],
    }


def _hits(entries: list[dict[str, Any]]) -> list[Hit]:
    return [
        Hit(int(e["index"]), str(e["path"]), float(e["score"]), np.asarray(e["patch_map"]))
        for e in entries
    ]


def merge_parts(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One part holding the best k per channel of all parts; refuses parts of other scans or
    shards given twice. `complete` says whether every shard is in."""
    if not parts:
        raise InvalidArgument("parts", "no parts given", reason=Reason.FIELD_REQUIRED)
    first = parts[0]
    for number, part in enumerate(parts):
        if part.get("format") != PART_FORMAT:
            raise InvalidArgument(f"parts[{number}]", f"not a {PART_FORMAT} file")
        different = [key for key in IDENTITY if part.get(key) != first.get(key)]
        if different:
            raise InvalidArgument(
                f"parts[{number}]",
                f"differs from part 0 in {different}; parts of different scans cannot be merged",
            )
    shards = [tuple(s) for part in parts for s in part["shards"]]
    counts = {count for _, count in shards}
    if len(counts) != 1:
        raise InvalidArgument("parts", f"parts split the data differently: {sorted(counts)}")
    if len(set(shards)) != len(shards):
        raise InvalidArgument("parts", f"a shard is given twice: {sorted(shards)}")
    count = counts.pop()
    top = []
    for column, channel in enumerate(first["channels"]):
        hits = [hit for part in parts for hit in _hits(part["top"][column]["top"])]
        top.append(_channel_json(channel, best(hits, first["top_k"])))
    return {
        **{key: first[key] for key in IDENTITY},
        "shards": [list(s) for s in sorted(shards)],
        "complete": len(shards) == count,
        "scanned": sum(int(part["scanned"]) for part in parts),
        "libraries": first["libraries"],
        "device": first["device"],
        "top": top,
    }


def write_json(document: dict[str, Any], out: Path) -> None:
    """Written atomically, so a retried or killed job never leaves half a part."""
    write_text_atomically(out, json.dumps(document))
