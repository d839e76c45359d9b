"""Wire enums by short name, read from the proto descriptors: `patch_mean` for
FEATURE_OBJECTIVE_PATCH_MEAN. buf's ENUM_VALUE_PREFIX rule makes every value start with its
type's name in upper snake case, so the short name is what follows."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from google.protobuf.internal.enum_type_wrapper import _EnumTypeWrapper

V = TypeVar("V", bound=int)

UNSPECIFIED = "unspecified"


def _upper_snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).upper()


def short_names(enum: _EnumTypeWrapper[V], *, unspecified: bool = False) -> dict[str, V]:
    """Short name -> wire value of every value of `enum` (a generated enum type); the zero
    value ("unspecified") only when asked for."""
    prefix = _upper_snake(enum.DESCRIPTOR.name) + "_"
    return {
        name.removeprefix(prefix).lower(): number
        for name, number in enum.items()
        if number or unspecified
    }
