"""Writes docs/api.md, the API reference, from the protos and their comments.

protoc compiles proto/vitscope/v1 into a descriptor set with source info (the comments);
this script renders its services, messages and enums as Markdown. The page is committed;
tests regenerate it and fail when it drifts from the protos (run `make docs`).
"""

from __future__ import annotations

import argparse
import re
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from generate import PROTO_ROOT, REPO_ROOT, proto_files
from google.protobuf import descriptor_pb2 as d
from grpc_tools import protoc

from vitscope_server.transport.fields import FIELDS

DEFAULT_OUT = REPO_ROOT / "docs" / "api.md"

# Field numbers of the descriptor messages, as source_code_info paths spell them.
FILE_MESSAGE, FILE_ENUM, FILE_SERVICE = 4, 5, 6
MESSAGE_FIELD, MESSAGE_NESTED, MESSAGE_ENUM = 2, 3, 4
ENUM_VALUE, SERVICE_METHOD = 2, 2

HEADER = """\
# API reference

The protocol is package `vitscope.v1` in `proto/vitscope/v1/`. This page is generated from
the protos and their comments by `make docs` (`proto/docgen.py`); edit the comments, not
this page. A test fails when the page no longer matches the protos.

Request messages have an Allowed column: what each field accepts, read from the server's
declarations (`vitscope_server/transport/fields/`). A request setting a field to anything
else is refused with INVALID_ARGUMENT and a field violation naming it, before any decoding
or compute; unset fields (0, "", empty) take the documented defaults. Bounds written in
words ("the site's channels") depend on the model and are checked against it.

Conventions: tensors travel as little-endian, row-major bytes with a dtype and a shape;
large results stream in chunks that the client reassembles; every response carries its
provenance and the parameters in effect after defaults. Errors are described in
[errors.md](errors.md); the method definitions in [methods.md](methods.md). Beside
`vitscope.v1.Inspector`, the same port serves the Open Inference Protocol (package
`inference`, described in [oip.md](oip.md)); its messages come last.

## Compatibility

Once released, `v1` changes only by addition: new fields, messages, enum values and RPCs.
Nothing a released client relies on is renamed, renumbered or removed; a change that must
break goes into a new package (`vitscope.v2`) served beside `v1`.

The protos are linted with [buf](https://buf.build): `buf lint`, configured by `buf.yaml`
at the repository root, runs in `make lint`. Before changing a proto, check the change
against the last release tag with `buf breaking`, from the repository root:

```bash
npx @bufbuild/buf breaking proto --against '.git#tag=v0.1.0,subdir=proto'
# before the first tag, against the main branch:
npx @bufbuild/buf breaking proto --against '.git#branch=main,subdir=proto'
```

Then regenerate the stubs (`make proto`) and this page (`make docs`).
"""

SCALARS = {
    d.FieldDescriptorProto.TYPE_DOUBLE: "double",
    d.FieldDescriptorProto.TYPE_FLOAT: "float",
    d.FieldDescriptorProto.TYPE_INT64: "int64",
    d.FieldDescriptorProto.TYPE_UINT64: "uint64",
    d.FieldDescriptorProto.TYPE_INT32: "int32",
    d.FieldDescriptorProto.TYPE_FIXED64: "fixed64",
    d.FieldDescriptorProto.TYPE_FIXED32: "fixed32",
    d.FieldDescriptorProto.TYPE_BOOL: "bool",
    d.FieldDescriptorProto.TYPE_STRING: "string",
    d.FieldDescriptorProto.TYPE_BYTES: "bytes",
    d.FieldDescriptorProto.TYPE_UINT32: "uint32",
    d.FieldDescriptorProto.TYPE_SFIXED32: "sfixed32",
    d.FieldDescriptorProto.TYPE_SFIXED64: "sfixed64",
    d.FieldDescriptorProto.TYPE_SINT32: "sint32",
    d.FieldDescriptorProto.TYPE_SINT64: "sint64",
}


