"""Results off the device in one copy per batch.

Every tensor a batch returns (each request's reduced sites, logits, top predictions) is
gathered into one byte buffer on the device and copied once into pinned host memory; each
result is then a numpy view of that copy. On the CPU the tensors already are host memory and
are viewed as they are.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch


@functools.cache
def _host_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy type of a tensor's elements; bfloat16 has none and travels as its bits."""
    if dtype == torch.bfloat16:
        return np.dtype(np.uint16)
    return torch.empty(0, dtype=dtype).numpy().dtype


def _host_view(tensor: torch.Tensor) -> np.ndarray:
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()


def to_host(tensors: Sequence[torch.Tensor], *, gather: bool | None = None) -> list[np.ndarray]:
    """Host arrays of `tensors`, in order. `gather` (default: when any lives on a GPU) copies
    them all in one transfer, those already on the host moved to the GPU's bytes first;
    otherwise each is viewed in place."""
    if not tensors:
        return []
    devices = [t.device for t in tensors if t.device.type != "cpu"]
    if gather is None:
        gather = bool(devices)
    if not gather:
        return [_host_view(t.contiguous()) for t in tensors]
    device = devices[0] if devices else tensors[0].device
    flat = [t.to(device).contiguous().reshape(-1).view(torch.uint8) for t in tensors]
    device_bytes = torch.cat(flat) if len(flat) > 1 else flat[0]
    pinned = device_bytes.device.type == "cuda"
    host = torch.empty(device_bytes.numel(), dtype=torch.uint8, pin_memory=pinned)
    host.copy_(device_bytes, non_blocking=pinned)
    if pinned:
        torch.cuda.current_stream(device_bytes.device).synchronize()
    buffer = host.numpy()
    arrays, offset = [], 0
    for tensor, part in zip(tensors, flat, strict=True):
        size = part.numel()
        dtype = _host_dtype(tensor.dtype)
        arrays.append(buffer[offset : offset + size].view(dtype).reshape(tuple(tensor.shape)))
        offset += size
    return arrays
