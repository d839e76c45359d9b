"""Finding the residual blocks of any timm model, and proposing their parts.

Blocks come from the model's own feature_info (the modules timm names as its
feature stages or blocks), so the search does not depend on one family's
attribute layout. Inside a block, timm's names carry the anatomy: the attention
module (`attn`; CoaT's `factoratt_crpe`), the `mlp` with its output projection,
and the drop-path modules that mark exactly what each sublayer adds to the
residual stream (`drop_path1`/`drop_path2`, or one `drop_path` called twice),
after any LayerScale or post-norm. The probe (core/model/anatomy.py) checks them all.
"""

from __future__ import annotations

import torch
from torch import nn

from vitscope_server.core.model.adapters.base import BlockParts, HeadSplit, Tap, UnavailableSite

ATTENTION_NAMES = ("attn", "factoratt_crpe")
# The module read as the `final` site, first found.
FINAL_NORMS = ("norm", "norm4")
_OUTPUT_PROJECTIONS = ("fc2", "c_proj", "proj", "w3")


def is_block(module: nn.Module) -> bool:
    children = dict(module.named_children())
    return "mlp" in children and any(name in children for name in ATTENTION_NAMES)


def _outermost_blocks(root: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    found: list[tuple[str, nn.Module]] = []
    for name, module in root.named_modules(prefix=prefix):
        if module is root or not is_block(module):
            continue
        if any(name.startswith(outer + ".") for outer, _ in found):
            continue
        found.append((name, module))
    return found


def _feature_paths(model: nn.Module) -> list[str]:
    """Module paths of timm's feature_info in order, each once; the whole model without it."""
    info = getattr(model, "feature_info", None) or []
    paths: list[str] = []
    for entry in info:
        path = entry.get("module") if isinstance(entry, dict) else None
        if isinstance(path, str) and path not in paths:
            paths.append(path)
    return paths or [""]


def _resolves(model: nn.Module, path: str) -> bool:
    """feature_info can name a module that is not there (Twins says block.0 for blocks.0)."""
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Residual blocks in forward (registration) order: every block found by its parts, and
    each feature_info module with none inside, an unknown kind (or each member of a
    container of them), which still serves its output."""
    blocks = _outermost_blocks(model, "")
    known = [path for path, _ in blocks]
    for path in _feature_paths(model):
        if not path or not _resolves(model, path):
            continue
        if any(path == k or k.startswith(path + ".") or path.startswith(k + ".") for k in known):
            continue
        module = model.get_submodule(path)
        if isinstance(module, (nn.ModuleList, nn.Sequential)):
            blocks.extend((f"{path}.{name}", child) for name, child in module.named_children())
        else:
            blocks.append((path, module))
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(blocks, key=lambda block: order.get(block[0], len(order)))


def _output_projection(mlp: nn.Module) -> str | None:
    """Name of the MLP child whose input is the hidden layer (after activation, gate, norm)."""
    children = dict(mlp.named_children())
    for name in _OUTPUT_PROJECTIONS:
        if isinstance(children.get(name), (nn.Linear, nn.Conv2d)):
            return name
    linears = [n for n, c in children.items() if isinstance(c, (nn.Linear, nn.Conv2d))]
    return linears[-1] if len(linears) > 1 else None


def _sublayer_taps(path: str, block: nn.Module) -> dict[str, Tap]:
    children = dict(block.named_children())
    if "drop_path1" in children and "drop_path2" in children:
        return {"attn.out": Tap(f"{path}.drop_path1"), "mlp.out": Tap(f"{path}.drop_path2")}
    if "drop_path" in children:
        shared = f"{path}.drop_path"
        return {"attn.out": Tap(shared, calls=2), "mlp.out": Tap(shared, call_index=1, calls=2)}
    return {}


def block_parts(path: str, block: nn.Module) -> BlockParts:
    """The parts of one block, by timm's names; what is missing says why."""
    kind = type(block).__name__
    if not is_block(block):
        reason = f"block class {kind}: no separate attention and MLP modules found"
        parts = ("attn.out", "attn.probs", "mlp.hidden", "mlp.out")
        return BlockParts(path, {}, dict.fromkeys(parts, reason))
    taps = _sublayer_taps(path, block)
    unavailable = {}
    if not taps:
        reason = f"block class {kind} has no drop-path module marking what it adds to the residual"
        unavailable = {"attn.out": reason, "mlp.out": reason}
    mlp = block.get_submodule("mlp")
    projection = _output_projection(mlp)
    if projection is None:
        unavailable["mlp.hidden"] = f"MLP class {type(mlp).__name__} has no output projection"
    else:
        taps["mlp.hidden"] = Tap(f"{path}.mlp.{projection}", from_input=True)
    attention_name = next(name for name in ATTENTION_NAMES if hasattr(block, name))
    attention_path = f"{path}.{attention_name}"
    attention = block.get_submodule(attention_name)
    if isinstance(getattr(attention, "attn_drop", None), nn.Module):
        taps["attn.probs"] = Tap(f"{attention_path}.attn_drop")
    else:
        unavailable["attn.probs"] = (
            f"attention class {type(attention).__name__} exposes no probabilities"
        )
    heads = _head_split(path, block, attention)
    if heads is None or "attn.probs" not in taps:
        unavailable["attn.heads"] = (
            f"attention class {type(attention).__name__} has no output projection `proj` "
            "with `num_heads` and explicit probabilities"
        )
    else:
        taps["attn.heads"] = Tap(f"{attention_path}.proj", from_input=True)
    residual = (Tap(f"{path}.norm1", from_input=True),) if hasattr(block, "norm1") else ()
    return BlockParts(path, taps, unavailable, attention_path, residual, heads)


def _head_split(path: str, block: nn.Module, attention: nn.Module) -> HeadSplit | None:
    """Heads of an attention whose `proj` takes the heads' context vectors concatenated."""
    heads = getattr(attention, "num_heads", None)
    if not isinstance(getattr(attention, "proj", None), nn.Linear) or not isinstance(heads, int):
        return None
    if isinstance(getattr(block, "gamma_1", None), torch.Tensor):
        return HeadSplit(heads, path, layer_scale_attribute="gamma_1")
    scale = getattr(block, "ls1", None)
    return HeadSplit(heads, f"{path}.ls1" if hasattr(scale, "gamma") else None)


def find_blocks(model: nn.Module) -> tuple[list[BlockParts], list[UnavailableSite]]:
    """Proposed parts of every residual block (the probe drops those it cannot serve)."""
    return [block_parts(path, module) for path, module in _candidates(model)], []


def prefix_hint(model: nn.Module) -> int:
    """The model's declared number of prefix tokens (class, distillation, register), if any."""
    for name in ("num_prefix_tokens", "num_tokens"):
        value = getattr(model, name, None)
        if isinstance(value, int):
            return value
    token = getattr(model, "cls_token", None)
    return int(token.shape[-2]) if isinstance(token, nn.Parameter) else 0


def unfuse(attention: nn.Module, key: str, saved: dict[str, bool]) -> None:
    """Switches a timm attention module to its explicit path (where attn_drop sees the
    probabilities), remembering its setting under `key`."""
    if hasattr(attention, "fused_attn"):
        saved[key] = bool(attention.fused_attn)
        setattr(attention, "fused_attn", False)  # noqa: B010 - a torch.jit.Final attribute


def restore_fused(attention: nn.Module, key: str, saved: dict[str, bool]) -> None:
    """Undoes unfuse."""
    if key in saved:
        setattr(attention, "fused_attn", saved.pop(key))  # noqa: B010