def descriptor_set() -> d.FileDescriptorSet:
    """Compiles the protos with their comments (source_code_info) into a descriptor set."""
    grpc_include = Path(protoc.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "api.binpb"
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{grpc_include}",
            f"--descriptor_set_out={out}",
            "--include_source_info",
            *[str(p.relative_to(PROTO_ROOT)) for p in proto_files()],
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        return d.FileDescriptorSet.FromString(out.read_bytes())


class Comments:
    """The comments of one file, looked up by descriptor path."""

    def __init__(self, file: d.FileDescriptorProto) -> None:
        self.locations = {tuple(loc.path): loc for loc in file.source_code_info.location}
        top = [
            loc
            for path, loc in self.locations.items()
            if len(path) == 2 and path[0] in (FILE_MESSAGE, FILE_ENUM, FILE_SERVICE)
        ]
        first = min(top, key=lambda loc: tuple(loc.span), default=None)
        # Comments standing alone before the first declaration describe the file.
        self.file_notes = [clean(c) for c in first.leading_detached_comments] if first else []
        self.first_path = tuple(first.path) if first else ()

    def order(self, path: tuple[int, ...]) -> tuple[int, ...]:
        """Sorts declarations as the file has them; nested ones follow their parent."""
        return (*self.locations[path[:2]].span[:2], *path[2:])

    def of(self, path: tuple[int, ...]) -> str:
        loc = self.locations.get(path)
        if loc is None:
            return ""
        parts = [] if path == self.first_path else list(loc.leading_detached_comments)
        parts += [loc.leading_comments, loc.trailing_comments]
        return "\n\n".join(clean(p) for p in parts if p.strip())


def clean(comment: str) -> str:
    """A comment's lines without the space protoc keeps after //, Markdown-safe."""
    lines = [line[1:] if line.startswith(" ") else line for line in comment.strip("\n").split("\n")]
    text = "\n".join(line.rstrip() for line in lines).strip()
    # Angle brackets would read as HTML, except inside `code`, which Markdown shows as is.
    parts = text.split("`")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts)


def cell(text: str) -> str:
    """Text for one table cell: one line, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|")


def anchor(title: str) -> str:
    """The fragment GitHub gives a heading."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


class Types:
    """Every message and enum of the set by full name (".package.Name"), with the title of
    its section: the name within its package, qualified only when another package uses it."""

    def __init__(self, files: d.FileDescriptorSet) -> None:
        self.maps: dict[str, d.DescriptorProto] = {}
        names: dict[str, str] = {}
        for file in files.file:
            for name, message, _ in walk_messages(list(file.message_type), (FILE_MESSAGE,)):
                if message.options.map_entry:
                    self.maps[f".{file.package}.{name}"] = message
                else:
                    names[f".{file.package}.{name}"] = name
            names.update({f".{file.package}.{name}": name for name, _, _ in walk_enums(file)})
        counts = Counter(names.values())
        self.titles = {
            full: name if counts[name] == 1 else full[1:] for full, name in names.items()
        }

    def link(self, full_name: str) -> str:
        title = self.titles.get(full_name)
        return f"[{title}](#{anchor(title)})" if title else f"`{full_name.lstrip('.')}`"

    def of_field(self, field: d.FieldDescriptorProto) -> str:
        """The field's type as the .proto spells it, linked to its section."""
        entry = self.maps.get(field.type_name)
        if entry is not None:
            key, value = entry.field
            return f"map&lt;{self.of_field(key)}, {self.of_field(value)}&gt;"
        base = self.link(field.type_name) if field.type_name else f"`{SCALARS[field.type]}`"
        if field.label == d.FieldDescriptorProto.LABEL_REPEATED:
            return f"repeated {base}"
        if field.proto3_optional:
            return f"optional {base}"
        return base


def walk_messages(
    messages: list[d.DescriptorProto], path: tuple[int, ...], prefix: str = ""
) -> Iterator[tuple[str, d.DescriptorProto, tuple[int, ...]]]:
    """Every message with its dotted name and descriptor path, nested ones after their parent."""
    for i, message in enumerate(messages):
        name = f"{prefix}{message.name}"
        here = (*path, i)
        yield name, message, here
        yield from walk_messages(list(message.nested_type), (*here, MESSAGE_NESTED), f"{name}.")


def walk_enums(
    file: d.FileDescriptorProto,
) -> Iterator[tuple[str, d.EnumDescriptorProto, tuple[int, ...]]]:
    for i, enum in enumerate(file.enum_type):
        yield enum.name, enum, (FILE_ENUM, i)
    for name, message, path in walk_messages(list(file.message_type), (FILE_MESSAGE,)):
        for i, enum in enumerate(message.enum_type):
            yield f"{name}.{enum.name}", enum, (*path, MESSAGE_ENUM, i)


