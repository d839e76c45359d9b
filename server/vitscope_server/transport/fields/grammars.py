"""Grammars of the string-encoded values requests carry: names, site names and the inference
protocol's list parameters. Each is matched whole, ASCII only ([0-9], never \\d, which
matches other scripts' digits), and parsed by the same object that checks it."""

from __future__ import annotations

from vitscope_server.core.model.specs import MODEL_NAME_PATTERN, SAE_NAME_PATTERN
from vitscope_server.transport.fields.rules import Grammar

_INDEX = "[0-9]{1,9}"
"""A non-negative integer that fits an int32 (at most nine digits)."""
_SPACES = "[ ]*"


def _listed(item: str) -> str:
    """Comma-separated items, spaces allowed around each."""
    one = f"{_SPACES}{item}{_SPACES}"
    return f"{one}(?:,{one})*"


def _integers(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(","))


def _positions(text: str) -> tuple[tuple[int, int], ...]:
    pairs = (part.split(":") for part in text.split(","))
    return tuple((int(row), int(col)) for row, col in pairs)


def _same(text: str) -> str:
    return text


MODEL_NAME = Grammar(MODEL_NAME_PATTERN, "a model name ([A-Za-z0-9][A-Za-z0-9._:/-]*)", _same)
MODEL_VERSION = Grammar(
    "[!-~]+", "a version: printable ASCII without spaces (a weights identity)", _same
)
SAE_NAME = Grammar(SAE_NAME_PATTERN, f"an SAE name ({SAE_NAME_PATTERN})", _same)
SITE = Grammar(
    f"[A-Za-z0-9_]+(?:[.][A-Za-z0-9_]+)*(?:@sae:{SAE_NAME_PATTERN}(?:[.](?:recon|error))?)?",
    "a site name: embed, final, blocks.{i}.out, blocks.{i}.attn.out, blocks.{i}.attn.probs, "
    "blocks.{i}.attn.heads, blocks.{i}.mlp.hidden, blocks.{i}.mlp.out, a module path (names "
    "joined by dots), or an SAE's {site}@sae:{name} (with .recon or .error)",
    _same,
)
INDEX_LIST = Grammar(
    _listed(_INDEX), 'comma-separated integers 0..999999999, e.g. "0,5,9"', _integers
)
POSITION_LIST = Grammar(
    _listed(f"{_INDEX}:{_INDEX}"),
    'comma-separated row:col patch positions (integers 0..999999999), e.g. "0:0,3:2"',
    _positions,
)
FOLDER = Grammar("[^\x00-\x1f\x7f]+", "a folder path without control characters", _same)
