"""The kinds of declaration a request field can have, each checking a value and saying in
words what it allows (for the error, the docs and the fuzz strategies alike).

A rule checks one field's value as protobuf holds it: a number, a string, bytes, a
message, a repeated container or a map. Messages are checked by the walker that owns the
table (`check`), which each rule reaches through `Walk`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from vitscope_server.core.runtime.errors import InvalidArgument, quote, short

Walk = Callable[[Message, str], None]
"""Checks a nested message whose fields are declared under its own name, paths under a prefix."""
Parsed = TypeVar("Parsed")


def _number(value: float) -> str:
    """A bound as people write it: integers without a fraction, large ones with an exponent."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:g}" if isinstance(value, float) else str(value)


class Rule:
    """One field's declaration: `check` refuses a value it does not allow, naming `path`."""

    def check(self, value: Any, path: str, field: FieldDescriptor, walk: Walk) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class Range(Rule):
    """A number within [low, high] (or (low, high] with low_open); values must be finite.
    Integer bounds describe an integer field, float bounds a floating one."""

    low: float
    high: float
    low_open: bool = False
    high_text: str = ""
    """The upper bound in words where the model sets it (the core checks it against the
    model); `high` is then only the bound no model exceeds."""

    def allows(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        return above and value <= self.high

    def refuse(self, value: float, path: str) -> None:
        if not self.allows(value):
            raise InvalidArgument(path, f"{value!r} not allowed; allowed: {self.describe()}")

    def check(self, value: Any, path: str, field: FieldDescriptor, walk: Walk) -> None:
        self.refuse(value, path)

    def describe(self) -> str:
        low = f"> {_number(self.low)}" if self.low_open else f">= {_number(self.low)}"
        high = self.high_text or _number(self.high)
        if isinstance(self.low, int) and isinstance(self.high, int) and not self.low_open:
            return f"{_number(self.low)}..{high}"
        return f"finite, {low} and <= {high}"


@dataclass(frozen=True)
class Grammar(Generic[Parsed]):
    """A string-encoded value: the whole text must match `pattern` (ASCII only), and `parse`
    turns a matching text into its value. `form` says in words what matches."""

    pattern: str
    form: str
    parse_match: Callable[[str], Parsed]
    compiled: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "compiled", re.compile(self.pattern, re.ASCII))

    def matches(self, text: str) -> bool:
        return self.compiled.fullmatch(text) is not None

    def parse(self, text: str, path: str) -> Parsed:
        """The value a text stands for; INVALID_ARGUMENT naming path and the form otherwise."""
        if not self.matches(text):
            raise InvalidArgument(path, f"{quote(text)} is not {self.form}")
        return self.parse_match(text)


@dataclass(frozen=True)
class Text(Rule):
    """A string of at most max_chars characters, matching a grammar when one is given.
    The empty string is proto3's unset value: the core says what it defaults to."""

    max_chars: int
    grammar: Grammar[Any] | None = None

    def check(self, value: Any, path: str, field: FieldDescriptor, walk: Walk) -> None:
        self.refuse(value, path)

    def refuse(self, value: str, path: str) -> None:
        if len(value) > self.max_chars:
            raise InvalidArgument(
                path, f"{len(value)} characters; allowed: at most {self.max_chars}"
            )
        if value and self.grammar is not None:
            self.grammar.parse(value, path)

    def describe(self) -> str:
        shape = f"{self.grammar.form}, " if self.grammar else ""
        return f"{shape}at most {self.max_chars} characters"


@dataclass(frozen=True)
class Choice(Rule):
    """One of a fixed set of strings (compared without ASCII case when `any_case`)."""

    allowed: tuple[str, ...]
    any_case: bool = False

    def normal(self, text: str) -> str | None:
        """The allowed spelling of a text, or None."""
        key = text.strip()
        if self.any_case and key.isascii():
            key = key.lower()
            return next((a for a in self.allowed if a.lower() == key), None)
        return key if key in self.allowed else None

    def check(self, value: Any, path: str, field: FieldDescriptor, walk: Walk) -> None:
        self.refuse(value, path)

    def refuse(self, value: str, path: str) -> None:
        if value and self.normal(value) is None:
            raise InvalidArgument(path, f"{quote(value)} not allowed; allowed: {self.describe()}")

    def describe(self) -> str:
        case = " (any case)" if self.any_case else ""
        return "one of " + ", ".join(self.allowed) + case


@dataclass(frozen=True)
class Defined(Rule):
    """An enum field: one of the values the enum defines (proto3 keeps unknown numbers)."""

    def check(self, value: Any, path: str, field: FieldDescriptor, walk: Walk) -> None:
        enum = field.enum_type
        assert enum is not None, field.full_name
        if value not in enum.values_by_number:
            names = ", ".join(v.name for v in enum.values)
            raise InvalidArgument(path, f"value {value} not allowed; allowed: {names}")

    def describe(self) -> str:
        return "a value the enum defines"