def render_service(
    service: d.ServiceDescriptorProto,
    path: tuple[int, ...],
    comments: Comments,
    package: str,
    types: Types,
) -> list[str]:
    out = [f"### {package}.{service.name}", ""]
    if text := comments.of(path):
        out += [text, ""]
    out += ["| RPC | Request | Response | Description |", "|---|---|---|---|"]
    for i, method in enumerate(service.method):
        request = types.link(method.input_type)
        response = types.link(method.output_type)
        if method.client_streaming:
            request = f"stream {request}"
        if method.server_streaming:
            response = f"stream {response}"
        text = cell(comments.of((*path, SERVICE_METHOD, i)))
        out.append(f"| `{method.name}` | {request} | {response} | {text} |")
    return [*out, ""]


def render_message(
    title: str,
    full_name: str,
    message: d.DescriptorProto,
    path: tuple[int, ...],
    comments: Comments,
    types: Types,
) -> list[str]:
    """A message's table; a request message's (every field declared in
    vitscope_server.transport.fields) has an Allowed column read from the declarations."""
    out = [f"### {title}", ""]
    if text := comments.of(path):
        out += [text, ""]
    if not message.field:
        return [*out, "No fields.", ""]
    rules = [FIELDS.get(f"{full_name}.{field.name}") for field in message.field]
    declared = any(rules)
    out += ["| Field | Number | Type | Description |" + (" Allowed |" if declared else "")]
    out.append("|---|---|---|---|" + ("---|" if declared else ""))
    for i, (field, rule) in enumerate(zip(message.field, rules, strict=True)):
        text = comments.of((*path, MESSAGE_FIELD, i))
        if field.HasField("oneof_index") and not field.proto3_optional:
            text = f"One of `{message.oneof_decl[field.oneof_index].name}`. {text}"
        kind = types.of_field(field)
        row = f"| `{field.name}` | {field.number} | {kind} | {cell(text)} |"
        if declared:
            row += f" {cell(clean(rule.describe())) if rule else ''} |"
        out.append(row)
    return [*out, ""]


def render_enum(
    title: str, enum: d.EnumDescriptorProto, path: tuple[int, ...], comments: Comments
) -> list[str]:
    out = [f"### {title}", ""]
    if text := comments.of(path):
        out += [text, ""]
    out += ["| Value | Number | Description |", "|---|---|---|"]
    for i, value in enumerate(enum.value):
        text = cell(comments.of((*path, ENUM_VALUE, i)))
        out.append(f"| `{value.name}` | {value.number} | {text} |")
    return [*out, ""]


def render_file(file: d.FileDescriptorProto, comments: Comments, types: Types) -> list[str]:
    """A file's messages and enums in source order, after the comments that open the file."""
    blocks: list[tuple[tuple[int, ...], list[str]]] = []
    for name, message, path in walk_messages(list(file.message_type), (FILE_MESSAGE,)):
        full = f".{file.package}.{name}"
        if full not in types.maps:
            lines = render_message(types.titles[full], full[1:], message, path, comments, types)
            blocks.append((comments.order(path), lines))
    for name, enum, path in walk_enums(file):
        title = types.titles[f".{file.package}.{name}"]
        blocks.append((comments.order(path), render_enum(title, enum, path, comments)))
    if not blocks:
        return []
    out = [f"## {file.name}", ""]
    for note in comments.file_notes:
        out += [note, ""]
    for _, lines in sorted(blocks, key=lambda block: block[0]):
        out += lines
    return out


def render(files: d.FileDescriptorSet) -> str:
    """The whole page: header, services, then each file (vitscope.v1 first)."""
    types = Types(files)
    services: list[str] = ["## Services", ""]
    sections: list[str] = []
    for file in sorted(files.file, key=lambda f: (f.package != "vitscope.v1", f.name)):
        comments = Comments(file)
        for i, service in enumerate(file.service):
            path = (FILE_SERVICE, i)
            services += render_service(service, path, comments, file.package, types)
        sections += render_file(file, comments, types)
    return "\n".join([HEADER, *services, *sections]).rstrip("\n") + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    out = parser.parse_args().out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(descriptor_set()))


if __name__ == "__main__":
    main()
