"""The two maps other methods already define: the class-embedding importance map of
ProjectToClassSpace (reused from importance.py) and one feature's patch activation map."""

from __future__ import annotations

from contextlib import suppress

import numpy as np
import torch
import torch.nn.functional as F

from vitscope_server.core.model.adapters import ModelAdapter
from vitscope_server.core.model.capture import ForwardStopped, capture_sites, last_block_needed
from vitscope_server.core.model.class_importance import (
    importance_gradients,
    importance_maps,
    projectable_blocks,
)
from vitscope_server.core.model.class_space import ClassSpace
from vitscope_server.core.model.sites import resolve_site
from vitscope_server.core.runtime.cancel import CancelToken


def class_embedding_maps(
    adapter: ModelAdapter,
    space: ClassSpace,
    pixels: torch.Tensor,
    targets: torch.Tensor,
    cancel: CancelToken,
) -> torch.Tensor:
    """[B, H, W]: the summed, min-max normalized importance map over every block, exactly as
    ProjectToClassSpace returns it."""
    blocks = tuple(projectable_blocks(adapter))
    inputs = {b: adapter.block_input_site(b) for b in blocks}
    sites = [*inputs.values(), *(adapter.block_site(b, "attn.probs") for b in blocks)]
    # Not inference mode: the importance gradients differentiate the captured tensors.
    with torch.no_grad(), capture_sites(adapter, sites, pixels.shape[0], cancel) as captured:
        adapter.forward(pixels)
    residual = {b - 1: captured[site.name] for b, site in inputs.items()}
    probs = {b: captured[f"blocks.{b}.attn.probs"] for b in blocks}
    raw = importance_gradients(adapter, space, probs, residual, blocks, targets, cancel)
    maps = importance_maps(adapter, raw, pixels)
    return torch.from_numpy(np.stack([m.summed for m in maps]))


def feature_maps(
    adapter: ModelAdapter,
    site_name: str,
    channel: int | None,
    pixels: torch.Tensor,
    cancel: CancelToken,
) -> tuple[torch.Tensor, list[int]]:
    """[B, H, W] one channel of a token site over the patch tokens, and the channel per image:
    the one given, or the one with the largest mean over the image's patch tokens."""
    site = resolve_site(adapter, site_name)
    with torch.inference_mode():
        stop = last_block_needed(adapter, [site])
        capture = capture_sites(adapter, [site], pixels.shape[0], cancel, stop)
        with capture as captured, suppress(ForwardStopped):
            adapter.forward(pixels)
        patches = captured[site.name][:, site.num_prefix_tokens :].float()
        if channel is None:
            channels = patches.mean(dim=1).argmax(dim=-1)
        else:
            channels = torch.full((patches.shape[0],), channel, device=patches.device)
        index = channels.view(-1, 1, 1).expand(-1, patches.shape[1], 1)
        maps = patches.gather(2, index)[..., 0].reshape(patches.shape[0], *site.grid)
        return maps.clone(), [int(c) for c in channels.tolist()]


def display_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, h, w] -> [B, H, W]: each map min-max normalized (a constant map: zeros), then
    bilinearly upsampled to the input size."""
    low = maps.amin(dim=(1, 2), keepdim=True)
    high = maps.amax(dim=(1, 2), keepdim=True)
    unit = torch.where(high > low, (maps - low) / (high - low), torch.zeros_like(maps))
    return F.interpolate(unit[:, None].float(), size=size, mode="bilinear", align_corners=False)[
        :, 0
    ]
