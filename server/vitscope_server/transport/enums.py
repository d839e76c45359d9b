"""Wire enums <-> core values, with errors that name the field and the allowed values."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

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


def named_back(mapping: Mapping[Any, T]) -> dict[T, Any]:
    """Core value -> wire value, for maps where UNSPECIFIED (0) is an alias of a default:
    the default goes back as its own name."""
    return {core: wire_value for wire_value, core in mapping.items() if wire_value}
