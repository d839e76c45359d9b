"""Site names -> where to read them: canonical names first, then raw module paths."""

from __future__ import annotations

import re
from dataclasses import replace

from vitscope_server.core.model.adapters import Layout, ModelAdapter, SiteDef
from vitscope_server.core.model.sae import SaeOutput, SaeRead, sae_site_name, split_sae_site
from vitscope_server.core.runtime.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Reason,
    quote,
)

_BLOCK_SITE = re.compile(
    r"^blocks\.(\d+)\.(out|attn\.out|attn\.probs|attn\.heads|mlp\.hidden|mlp\.out)$"
)
CANONICAL_FORMS = (
    "embed, final, blocks.{i}.out, blocks.{i}.attn.out, blocks.{i}.attn.probs, "
    "blocks.{i}.attn.heads, blocks.{i}.mlp.hidden, blocks.{i}.mlp.out, a module path, or "
    "{site}@sae:{name} (with .recon or .error)"
)


def resolve_site(adapter: ModelAdapter, name: str, field: str = "sites") -> SiteDef:
    if not name:
        raise InvalidArgument(field, f"empty site name; use {CANONICAL_FORMS}")
    sae_site = split_sae_site(name)
    if sae_site is not None:
        return _resolve_sae_site(adapter, name, *sae_site, field)
    if name == "embed":
        return adapter.embed_site()
    if name == "final":
        final = adapter.final_site()
        if final is None:
            raise FailedPrecondition(
                f"{field}: model {adapter.spec.name} has no 'final' site",
                subject=adapter.spec.name,
                field=field,
            )
        return final
    match = _BLOCK_SITE.match(name)
    if match:
        index = int(match.group(1))
        if index >= len(adapter.blocks):
            raise NotFound(
                Reason.SITE_NOT_FOUND,
                name,
                f"{field}: site {quote(name)}: block {index} does not exist; "
                f"model {adapter.spec.name} has blocks 0..{len(adapter.blocks) - 1}",
                field=field,
                metadata={"model": adapter.spec.name},
            )
        part = match.group(2)
        reason = adapter.unavailable_reason(index, part)
        if reason is not None:
            raise FailedPrecondition(
                f"{field}: site {quote(name)} is unavailable on model {adapter.spec.name}: "
                f"{reason}; its modules can still be read by module path",
                subject=adapter.spec.name,
                field=field,
            )
        return adapter.block_site(index, part)
    try:
        adapter.root.get_submodule(name)
    except AttributeError:
        raise NotFound(
            Reason.SITE_NOT_FOUND,
            name,
            f"{field}: site {quote(name)} is neither a canonical site nor a module of "
            f"{adapter.spec.name}; use {CANONICAL_FORMS}",
            field=field,
            metadata={"model": adapter.spec.name},
        ) from None
    block = next(
        (b for b in adapter.blocks if name == b.path or name.startswith(b.path + ".")),
        adapter.blocks[0],
    )
    return SiteDef(name, name, Layout.RAW, block.grid, block.num_prefix_tokens)


def _resolve_sae_site(
    adapter: ModelAdapter, name: str, base_name: str, sae_name: str, output: SaeOutput, field: str
) -> SiteDef:
    """`{site}@sae:{name}[.recon|.error]`: the base site's tokens through a served SAE."""
    sae = adapter.saes.get(sae_name)
    if sae is None:
        served = sorted(adapter.saes)
        raise NotFound(
            Reason.SITE_NOT_FOUND,
            name,
            f"{field}: site {quote(name)}: model {adapter.spec.name} serves no SAE "
            f"{quote(sae_name)}; its SAEs: {served}",
            field=field,
            metadata={"model": adapter.spec.name},
        )
    base = resolve_site(adapter, base_name, field)
    if base.name != sae.info.site:
        raise NotFound(
            Reason.SITE_NOT_FOUND,
            name,
            f"{field}: site {quote(name)}: SAE {sae_name!r} reads {sae.info.site!r}, "
            f"not {quote(base_name)}; use {sae.info.site}@sae:{sae_name}",
            field=field,
            metadata={"model": adapter.spec.name},
        )
    return replace(base, name=name, sae_read=SaeRead(sae, output))


def sae_sites(adapter: ModelAdapter) -> list[SiteDef]:
    """The latents, reconstruction and error site of every SAE the model serves."""
    return [
        resolve_site(adapter, sae_site_name(sae.info.site, name, output))
        for name, sae in adapter.saes.items()
        for output in SaeOutput
    ]
