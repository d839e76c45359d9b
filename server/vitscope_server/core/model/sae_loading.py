"""A model's SAEs loaded at start-up beside it, each checked against the site it reads.

An SAE that cannot be served (a missing file, a site the model lacks, a width that does not
match) leaves the model serving; the SAE's sites are listed as unavailable with the reason.
"""

from __future__ import annotations

import logging

import torch

from vitscope_server.core.model.adapters import Layout, ModelAdapter
from vitscope_server.core.model.adapters.base import UnavailableSite
from vitscope_server.core.model.sae import SaeOutput, ServedSae, sae_site_name
from vitscope_server.core.model.sae_files import served_sae
from vitscope_server.core.model.sites import resolve_site
from vitscope_server.core.model.specs import SaeSource
from vitscope_server.core.runtime.errors import VitscopeError

log = logging.getLogger(__name__)


def _check_site(adapter: ModelAdapter, sae: ServedSae, shapes: dict[str, tuple[int, ...]]) -> str:
    """Why the SAE cannot read its site on this model, or "" when it can."""
    try:
        site = resolve_site(adapter, sae.info.site, "hook_name")
    except VitscopeError as exc:
        return str(exc)
    shape = shapes.get(site.name)
    if site.layout is not Layout.TOKENS or shape is None or len(shape) != 3:
        return f"site {site.name!r} holds no [tokens, channels] tensor"
    if shape[-1] != sae.info.d_in:
        return f"site {site.name!r} has {shape[-1]} channels, the SAE reads {sae.info.d_in}"
    return ""


def attach_saes(
    adapter: ModelAdapter,
    sources: list[SaeSource],
    shapes: dict[str, tuple[int, ...]],
    device: torch.device,
) -> list[UnavailableSite]:
    """Loads each SAE onto the adapter and adds its three sites' shapes; returns notes for
    those that could not be served."""
    notes = []
    for source in sources:
        try:
            sae = served_sae(source.name, source.path, device)
        except VitscopeError as exc:
            notes.append(UnavailableSite(f"@sae:{source.name}", str(exc)))
            continue
        reason = _check_site(adapter, sae, shapes)
        if reason:
            notes.append(UnavailableSite(sae_site_name(sae.info.site, source.name), reason))
            continue
        adapter.saes[source.name] = sae
        batch, tokens, width = shapes[sae.info.site]
        for output in SaeOutput:
            channels = sae.info.d_sae if output is SaeOutput.LATENTS else width
            shapes[sae_site_name(sae.info.site, source.name, output)] = (batch, tokens, channels)
    for note in notes:
        log.warning("SAE not served: %s: %s", note.site, note.reason)
    return notes
