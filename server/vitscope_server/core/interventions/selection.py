"""Each edit resolved against the model: its site, the region it touches as a boolean mask
over one image's edit space, and the values it writes; every field checked by name."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

from vitscope_server.core.interventions.edits import ClassRef, Edit, Operation, Selection
from vitscope_server.core.model.adapters import Layout, ModelAdapter, SiteDef
from vitscope_server.core.model.adapters.capabilities import LinearClassifier, require
from vitscope_server.core.model.loading import LoadedModel
from vitscope_server.core.model.sites import resolve_site
from vitscope_server.core.model.tokens import resolve_token_indices
from vitscope_server.core.runtime.errors import (
    FailedPrecondition,
    InvalidArgument,
    Reason,
    require_in_range,
    require_unique,
)

# Operations that act on a head's context linearly, so they edit its contribution exactly.
HEAD_OPERATIONS = (Operation.ZERO, Operation.MEAN, Operation.SCALE, Operation.PATCH)


@dataclass(frozen=True)
class ResolvedEdit:
    """One edit ready to apply: `mask` (bool) broadcasts over one image's edit space
    ([1, tokens, channels], or [1, tokens, heads, head_dim] on attn.heads), and is only as
    large as the axes it restricts."""

    site: SiteDef
    operation: Operation
    mask: torch.Tensor
    value: float = 0.0
    factor: float = 1.0
    delta: torch.Tensor | None = None  # ADD: alpha times the direction, [channels]


@contextmanager
def within(prefix: str) -> Iterator[None]:
    """Re-raises a field error with the field's full path in the request."""
    try:
        yield
    except InvalidArgument as error:
        raise InvalidArgument(
            f"{prefix}.{error.field}" if error.field else prefix,
            error.description,
            reason=error.reason,
        ) from None


def class_index(adapter: ModelAdapter, ref: int | str, field: str) -> int:
    names = adapter.class_names
    if not names:
        raise FailedPrecondition(
            f"{field}: model {adapter.spec.name} has no classifier, so no classes",
            reason=Reason.NO_CLASSIFIER,
            subject=adapter.spec.name,
            field=field,
        )
    if isinstance(ref, str):
        if ref not in names:
            raise InvalidArgument(field, f"no class named {ref[:48]!r}; see DescribeModel")
        return names.index(ref)
    require_in_range(field, [ref], 0, len(names) - 1)
    return ref


