"""`vitscope-server scan` and `vitscope-server scan-merge`: sharded top-activating-image scans."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vitscope_server.core.activations.scan import merge_parts, scan_shard, write_json
from vitscope_server.core.activations.top_images import ScanQuery
from vitscope_server.core.model.datasets import BUILTIN_DIGITS, parse_shard
from vitscope_server.core.runtime.errors import VitscopeError
from vitscope_server.model_selection import resolve_device, select_spec


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """--model, --models-file and --model-spec: models named exactly as `serve` names them."""
    parser.add_argument("--model", required=True, help="name of the model, as served")
    parser.add_argument("--models-file", type=Path, help="YAML models file, as for serve")
    parser.add_argument(
        "--model-spec",
        action="append",
        default=[],
        help="NAME=FAMILY:ARCH[@WEIGHTS] as for serve --models; repeatable",
    )


def add_scan_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_flags(parser)
    parser.add_argument("--data", required=True, help=f"image folder, or {BUILTIN_DIGITS}")
    parser.add_argument("--site", required=True)
    parser.add_argument("--channel", type=int, nargs="+", required=True)
    parser.add_argument("--top-k", type=int, required=True)
    parser.add_argument("--shard", default="0/1", help="I/N: the I-th of N shards (0-based)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, required=True, help="part file (.json)")


def add_merge_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("parts", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--partial", action="store_true", help="write the merge even when shards are missing"
    )


def scan(args: argparse.Namespace) -> None:
    try:
        spec = select_spec(args.model, args.models_file, args.model_spec)
        part = scan_shard(
            spec,
            args.data,
            ScanQuery(args.site, tuple(args.channel), args.top_k),
            parse_shard(args.shard),
            batch=args.batch,
            device=str(resolve_device(args.device)),
        )
    except VitscopeError as exc:
        raise SystemExit(f"vitscope-server scan: {exc}") from None
    write_json(part, args.out)
    print(f"wrote {args.out}: shard {args.shard}, {part['scanned']} of {part['num_items']} items")


def merge(args: argparse.Namespace) -> None:
    try:
        merged = merge_parts([json.loads(p.read_text()) for p in args.parts])
    except OSError as exc:
        raise SystemExit(f"vitscope-server scan-merge: cannot read a part: {exc}") from None
    except VitscopeError as exc:
        raise SystemExit(f"vitscope-server scan-merge: {exc}") from None
    if not merged["complete"] and not args.partial:
        raise SystemExit(
            f"vitscope-server scan-merge: shards {merged['shards']} do not cover the data; "
            "pass --partial to merge them anyway"
        )
    write_json(merged, args.out)
    state = "complete" if merged["complete"] else "partial"
    print(f"wrote {args.out}: {len(merged['shards'])} shards, {state}")
