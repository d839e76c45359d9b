"""Request pieces every RPC family shares: token selection and class references."""

from __future__ import annotations

from collections.abc import Sequence

from vitscope.enums import short_names
from vitscope.v1 import common_pb2

TOKEN_MODES = short_names(common_pb2.TokenSelectionMode)

# A class by index or name; None: the model's own prediction.
ClassLike = int | str | None


def token_selection(
    tokens: str | None, indices: Sequence[int] = (), positions: Sequence[tuple[int, int]] = ()
) -> common_pb2.TokenSelection:
    """tokens: all | prefix | patches | indices | positions, or None for the RPC's default."""
    return common_pb2.TokenSelection(
        mode=TOKEN_MODES[tokens] if tokens else common_pb2.TOKEN_SELECTION_MODE_UNSPECIFIED,
        indices=list(indices),
        positions=[common_pb2.PatchPosition(row=r, col=c) for r, c in positions],
    )


def class_ref(target: ClassLike) -> common_pb2.ClassRef:
    if target is None:
        return common_pb2.ClassRef()
    if isinstance(target, str):
        return common_pb2.ClassRef(name=target)
    return common_pb2.ClassRef(index=int(target))
