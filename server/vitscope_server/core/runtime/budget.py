"""Memory admission: a request's bytes are estimated before anything is allocated for it.

Each request is held to a per-request budget, and all admitted requests together to a
process-wide one. A request that would never fit is refused at once; one that fits later
waits in a bounded queue (honouring its cancel token), like a compute slot.
"""

from __future__ import annotations

import math
import os
import resource
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from vitscope_server.core.model.adapters import ModelAdapter
from vitscope_server.core.model.adapters.base import BlockAnatomy
from vitscope_server.core.model.images import ImageInput, check_size, open_header
from vitscope_server.core.runtime.allocator import Trimmer
from vitscope_server.core.runtime.cancel import CancelToken
from vitscope_server.core.runtime.errors import Reason, ResourceExhausted

_FLOAT = 4
# A transformer block's live tensors per token during a forward, in units of the width:
# the residual, qkv (3), the attention output and the MLP hidden (4), with slack.
_FORWARD_WIDTHS = 12
# What autograd keeps per block and token for a backward pass, in units of the width.
_BACKWARD_WIDTHS = 16
_HEAD_WIDTH = 64
# Keys per query where attention is windowed or fused and forms no [T, T] matrix.
_WINDOW_KEYS = 256


def _mib(nbytes: int) -> str:
    return f"{nbytes / (1 << 20):.1f} MiB"


class RequestTooLarge(ResourceExhausted):
    """The request alone needs more than a budget allows; it never fits."""

    default_reason = Reason.REQUEST_BUDGET_EXCEEDED


class ServerBudgetExceeded(ResourceExhausted):
    """The request cannot be admitted next to what is already admitted; later it may."""

    default_reason = Reason.SERVER_BUDGET_EXCEEDED


@dataclass(frozen=True)
class ModelFootprint:
    """Bytes one image costs in a model, from each block's own tokens and width as the
    load-time probe found them (a pooling model's later stages are cheaper)."""

    input_bytes: int
    forward_bytes: int
    site_bytes: int
    backward_bytes: int

    @classmethod
    def of(cls, adapter: ModelAdapter) -> ModelFootprint:
        """Computed once per anatomy (the probe settles it once at load), since every
        request's estimate reads it."""
        cached = _FOOTPRINTS.get(adapter)
        if cached is None or cached[0] is not adapter.blocks:
            cached = _FOOTPRINTS[adapter] = (adapter.blocks, cls._measure(adapter))
        return cached[1]

    @classmethod
    def _measure(cls, adapter: ModelAdapter) -> ModelFootprint:
        channels, height, width = adapter.data_config.input_size
        blocks = [_block_bytes(block) for block in adapter.blocks] or [
            _block_bytes_of(adapter.num_prefix_tokens + math.prod(adapter.grid), adapter.embed_dim)
        ]
        return cls(
            input_bytes=channels * height * width * _FLOAT,
            forward_bytes=max(b.forward for b in blocks),
            site_bytes=max(b.site for b in blocks),
            backward_bytes=sum(b.backward for b in blocks),
        )


_FOOTPRINTS: weakref.WeakKeyDictionary[ModelAdapter, tuple[list[BlockAnatomy], ModelFootprint]] = (
    weakref.WeakKeyDictionary()
)


@dataclass(frozen=True)
class _BlockBytes:
    forward: int
    site: int
    backward: int


