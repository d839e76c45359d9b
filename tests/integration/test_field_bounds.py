"""Every numeric field of every request message, walked by the protobuf descriptors (so a new
field is covered as soon as it exists), sent to a real server at its declared bounds, just
past them, and at the extremes of its type: the largest finite double, the smallest
subnormal, NaN and the infinities for floating fields, the type's limits for integers,
undefined numbers for enums.

A value the field's declaration refuses must come back INVALID_ARGUMENT with exactly the
field violation the declaration names; any other value must be answered or refused for a
reason (with a field violation when INVALID_ARGUMENT), never INTERNAL or UNKNOWN.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from support.fuzzing import SEEDS, SERVICES, edges
from support.servers import start

from vitscope_server.core.runtime.errors import InvalidArgument
from vitscope_server.transport import fields
from vitscope_server.transport.app import RunningServer
from vitscope_server.transport.fields.rules import Parameters, Range, Repeated

CALL_SECONDS = 3.0
FLOATING = (FieldDescriptor.CPPTYPE_FLOAT, FieldDescriptor.CPPTYPE_DOUBLE)
EXTREME_FLOATS = [sys.float_info.max, -sys.float_info.max, math.nan, math.inf, -math.inf]
EXTREME_FLOATS += [5e-324, -5e-324, 0.0]
INTEGER_LIMITS = {
    FieldDescriptor.CPPTYPE_INT32: [-(2**31), 2**31 - 1, -1, 0],
    FieldDescriptor.CPPTYPE_UINT32: [0, 2**32 - 1],
    FieldDescriptor.CPPTYPE_INT64: [-(2**63), 2**63 - 1, -1, 0],
    FieldDescriptor.CPPTYPE_UINT64: [0, 2**64 - 1],
}
PARAMETER_VALUES = [
    ("int64_param", -1),
    ("int64_param", 2**63 - 1),
    ("uint64_param", 2**64 - 1),
    ("double_param", math.nan),
    ("double_param", sys.float_info.max),
]
MODEL = {"name": "tiny", "family": "timm", "architecture": "test_vit", "seed": 1}


@dataclass(frozen=True)
class Slot:
    """One numeric place in a request: the fields leading to it (a repeated message's first
    element, a map's key) and the values to put there."""

    steps: tuple[tuple[str, str | None], ...]
    field: FieldDescriptor
    values: tuple[Any, ...]

    def label(self) -> str:
        return ".".join(f"{name}[{key!r}]" if key else name for name, key in self.steps)


def _values(field: FieldDescriptor) -> list[Any]:
    rule = fields.FIELDS[field.full_name]
    if isinstance(rule, Repeated):
        rule = rule.each
    if field.type == FieldDescriptor.TYPE_ENUM:
        numbers = [v.number for v in field.enum_type.values]
        return [*numbers, -1, max(numbers) + 1, 2**31 - 1]
    declared = edges(rule, field) if isinstance(rule, Range) else []
    extremes = EXTREME_FLOATS if field.cpp_type in FLOATING else INTEGER_LIMITS[field.cpp_type]
    return list(dict.fromkeys([*declared, *extremes]))


def _slots(descriptor: Descriptor, steps: tuple[tuple[str, str | None], ...]) -> Iterator[Slot]:
    for field in descriptor.fields:
        here = (*steps, (field.name, None))
        nested = field.message_type
        if nested is not None and nested.GetOptions().map_entry:
            rule = fields.FIELDS[field.full_name]
            assert isinstance(rule, Parameters), field.full_name
            # Keys the server reads; the protocol's own keys are accepted and never read.
            for key in (k for k, p in rule.keys.items() if p.rule is not None):
                value = nested.fields_by_name["value"].message_type
                for kind, number in PARAMETER_VALUES:
                    yield Slot(
                        (*steps, (field.name, key), (kind, None)),
                        value.fields_by_name[kind],
                        (number,),
                    )
        elif nested is not None:
            yield from _slots(nested, here)
        elif field.cpp_type not in (FieldDescriptor.CPPTYPE_STRING, FieldDescriptor.CPPTYPE_BOOL):
            yield Slot(here, field, tuple(_values(field)))


def _with(seed: Message, slot: Slot, value: Any) -> Message | None:
    """The seed with the value put in the slot; None where protobuf itself refuses it."""
    request = type(seed)()
    request.CopyFrom(seed)
    target: Any = request
    for name, key in slot.steps[:-1]:
        container = getattr(target, name)
        if key is not None:
            target = container[key]
        elif hasattr(container, "add"):
            target = container[0] if len(container) else container.add()
        else:
            target = container
    name = slot.steps[-1][0]
    try:
        if slot.field.is_repeated:
            getattr(target, name)[:] = [value]
        else:
            setattr(target, name, value)
    except (ValueError, TypeError, OverflowError):
        return None
    return request


def _reaches(seed: Message, slot: Slot) -> bool:
    """Whether the seed already holds the message the slot is in (its method is exercised)."""
    target: Any = seed
    for name, key in slot.steps[:-1]:
        container = getattr(target, name)
        if key is not None:
            if key not in container:
                return False
            target = container[key]
        elif hasattr(container, "add"):
            if not len(container):
                return False
            target = container[0]
        elif not target.HasField(name):
            return False
        else:
            target = container
    return True


def _cases() -> Iterator[tuple[Any, Message, Slot]]:
    """Each slot of each method once, in the seed that reaches it when one does."""
    for service in SERVICES:
        for method in service.methods:
            chosen: dict[str, tuple[Message, Slot]] = {}
            for seed in SEEDS[method.name]:
                for slot in _slots(seed.DESCRIPTOR, ()):
                    earlier = chosen.get(slot.label())
                    if earlier is None or (_reaches(seed, slot) and not _reaches(*earlier)):
                        chosen[slot.label()] = (seed, slot)
            for seed, slot in chosen.values():
                yield method, seed, slot


CASES = list(_cases())


@pytest.fixture(scope="module")
def bounded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start(tmp_path_factory.mktemp("bounds"), [MODEL], max_running=2)
    yield running
    running.stop(0)


def _call(channel: grpc.Channel, method: Any, request: Message) -> grpc.RpcError | None:
    path = f"/{method.containing_service.full_name}/{method.name}"
    serialize, parse = (lambda m: m.SerializeToString()), bytes
    try:
        if method.client_streaming:
            channel.stream_unary(path, serialize, parse)(iter([request]), timeout=CALL_SECONDS)
        elif method.server_streaming:
            for _ in channel.unary_stream(path, serialize, parse)(request, timeout=CALL_SECONDS):
                pass
        else:
            channel.unary_unary(path, serialize, parse)(request, timeout=CALL_SECONDS)
    except grpc.RpcError as error:
        return error
    return None


def _violations(error: grpc.RpcError) -> list[str]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    found = []
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            found += [v.field for v in bad.field_violations]
    return found


def _beyond_any_range(value: Any) -> bool:
    """NaN, the infinities and the largest doubles: no floating field may allow them."""
    return isinstance(value, float) and not abs(value) < sys.float_info.max


def _refusal(request: Message) -> str | None:
    """The field the declarations refuse in this request, or None."""
    try:
        fields.check(request)
    except InvalidArgument as refused:
        return refused.field
    return None


@pytest.mark.parametrize(
    ("method", "seed", "slot"), CASES, ids=[f"{m.name}:{s.label()}" for m, _, s in CASES]
)
def test_numeric_field_at_its_edges(
    bounded: RunningServer, method: Any, seed: Message, slot: Slot
) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{bounded.port}") as channel:
        for value in slot.values:
            request = _with(seed, slot, value)
            if request is None:
                continue
            refused = _refusal(request)
            if _beyond_any_range(value):
                assert refused, f"{slot.label()}={value!r} passes its declaration"
            error = _call(channel, method, request)
            code = grpc.StatusCode.OK if error is None else error.code()
            where = f"{method.name} {slot.label()}={value!r}: {code.name}"
            if refused is not None:
                assert code == grpc.StatusCode.INVALID_ARGUMENT, where
                assert error is not None and _violations(error) == [refused], where
                continue
            assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (
                f"{where}: {error.details() if error else ''}"
            )
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                assert error is not None and _violations(error), where
