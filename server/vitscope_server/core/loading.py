"""Turns a ModelSpec into a ready adapter on a device, with the identity of its weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vitscope_server.core.adapters import ModelAdapter
from vitscope_server.core.cancel import NEVER_CANCELLED
from vitscope_server.core.capture import capture_sites
from vitscope_server.core.errors import FailedPrecondition, Reason, VitscopeError
from vitscope_server.core.specs import ModelSpec
from vitscope_server.core.weights import (
    file_digest,
    hub_failure,
    load_state_dict_strictly,
    read_state_dict,
    require_hub,
)


@dataclass(frozen=True)
class LoadedModel:
    spec: ModelSpec
    adapter: ModelAdapter
    weights_identity: str
    device: torch.device
    # Shape of every canonical site for a batch of one, from a probe forward at load.
    site_shapes: dict[str, tuple[int, ...]]


def probe_site_shapes(adapter: ModelAdapter, device: torch.device) -> dict[str, tuple[int, ...]]:
    """One forward on a blank image, reading every canonical site: shapes, and proof the model runs."""
    sites = adapter.canonical_sites()
    blank = torch.zeros((1, *adapter.data_config.input_size), device=device)
    with torch.inference_mode(), capture_sites(adapter, sites, 1, NEVER_CANCELLED) as captured:
        adapter.forward(blank)
    return {site.name: tuple(captured[site.name].shape) for site in sites if site.name in captured}


def _build_timm(spec: ModelSpec) -> tuple[ModelAdapter, str]:
    from vitscope_server.core.adapters.timm_models import build_timm, timm_adapter

    if spec.hub_tag is not None:
        require_hub(spec)
        try:
            model = build_timm(spec, spec.hub_tag)
        except VitscopeError:
            raise
        except Exception as exc:
            raise hub_failure(spec, exc) from exc
        return timm_adapter(
            spec, model
        ), f"hub:{spec.architecture}{'.' + spec.hub_tag if spec.hub_tag else ''}"
    model = build_timm(spec, None)
    weights_file = spec.weights_file
    if weights_file is None:
        return timm_adapter(spec, model), f"random:seed={spec.seed}"
    load_state_dict_strictly(model, read_state_dict(weights_file), weights_file)
    return timm_adapter(spec, model), file_digest(weights_file)


def _build_open_clip(spec: ModelSpec) -> tuple[ModelAdapter, str]:
    from vitscope_server.core.adapters.open_clip_tower import OpenClipTowerAdapter, build_open_clip

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
        return OpenClipTowerAdapter(spec, model), f"hub:{spec.architecture}/{spec.hub_tag}"
    return OpenClipTowerAdapter(spec, build_open_clip(spec, None)), f"random:seed={spec.seed}"


def load_model(spec: ModelSpec, device: torch.device) -> LoadedModel:
    """Builds the model (seeded), loads weights, moves it to the device in eval mode."""
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
    return LoadedModel(spec, adapter, identity, device, probe_site_shapes(adapter, device))