def _block_bytes_of(tokens: int, width: int, keys: int | None = None) -> _BlockBytes:
    """A block over `tokens` tokens of `width`, each query attending to `keys` keys (all tokens
    when None); the forward's peak is one block's working set."""
    heads = max(1, width // _HEAD_WIDTH)
    attention = heads * tokens * (tokens if keys is None else min(keys, tokens)) * _FLOAT
    per_token = tokens * width * _FLOAT
    return _BlockBytes(
        forward=_FORWARD_WIDTHS * per_token + 2 * attention,
        site=max(4 * per_token, attention),
        backward=_BACKWARD_WIDTHS * per_token + 2 * attention,
    )


def _block_bytes(block: BlockAnatomy) -> _BlockBytes:
    """Global attention with explicit probabilities holds [heads, T, T]; windowed attention, or
    an attention that never forms the matrix (fused kernels), holds about a window's worth."""
    tokens = block.num_prefix_tokens + math.prod(block.grid)
    explicit = "attn.probs" in block.taps and not block.windowed
    return _block_bytes_of(tokens, block.width, None if explicit else _WINDOW_KEYS)


def image_bytes(adapter: ModelAdapter, image: ImageInput, field: str, max_pixels: int) -> int:
    """Decoded pixels, their RGB copy and the largest image the model's transform builds;
    an image over the pixel limit, before or after the resize, is refused here by name."""
    if image.preprocessed is not None:
        return int(image.preprocessed.size) * _FLOAT
    if image.pixels is not None and image.pixels.ndim >= 2:
        width, height, bands = image.pixels.shape[1], image.pixels.shape[0], 4
        field = f"{field}.pixels"
    elif image.encoded is not None:
        field = f"{field}.encoded"
        header = open_header(image.encoded, field)
        width, height = header.size
        bands = len(header.getbands()) * (4 if header.mode in ("I", "F") else 2)
    else:
        return 0
    check_size(adapter, width, height, field, max_pixels)
    return width * height * (bands + 3) + 3 * adapter.preprocess_peak_pixels(width, height)


def images_bytes(
    adapter: ModelAdapter,
    images: Sequence[ImageInput],
    max_pixels: int,
    fields: Sequence[str] | None = None,
) -> int:
    """All images of a request, decoded and preprocessed; errors name images[i] or fields[i]."""
    footprint = ModelFootprint.of(adapter)
    names = fields if fields is not None else [f"images[{i}]" for i in range(len(images))]
    return sum(
        image_bytes(adapter, image, field, max_pixels) + footprint.input_bytes
        for image, field in zip(images, names, strict=True)
    )


def forward_bytes(adapter: ModelAdapter, batch: int, sites: int) -> int:
    """A forward of `batch` images with `sites` tensors captured and kept for the result."""
    footprint = ModelFootprint.of(adapter)
    return batch * (footprint.forward_bytes + sites * footprint.site_bytes)


def named_forward_bytes(
    adapter: ModelAdapter, shapes: Mapping[str, tuple[int, ...]], batch: int, sites: Sequence[str]
) -> int:
    """forward_bytes with the named sites at the sizes the load-time probe measured (`shapes`,
    for a batch of one); a site it did not measure (a raw module path) counts as the largest."""
    footprint = ModelFootprint.of(adapter)
    captured = sum(
        math.prod(shapes[name][1:]) * _FLOAT if name in shapes else footprint.site_bytes
        for name in sites
    )
    return batch * (footprint.forward_bytes + captured)


def backward_bytes(adapter: ModelAdapter, batch: int, pixels_per_image: int) -> int:
    """Forward and backward of `batch` images of `pixels_per_image` (optimization)."""
    footprint = ModelFootprint.of(adapter)
    _, height, width = adapter.data_config.input_size
    scale = max(1.0, pixels_per_image / (height * width))
    return int(batch * scale * (footprint.backward_bytes + 4 * footprint.input_bytes))


_CGROUP_LIMITS = (
    Path("/sys/fs/cgroup/memory.max"),
    Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
)


def memory_limit_bytes() -> int:
    """The memory this process may use: its container's cgroup limit, RLIMIT_AS, or the RAM."""
    limits = [os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")]
    for path in _CGROUP_LIMITS:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            limits.append(int(text))
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        limits.append(soft)
    return min(limits)


class MemoryBudget:
    """Bytes admitted requests may hold: `request_bytes` each, `server_bytes` in all."""

    def __init__(
        self,
        request_bytes: int,
        server_bytes: int,
        max_waiting: int,
        trimmer: Trimmer | None = None,
    ) -> None:
        """trimmer: told when the budget empties, so that large requests' freed memory goes
        back to the system."""
        self.request_bytes = request_bytes
        self.server_bytes = server_bytes
        self.max_waiting = max_waiting
        self._trimmer = trimmer
        self._cond = threading.Condition()
        self._reserved = 0
        self._waiting = 0
        self._largest = 0  # the largest reservation since the budget was last empty

    @property
    def reserved(self) -> int:
        return self._reserved

    @property
    def waiting(self) -> int:
        return self._waiting

    def _check(self, nbytes: int) -> None:
        if nbytes > self.request_bytes:
            raise RequestTooLarge(
                f"the request needs about {_mib(nbytes)}, over the per-request memory budget of "
                f"{_mib(self.request_bytes)} (request_memory_bytes); send fewer or smaller "
                "images, fewer sites or a smaller batch"
            )
        if nbytes > self.server_bytes:
            raise RequestTooLarge(
                f"the request needs about {_mib(nbytes)}, over the server's memory budget of "
                f"{_mib(self.server_bytes)} (server_memory_bytes)"
            )

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    @contextmanager
    def reserve(self, nbytes: int, cancel: CancelToken) -> Iterator[None]:
        """Holds nbytes of the server's budget for the block, waiting (bounded) for room.
        Waiters sleep until a release or their own cancellation wakes them: no polling."""
        self._check(nbytes)
        with self._cond:
            if self._reserved + nbytes > self.server_bytes:
                if self._waiting >= self.max_waiting:
                    raise ServerBudgetExceeded(
                        f"server memory budget full: {_mib(self._reserved)} of "
                        f"{_mib(self.server_bytes)} (server_memory_bytes) in use and "
                        f"{self._waiting} requests waiting; retry later"
                    )
                self._waiting += 1
                unsubscribe = cancel.on_cancel(self._wake)
                try:
                    while self._reserved + nbytes > self.server_bytes and not cancel.cancelled:
                        self._cond.wait()
                finally:
                    unsubscribe()
                    self._waiting -= 1
            cancel.raise_if_cancelled()
            self._reserved += nbytes
            self._largest = max(self._largest, nbytes)
        try:
            yield
        finally:
            with self._cond:
                self._reserved -= nbytes
                self._cond.notify_all()
                emptied, largest = self._reserved == 0, self._largest
                if emptied:
                    self._largest = 0
            if emptied and self._trimmer is not None:
                self._trimmer.released(largest)
