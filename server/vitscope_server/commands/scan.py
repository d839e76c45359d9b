"""`vitscope-server scan` and `vitscope-server scan-merge`: sharded top-activating-image scans."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import Field
from pydantic_settings import CliPositionalArg, CliVariadicArg

from vitscope_server.core.activations.scan import merge_parts, scan_shard, write_json
from vitscope_server.core.activations.top_images import ScanQuery
from vitscope_server.core.model.datasets import BUILTIN_DIGITS, parse_shard
from vitscope_server.core.runtime.errors import VitscopeError
from vitscope_server.model_selection import resolve_device, select_spec
from vitscope_server.settings import JobSettings, ModelJobSettings


class ScanSettings(ModelJobSettings):
    """Top activating images of one dataset shard, written as a part file (.json)."""

    data: str = Field(description=f"Image folder, or {BUILTIN_DIGITS} (the held-out digits).")
    site: str = Field(description="Site whose channels are ranked, e.g. blocks.3.mlp.hidden.")
    channel: CliVariadicArg[list[int]] = Field(description="Channels to rank, one or more.")
    top_k: int = Field(description="Images kept per channel.")
    shard: str = Field("0/1", description="I/N: the I-th of N shards (0-based).")
    batch: int = Field(64, ge=1, description="Images per forward.")
    out: Path = Field(description="Part file (.json).")


class ScanMergeSettings(JobSettings):
    """Merge scan parts into one top-k, the same as one scan over all the data."""

    parts: CliPositionalArg[list[Path]] = Field(description="Part files of one scan.")
    out: Path = Field(description="Merged file (.json).")
    partial: bool = Field(False, description="Write the merge even when shards are missing.")


def scan(settings: ScanSettings) -> None:
    try:
        spec = select_spec(settings.model, settings.models_file, settings.model_spec)
        part = scan_shard(
            spec,
            settings.data,
            ScanQuery(settings.site, tuple(settings.channel), settings.top_k),
            parse_shard(settings.shard),
            batch=settings.batch,
            device=str(resolve_device(settings.device)),
        )
    except VitscopeError as exc:
        raise SystemExit(f"vitscope-server scan: {exc}") from None
    write_json(part, settings.out)
    print(
        f"wrote {settings.out}: shard {settings.shard}, "
        f"{part['scanned']} of {part['num_items']} items"
    )


def merge(settings: ScanMergeSettings) -> None:
    try:
        merged = merge_parts([json.loads(p.read_text()) for p in settings.parts])
    except OSError as exc:
        raise SystemExit(f"vitscope-server scan-merge: cannot read a part: {exc}") from None
    except VitscopeError as exc:
        raise SystemExit(f"vitscope-server scan-merge: {exc}") from None
    if not merged["complete"] and not settings.partial:
        raise SystemExit(
            f"vitscope-server scan-merge: shards {merged['shards']} do not cover the data; "
            "pass --partial to merge them anyway"
        )
    write_json(merged, settings.out)
    state = "complete" if merged["complete"] else "partial"
    print(f"wrote {settings.out}: {len(merged['shards'])} shards, {state}")
