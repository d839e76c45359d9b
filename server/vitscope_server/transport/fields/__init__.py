"""Every request field's allowed values, declared once: the validation, the error's field
violation, the API reference and the fuzz strategies all read this table.

`check(message)` walks a request by its descriptor before any conversion, decode or forward,
and raises InvalidArgument naming the first field it refuses by its path
(`images[2].pixels.shape[0]`, `outputs[0].parameters["positions"]`). Set fields only: proto3's
unset values (0, "", empty lists) mean the request's defaults, which the core fills in.

A table in code rather than protovalidate annotations: the annotations' proto sources are
not to be had offline (the PyPI package ships only generated code, for another protobuf
runtime), the inference protocol's proto is not ours to annotate, and several bounds are the
core's own constants, which the table imports instead of repeating.
"""

from __future__ import annotations

from collections.abc import Iterator

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from vitscope_server.transport.fields import inspector, oip
from vitscope_server.transport.fields.rules import Rule

FIELDS: dict[str, Rule] = {**inspector.FIELDS, **oip.FIELDS}
"""Full field name (`vitscope.v1.ExplainRequest.images`) -> its declaration."""


def rule_of(field: FieldDescriptor) -> Rule:
    """A field's declaration; KeyError for a field nobody declared (a test forbids that)."""
    return FIELDS[field.full_name]


def _path(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def check(message: Message, prefix: str = "") -> None:
    """Refuses the first set field of the message (at any depth) its declaration does not
    allow; `prefix` is the path of the message itself within its request."""
    for field, value in message.ListFields():
        rule_of(field).check(value, _path(prefix, field.name), field, check)


def declared_fields(request: Descriptor) -> Iterator[FieldDescriptor]:
    """Every field reachable from a request type, each once. A map's entry is declared by
    its map field (keys and values); the fields of a message-typed value are reached."""
    seen: set[str] = set()
    pending = [request]
    while pending:
        descriptor = pending.pop()
        if descriptor.full_name in seen:
            continue
        seen.add(descriptor.full_name)
        entry = descriptor.GetOptions().map_entry
        for field in descriptor.fields:
            if not entry:
                yield field
            if field.message_type is not None:
                pending.append(field.message_type)