def edit_space(loaded: LoadedModel, site: SiteDef) -> tuple[int, ...]:
    """One image's edit space at a site: [tokens, channels], or [tokens, heads, head_dim]."""
    shape = loaded.site_shapes.get(site.name, ())
    if site.layout is Layout.HEADS and site.heads is not None:
        weight = loaded.adapter.root.get_submodule(site.module_path).weight
        assert isinstance(weight, torch.Tensor)
        width = int(weight.shape[1])
        return (shape[1], site.heads.heads, width // site.heads.heads)
    return tuple(shape[1:])


def editable_site(loaded: LoadedModel, name: str, field: str) -> SiteDef:
    site = resolve_site(loaded.adapter, name, field)
    shape = loaded.site_shapes.get(site.name, ())
    tokens = site.num_prefix_tokens + site.grid[0] * site.grid[1]
    if site.layout is Layout.HEADS:
        return site
    if site.layout is not Layout.TOKENS or len(shape) != 3 or shape[1] != tokens:
        raise InvalidArgument(
            field,
            f"site {site.name!r} holds no tokens [batch, tokens, channels]; edits apply to "
            "token sites (embed, blocks.{i}.out, .attn.out, .attn.heads, .mlp.hidden, "
            ".mlp.out, final)",
        )
    return site


def _along(count: int, chosen: list[int] | tuple[int, ...]) -> torch.Tensor | None:
    """A boolean mask over `count` entries, or None when every entry is chosen."""
    if not chosen or len(set(chosen)) == count:
        return None
    mask = torch.zeros(count, dtype=torch.bool)
    mask[list(chosen)] = True
    return mask


def _combined(first: torch.Tensor | None, second: torch.Tensor | None, dims: int) -> torch.Tensor:
    """The two axes' masks as one that broadcasts over [1, tokens, ...]: only as large as
    the axes it restricts (a single token's mask is [1, tokens, 1])."""
    shape_first = (1, -1, *([1] * (dims - 2)))
    shape_second = (1, 1, *([-1] if dims == 3 else [-1, 1]))
    if first is None and second is None:
        return torch.ones([1] * dims, dtype=torch.bool)
    if second is None:
        assert first is not None
        return first.reshape(shape_first)
    if first is None:
        return second.reshape(shape_second)
    return first.reshape(shape_first) & second.reshape(shape_second)


def _mask(loaded: LoadedModel, site: SiteDef, selection: Selection) -> torch.Tensor:
    space = edit_space(loaded, site)
    tokens = _along(space[0], resolve_token_indices(selection, site, space[0]))
    if site.layout is Layout.HEADS:
        if selection.channels:
            raise InvalidArgument(
                "channels", "not allowed on attn.heads sites; select heads, or edit attn.out"
            )
        require_in_range("heads", selection.heads, 0, space[1] - 1, f" for {site.name!r}")
        require_unique("heads", selection.heads)
        return _combined(tokens, _along(space[1], selection.heads), 4)
    if selection.heads:
        raise InvalidArgument("heads", f"only attn.heads sites have heads; {site.name!r} has none")
    require_in_range("channels", selection.channels, 0, space[1] - 1, f" for {site.name!r}")
    require_unique("channels", selection.channels)
    return _combined(tokens, _along(space[1], selection.channels), 3)


def _finite(value: float, field: str) -> float:
    if not math.isfinite(value):
        raise InvalidArgument(field, f"{value} not allowed; must be finite")
    return value


def _direction(loaded: LoadedModel, edit: Edit, width: int, field: str) -> torch.Tensor:
    direction = edit.direction
    if direction is None or (not direction.vector and direction.class_row is None):
        raise InvalidArgument(
            f"{field}.direction",
            "required with ADD: a vector or a class row",
            reason=Reason.FIELD_REQUIRED,
        )
    if direction.vector:
        vector = torch.tensor(direction.vector, dtype=torch.float32)
        if not torch.isfinite(vector).all():
            raise InvalidArgument(f"{field}.direction.vector", "must be finite")
    else:
        vector = _class_row(loaded, direction.class_row, f"{field}.direction.class_row")
    if vector.shape[0] != width:
        raise InvalidArgument(
            f"{field}.direction",
            f"{vector.shape[0]} values for site {edit.site!r} of {width} channels",
        )
    return vector


def _class_row(loaded: LoadedModel, ref: ClassRef, field: str) -> torch.Tensor:
    adapter = loaded.adapter
    index = class_index(adapter, ref if ref is not None else 0, field)
    head = require(adapter.class_head(), "a class's head row", field)
    if not isinstance(head, LinearClassifier):
        raise FailedPrecondition(
            f"{field}: model {adapter.spec.name} scores classes by text embeddings, not a "
            "linear classifier head; give the direction as a vector",
            subject=adapter.spec.name,
            field=field,
        )
    return head.weight[index].detach().float().cpu()


def resolve_edit(loaded: LoadedModel, edit: Edit, field: str, sets: frozenset[str]) -> ResolvedEdit:
    """sets: which image sets the request has ("source", "reference")."""
    site = editable_site(loaded, edit.site, f"{field}.site")
    operation = edit.operation
    if site.layout is Layout.HEADS and operation not in HEAD_OPERATIONS:
        raise InvalidArgument(
            f"{field}.operation",
            f"{operation.value} is not allowed on attn.heads; allowed: "
            f"{[o.value for o in HEAD_OPERATIONS]} (a head's context is edited before the "
            "output projection); add or set at blocks.{i}.attn.out",
        )
    needs = {
        Operation.PATCH: ("source", "source_images"),
        Operation.MEAN: ("reference", "reference_images"),
    }
    if operation in needs and needs[operation][0] not in sets:
        raise InvalidArgument(
            needs[operation][1],
            f"required by {field}.operation {operation.value}",
            reason=Reason.FIELD_REQUIRED,
        )
    with within(f"{field}.selection"):
        mask = _mask(loaded, site, edit.selection).to(loaded.device)
    resolved = ResolvedEdit(site, operation, mask)
    if operation is Operation.SET:
        return replace(resolved, value=_finite(edit.value, f"{field}.value"))
    if operation is Operation.SCALE:
        return replace(resolved, factor=_finite(edit.factor, f"{field}.factor"))
    if operation is Operation.ADD:
        alpha = _finite(edit.alpha, f"{field}.alpha")
        width = edit_space(loaded, site)[-1]
        vector = _direction(loaded, edit, width, field)
        return replace(resolved, delta=(alpha * vector).to(loaded.device))
    return resolved
