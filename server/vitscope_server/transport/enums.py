"""Wire enums <-> core values, with errors that name the field and the allowed values."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import Enum
from typing import TYPE_CHECKING, Any, TypeVar

from vitscope.enums import UNSPECIFIED, V, short_names

if TYPE_CHECKING:
    from google.protobuf.internal.enum_type_wrapper import _EnumTypeWrapper
from vitscope_server.core.runtime.errors import InvalidArgument

T = TypeVar("T")


def enum_value(mapping: Mapping[Any, T], value: int, field: str, enum_type: Any) -> T:
    """The core value of a wire enum; INVALID_ARGUMENT naming the field and the allowed names."""
    try:
        return mapping[value]
    except KeyError:
        allowed = ", ".join(enum_type.Name(v) for v in mapping)
        raise InvalidArgument(field, f"value {value} not allowed; allowed: {allowed}") from None


def enum_values(
    mapping: Mapping[Any, T], values: Iterable[int], field: str, enum_type: Any
) -> tuple[T, ...]:
    return tuple(enum_value(mapping, v, f"{field}[{i}]", enum_type) for i, v in enumerate(values))


E = TypeVar("E", bound=Enum)


def wire_to_core(
    enum: _EnumTypeWrapper[V],
    core: type[E],
    *,
    unspecified: E | None = None,
    only: Iterable[E] | None = None,
) -> dict[V, E]:
    """Wire value -> core member with the same short name, for the members in `only` (default
    all); the zero value maps to `unspecified` when given. A core member the wire lacks fails
    here, at import, not on a request."""
    wire = short_names(enum, unspecified=True)
    members = list(core) if only is None else list(only)
    mapping = {wire[m.value]: m for m in members if m.value != UNSPECIFIED}
    if unspecified is not None:
        mapping[wire[UNSPECIFIED]] = unspecified
    elif UNSPECIFIED in {m.value for m in members}:
        mapping[wire[UNSPECIFIED]] = core(UNSPECIFIED)
    return mapping


def core_to_wire(enum: _EnumTypeWrapper[V], core: type[E]) -> dict[E, V]:
    """Core member -> wire value with the same short name, for every member of `core`."""
    wire = short_names(enum, unspecified=True)
    return {member: wire[member.value] for member in core}