@dataclass(frozen=True)
class Unchecked(Rule):
    """Every value of the field's type is fine; `why` says so in the docs."""

    why: str

    def check(self, value: Any, path: str, field: FieldDescriptor, walk: Walk) -> None:
        return None

    def describe(self) -> str:
        return self.why


@dataclass(frozen=True)
class Unused(Rule):
    """A field this server reads from no request: it must be left empty."""

    why: str

    def check(self, value: Any, path: str, field: FieldDescriptor, walk: Walk) -> None:
        raise InvalidArgument(path, f"must be empty: {self.why}")

    def describe(self) -> str:
        return f"empty ({self.why})"


@dataclass(frozen=True)
class Nested(Rule):
    """A message field: its own fields are declared under its type's name."""

    def check(self, value: Any, path: str, field: FieldDescriptor, walk: Walk) -> None:
        walk(value, path)

    def describe(self) -> str:
        return "as its message declares"


@dataclass(frozen=True)
class Repeated(Rule):
    """At most max_items entries, each allowed by `each`."""

    each: Rule
    max_items: int

    def check(self, value: Any, path: str, field: FieldDescriptor, walk: Walk) -> None:
        if len(value) > self.max_items:
            raise InvalidArgument(path, f"{len(value)} entries; allowed: at most {self.max_items}")
        if isinstance(self.each, Range):
            _check_numbers(self.each, value, path)
            return
        for index, item in enumerate(value):
            self.each.check(item, f"{path}[{index}]", field, walk)

    def describe(self) -> str:
        return f"at most {self.max_items}, each {self.each.describe()}"


def _check_numbers(rule: Range, values: Sequence[float], path: str) -> None:
    """Vectorised, for a tensor's contents may hold millions of numbers; the first value
    refused is named by its index."""
    array = np.asarray(values, dtype=np.float64)
    low = array > rule.low if rule.low_open else array >= rule.low
    bad = np.flatnonzero(~(np.isfinite(array) & low & (array <= rule.high)))
    for index in bad[:1].tolist():
        rule.refuse(values[index], f"{path}[{index}]")


PARAMETER_KINDS = ("bool_param", "int64_param", "string_param", "double_param", "uint64_param")


def parameter_text(parameter: Message) -> str | None:
    """A string or integer parameter as text (the protocol's clients send either); None for
    a bool, a double or nothing."""
    kind = parameter.WhichOneof("parameter_choice")
    if kind == "string_param":
        return str(getattr(parameter, kind))
    if kind in ("int64_param", "uint64_param"):
        return str(getattr(parameter, kind))
    return None


@dataclass(frozen=True)
class Parameter:
    """One key of an inference-protocol parameters map: a string (or an integer written as
    one) that `rule` allows, or any value when rule is None; `note` adds what the rule
    cannot say (a default, the parameter it goes with)."""

    rule: Text | Choice | None
    note: str = ""

    def check(self, value: Message, path: str) -> None:
        if self.rule is None:
            return
        text = parameter_text(value)
        if text is None:
            raise InvalidArgument(path, "expected a string or an integer parameter")
        if isinstance(self.rule, Text):
            # Surrounding spaces are the clients' habit; the value is what they enclose.
            text = text.strip()
            if not text:
                raise InvalidArgument(path, f"empty; allowed: {self.rule.describe()}")
        self.rule.refuse(text, path)

    def describe(self) -> str:
        said = [self.rule.describe()] if self.rule is not None else ["any value"]
        return "; ".join(said + ([self.note] if self.note else []))


@dataclass(frozen=True)
class Parameters(Rule):
    """A map<string, InferParameter>: at most max_items keys, each declared in `keys` (an
    undeclared key is refused unless `others` says what any other key may hold)."""

    keys: Mapping[str, Parameter]
    max_items: int = 64
    others: Parameter | None = None
    max_key_chars: int = 128

    def check(self, value: Any, path: str, field: FieldDescriptor, walk: Walk) -> None:
        if len(value) > self.max_items:
            raise InvalidArgument(path, f"{len(value)} keys; allowed: at most {self.max_items}")
        for key in sorted(value):
            if len(key) > self.max_key_chars:
                raise InvalidArgument(
                    path, f"a key of {len(key)} characters; allowed: at most {self.max_key_chars}"
                )
            declared = self.keys.get(key, self.others)
            if declared is None:
                raise InvalidArgument(
                    parameter_path(path, short(key)),
                    f"{quote(key)} unknown; allowed: {sorted(self.keys)}",
                )
            declared.check(value[key], parameter_path(path, key))

    def describe(self) -> str:
        parts = [f'"{key}": {p.describe()}' for key, p in self.keys.items()]
        if self.others is not None:
            parts.append(f"any other key: {self.others.describe()}")
        return f"at most {self.max_items} keys; " + "; ".join(parts)


def parameter_path(path: str, key: str) -> str:
    """The path of one key of a parameters map: `outputs[0].parameters["positions"]`."""
    return f'{path}["{key}"]'
