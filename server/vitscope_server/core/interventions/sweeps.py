"""Declared sweeps expanded on the server into variants, with the shape of their result."""

from __future__ import annotations

from dataclasses import dataclass

from vitscope_server.core.interventions.edits import (
    Edit,
    Operation,
    Selection,
    Sweep,
    SweepKind,
    Variant,
)
from vitscope_server.core.model.adapters import ModelAdapter
from vitscope_server.core.model.sites import resolve_site
from vitscope_server.core.model.tokens import TokenMode
from vitscope_server.core.runtime.errors import (
    FailedPrecondition,
    InvalidArgument,
    require_in_range,
)

PATCH_PARTS = ("out", "attn.out", "mlp.out")
HEAD_SWEEP_OPERATIONS = (Operation.ZERO, Operation.MEAN, Operation.PATCH)


@dataclass(frozen=True)
class SweepPlan:
    sweep: Sweep  # effective: blocks filled in
    shape: tuple[int, ...]  # [blocks, grid_h, grid_w] or [blocks, heads]
    axes: tuple[str, ...]
    variants: tuple[Variant, ...]  # row-major over shape


def _blocks(adapter: ModelAdapter, sweep: Sweep) -> tuple[int, ...]:
    count = len(adapter.blocks)
    require_in_range("sweep.blocks", sweep.blocks, 0, count - 1)
    if len(set(sweep.blocks)) != len(sweep.blocks):
        raise InvalidArgument("sweep.blocks", "each block may appear once")
    return sweep.blocks or tuple(range(count))


def _uniform(adapter: ModelAdapter, blocks: tuple[int, ...], what: str, value: object) -> None:
    first = adapter.blocks[blocks[0]]
    for index in blocks:
        if getattr(adapter.blocks[index], what) != getattr(first, what):
            raise FailedPrecondition(
                f"sweep: block {index} has another {what} than block {blocks[0]} "
                f"({value}); sweep blocks of one {what} (sweep.blocks)",
                subject=adapter.spec.name,
                field="sweep.blocks",
            )


def expand(adapter: ModelAdapter, sweep: Sweep) -> SweepPlan:
    blocks = _blocks(adapter, sweep)
    if sweep.kind is SweepKind.PATCH_POSITIONS:
        if sweep.part not in PATCH_PARTS:
            raise InvalidArgument("sweep.part", f"{sweep.part[:48]!r}; allowed {list(PATCH_PARTS)}")
        _uniform(adapter, blocks, "grid", adapter.blocks[blocks[0]].grid)
        rows, cols = adapter.blocks[blocks[0]].grid
        variants = tuple(
            Variant(
                (
                    Edit(
                        f"blocks.{block}.{sweep.part}",
                        Operation.PATCH,
                        Selection(TokenMode.POSITIONS, positions=((row, col),)),
                    ),
                ),
                f"blocks.{block}.{sweep.part}@({row},{col})",
            )
            for block in blocks
            for row in range(rows)
            for col in range(cols)
        )
        effective = Sweep(sweep.kind, sweep.part, Operation.PATCH, blocks)
        return SweepPlan(effective, (len(blocks), rows, cols), ("block", "row", "col"), variants)
    if sweep.operation not in HEAD_SWEEP_OPERATIONS:
        raise InvalidArgument(
            "sweep.operation",
            f"{sweep.operation.value}; allowed {[o.value for o in HEAD_SWEEP_OPERATIONS]}",
        )
    for block in blocks:  # refuses a block without heads, with the cause
        resolve_site(adapter, f"blocks.{block}.attn.heads", "sweep.blocks")
    heads = [adapter.blocks[b].heads for b in blocks]
    counts = {h.heads for h in heads if h is not None}
    if len(counts) != 1:
        raise FailedPrecondition(
            "sweep: the blocks' heads differ in number or are unavailable "
            "(see DescribeModel's unavailable sites for blocks.{i}.attn.heads)",
            subject=adapter.spec.name,
            field="sweep.blocks",
        )
    (count,) = counts
    variants = tuple(
        Variant(
            (Edit(f"blocks.{block}.attn.heads", sweep.operation, Selection(heads=(head,))),),
            f"blocks.{block}.attn.heads[{head}]",
        )
        for block in blocks
        for head in range(count)
    )
    effective = Sweep(sweep.kind, "attn.heads", sweep.operation, blocks)
    return SweepPlan(effective, (len(blocks), count), ("block", "head"), variants)
