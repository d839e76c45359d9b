"""Turns a ModelSpec into a ready adapter on a device, with the identity of its weights."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

import torch

from vitscope_server.core.model.adapters import ModelAdapter
from vitscope_server.core.model.anatomy import settle_anatomy
from vitscope_server.core.model.sae_loading import attach_saes
from vitscope_server.core.model.specs import ModelSpec
from vitscope_server.core.model.weights import (
    file_digest,
    hub_failure,
    hub_identity,
    load_state_dict_strictly,
    read_state_dict,
    require_hub,
)
from vitscope_server.core.runtime.errors import FailedPrecondition, Reason, VitscopeError


@dataclass(frozen=True)
class LoadedModel:
    spec: ModelSpec
    adapter: ModelAdapter
    weights_identity: str
    device: torch.device
    # Shape of every canonical site for a batch of one, from a probe forward at load.
    site_shapes: dict[str, tuple[int, ...]]


def _timm_hub_identity(spec: ModelSpec, model: torch.nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    tag = f"{spec.architecture}.{cfg.get('tag') or spec.hub_tag}".rstrip(".")
    repo = cfg.get("hf_hub_id")
    if not repo:
        return f"hub:{tag}"
    named = cfg.get("hf_hub_filename")
    files = (named,) if named else ("model.safetensors", "pytorch_model.bin")
    return hub_identity(str(repo).partition("@")[0], files, f"hub:{tag}")


def _open_clip_hub_identity(spec: ModelSpec) -> str:
    """open_clip reads `hf_hub` as "org/repo/[file]", preferring a .safetensors alternative."""
    import open_clip
    from open_clip.pretrained import HF_WEIGHTS_NAME, _get_safe_alternatives

    fallback = f"hub:{spec.architecture}/{spec.hub_tag}"
    hub = (open_clip.get_pretrained_cfg(spec.architecture, spec.hub_tag or "") or {}).get("hf_hub")
    if not hub:
        return fallback
    repo, filename = posixpath.split(str(hub))
    filename = filename or HF_WEIGHTS_NAME
    return hub_identity(repo, (*_get_safe_alternatives(filename), filename), fallback)


def _build_timm(spec: ModelSpec) -> tuple[ModelAdapter, str]:
    from vitscope_server.core.model.adapters.timm_models import build_timm, timm_adapter

    if spec.hub_tag is not None:
        require_hub(spec)
        try:
            model = build_timm(spec, spec.hub_tag)
        except VitscopeError:
            raise
        except Exception as exc:
            raise hub_failure(spec, exc) from exc
        return timm_adapter(spec, model), _timm_hub_identity(spec, model)
    model = build_timm(spec, None)
    weights_file = spec.weights_file
    if weights_file is None:
        return timm_adapter(spec, model), f"random:seed={spec.seed}"
    load_state_dict_strictly(model, read_state_dict(weights_file), weights_file)
    return timm_adapter(spec, model), file_digest(weights_file)


def _build_open_clip(spec: ModelSpec) -> tuple[ModelAdapter, str]:
    from vitscope_server.core.model.adapters.open_clip_tower import (
        OpenClipTowerAdapter,
        build_open_clip,
    )

    weights_file = spec.weights_file
    if weights_file is not None:
        if not weights_file.is_file():
            raise FailedPrecondition(
                f"weights file {weights_file} does not exist", reason=Reason.WEIGHTS_UNUSABLE
            )
        model = build_open_clip(spec, None)
        load_state_dict_strictly(model, read_state_dict(weights_file), weights_file)
        return OpenClipTowerAdapter(spec, model), file_digest(weights_file)
    if spec.hub_tag is not None:
        if not spec.hub_tag:
            raise FailedPrecondition(
                f"model {spec.name}: open_clip needs a pretrained tag, e.g. hub:openai",
                reason=Reason.WEIGHTS_UNUSABLE,
            )
        require_hub(spec)
        try:
            model = build_open_clip(spec, spec.hub_tag)
        except VitscopeError:
            raise
        except Exception as exc:
            raise hub_failure(spec, exc) from exc
        return OpenClipTowerAdapter(spec, model), _open_clip_hub_identity(spec)
    return OpenClipTowerAdapter(spec, build_open_clip(spec, None)), f"random:seed={spec.seed}"


def compile_blocks(adapter: ModelAdapter) -> None:
    """Compiles each block in place (nn.Module.compile). Capture hooks stay plain Python
    around the compiled blocks (core/model/capture.py); batch sizes vary, so the shapes are
    compiled dynamic."""
    import torch._dynamo

    # Sites are read by hooks added per request: the compiled code must notice them (by
    # default the compiler ignores hooks added after compiling, and would call stale ones).
    torch._dynamo.config.skip_nnmodule_hook_guards = False
    for block in adapter.blocks:
        adapter.root.get_submodule(block.path).compile(dynamic=True)
    adapter.compiled = True


def load_model(spec: ModelSpec, device: torch.device, *, compiled: bool = False) -> LoadedModel:
    """Builds the model (seeded), loads weights, moves it to the device in eval mode, and
    loads the SAEs of its spec beside it; with `compiled`, its blocks run compiled after the
    probe has settled the anatomy eagerly."""
    torch.manual_seed(spec.seed)
    try:
        adapter, identity = _build_timm(spec) if spec.family == "timm" else _build_open_clip(spec)
    except VitscopeError:
        raise
    except (RuntimeError, ValueError, TypeError, KeyError) as exc:
        raise FailedPrecondition(
            f"model {spec.name}: {spec.family} cannot build {spec.architecture}: {exc}"
        ) from exc
    adapter.module.to(device).eval().requires_grad_(False)
    shapes = settle_anatomy(adapter, device, adapter.prefix_hint)
    if not adapter.blocks:
        reasons = "; ".join(f"{n.site}: {n.reason}" for n in adapter.notes[:3])
        raise FailedPrecondition(
            f"model {spec.name}: no block passed the load-time probe ({reasons})"
        )
    adapter.notes.extend(attach_saes(adapter, spec.saes, shapes, device))
    if compiled:
        compile_blocks(adapter)
    return LoadedModel(spec, adapter, identity, device, shapes)
