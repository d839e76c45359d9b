"""House rules for the v1 protos that buf's STANDARD lint does not check (AIP-140, AIP-141)."""

from __future__ import annotations

import re
from collections.abc import Iterator

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from vitscope.v1 import inspector_pb2

# British spellings that have crept into protocols before; the protocol speaks American English.
_BRITISH = re.compile(r"isation|ised\b|colour|normalis|optimis|regularis|behaviour")


def _messages(descriptor: Descriptor) -> Iterator[Descriptor]:
    yield descriptor
    for nested in descriptor.nested_types:
        yield from _messages(nested)


def _all_messages() -> list[Descriptor]:
    files = {inspector_pb2.DESCRIPTOR, *inspector_pb2.DESCRIPTOR.dependencies}
    files |= {d for f in list(files) for d in f.dependencies}
    return [
        m
        for f in files
        if f.package == "vitscope.v1"
        for top in f.message_types_by_name.values()
        for m in _messages(top)
    ]


def _fields() -> list[tuple[str, FieldDescriptor]]:
    return [(f"{m.full_name}.{f.name}", f) for m in _all_messages() for f in m.fields]


def test_counts_end_in_count_not_start_with_num() -> None:
    offenders = [name for name, f in _fields() if f.name.startswith("num_")]
    assert offenders == []


def test_names_are_american_english() -> None:
    names = [name for name, _ in _fields()] + [m.full_name for m in _all_messages()]
    offenders = [n for n in names if _BRITISH.search(n.lower())]
    assert offenders == []


def test_streamed_responses_share_one_oneof_name() -> None:
    service = inspector_pb2.DESCRIPTOR.services_by_name["Inspector"]
    streamed = [m.output_type for m in service.methods if m.server_streaming]
    assert streamed, "the service streams some responses"
    for response in streamed:
        assert [o.name for o in response.oneofs] == ["payload"], response.full_name


def test_every_token_selection_is_the_shared_message() -> None:
    selections = [
        (name, f.message_type.full_name)
        for name, f in _fields()
        if f.name == "tokens" and f.message_type is not None
    ]
    assert selections, "some requests select tokens"
    assert {kind for _, kind in selections} == {"vitscope.v1.TokenSelection"}
