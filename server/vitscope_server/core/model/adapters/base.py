"""The anatomy every model family exposes, so capture and methods need not know the family."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from enum import Enum
from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torch import nn

from vitscope_server.core.model.adapters.capabilities import (
    AttentionMath,
    AttentionProbs,
    ClassifierHead,
    Missing,
)
from vitscope_server.core.model.resize_size import peak_pixels
from vitscope_server.core.model.specs import ModelSpec

if TYPE_CHECKING:
    from vitscope_server.core.model.sae import SaeRead, ServedSae


class Layout(Enum):
    """How a captured tensor is arranged after canonicalisation."""

    TOKENS = "tokens"  # [B, T, C], prefix tokens first, then patches row-major
    ATTENTION = "attention"  # [B, heads, T, T]
    WINDOW_ATTENTION = "window_attention"  # [B, windows, heads, N, N]
    HEADS = "heads"  # [B, T, heads, C]: each head's contribution to attn.out
    RAW = "raw"


BLOCK_PARTS = ("out", "attn.out", "attn.probs", "attn.heads", "mlp.hidden", "mlp.out")


@dataclass(frozen=True)
class HeadSplit:
    """How an attention's output projection input (its heads' context vectors, concatenated)
    splits into heads, and what scales the projection's output on its way to attn.out."""

    heads: int
    # What holds the LayerScale applied after the attention (None: none): a module (timm's
    # ls1) or the block itself (BEiT's and EVA's gamma_1 parameter).
    layer_scale_path: str | None = None
    # An attention module that must run an explicit path for its projection to be called as
    # a module (nn.MultiheadAttention); None when the projection always is.
    context_path: str | None = None
    # The LayerScale's attribute on layer_scale_path: gamma (ls1) or gamma_1 (a block's).
    layer_scale_attribute: str = "gamma"


def head_contributions(
    context: torch.Tensor, weight: torch.Tensor, split: HeadSplit, gamma: torch.Tensor | None
) -> torch.Tensor:
    """Each head's context [B, T, heads * head_dim] through its slice of the projection's
    weight [D, heads * head_dim], times the LayerScale gamma: [B, T, heads, D]."""
    batch, tokens, _ = context.shape
    per_head = context.reshape(batch, tokens, split.heads, -1)
    sliced = weight.reshape(weight.shape[0], split.heads, -1)
    contributions = torch.einsum("bthk,dhk->bthd", per_head, sliced.to(per_head.dtype))
    return contributions if gamma is None else contributions * gamma.to(contributions.dtype)


@dataclass(frozen=True)
class Tap:
    """Where a tensor is read: a module's output (or input), and which of its calls per
    forward when one module runs more than once (a drop-path shared by both sublayers)."""

    module_path: str
    from_input: bool = False
    output_index: int = 0
    call_index: int = 0
    calls: int = 1


@dataclass(frozen=True)
class BlockParts:
    """One block as an adapter finds it, before the load-time probe checks it."""

    path: str
    # Part name (BLOCK_PARTS but "out") -> where it is read; parts not found are in `unavailable`.
    taps: Mapping[str, Tap]
    unavailable: Mapping[str, str]
    # The attention module whose probabilities attn.probs reads (unfused while read).
    attention_path: str | None = None
    # Where the residual stream entering the attention sublayer can be read, besides the
    # block's input (a block may first add a position convolution, as CoaT's does).
    residual_taps: tuple[Tap, ...] = ()
    # How the attn.heads tap (the output projection's input) splits into heads.
    heads: HeadSplit | None = None


@dataclass(frozen=True)
class BlockAnatomy:
    """One block as the probe found it: the parts that passed, grid and prefix of its tokens."""

    path: str
    taps: Mapping[str, Tap]
    unavailable: Mapping[str, str]
    grid: tuple[int, int]
    num_prefix_tokens: int
    width: int
    attention_path: str | None = None
    probs_layout: Layout = Layout.ATTENTION
    heads: HeadSplit | None = None

    @property
    def windowed(self) -> bool:
        return self.probs_layout is Layout.WINDOW_ATTENTION


def layer_scaled(weight: torch.Tensor, layer_scale: nn.Module) -> torch.Tensor:
    """weight [D, n] with row d times a LayerScale's gamma[d]; an Identity leaves it as is."""
    gamma = getattr(layer_scale, "gamma", None)
    return weight if gamma is None else gamma[:, None] * weight


def rgb_triple(values: Sequence[float]) -> tuple[float, float, float]:
    """Per-channel statistics; a single value applies to all three channels."""
    if len(values) == 1:
        return (float(values[0]), float(values[0]), float(values[0]))
    return (float(values[0]), float(values[1]), float(values[2]))


@dataclass(frozen=True)
class DataConfig:
    input_size: tuple[int, int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    crop_pct: float


@dataclass(frozen=True)
class SiteDef:
    """Where a site is read from and how its tensor is to be read."""

    name: str
    module_path: str
    layout: Layout
    grid: tuple[int, int]
    num_prefix_tokens: int
    # Read the module's input (embed) instead of its output.
    from_input: bool = False
    output_index: int = 0
    # Attention module that must compute explicit probabilities, for attn.probs sites.
    attention_path: str | None = None
    # Which call of the module per forward holds the site (modules run more than once).
    call_index: int = 0
    calls: int = 1
    # attn.heads: how the projection's input splits into heads.
    heads: HeadSplit | None = None
    # An SAE site (`{site}@sae:{name}`): what the SAE makes of the base site's tokens.
    sae_read: SaeRead | None = None


CANONICAL_BLOCK_SITES = BLOCK_PARTS


@dataclass(frozen=True)
class UnavailableSite:
    """A canonical site (or a part of the model) this model cannot serve, and why."""

    site: str
    reason: str


def tap_site(name: str, tap: Tap, layout: Layout, grid: tuple[int, int], prefix: int) -> SiteDef:
    return SiteDef(
        name,
        tap.module_path,
        layout,
        grid,
        prefix,
        from_input=tap.from_input,
        output_index=tap.output_index,
        call_index=tap.call_index,
        calls=tap.calls,
    )


class ModelAdapter(ABC):
    """One loaded model seen through the common anatomy.

    An adapter proposes each block's parts (`parts`); the load-time probe
    (core/model/anatomy.py) checks them on a real forward and settles `blocks`, the
    anatomy every method reads. Parts that fail the check become unavailable
    sites with their reason.
    """

    family: str

    def __init__(
        self,
        spec: ModelSpec,
        root: nn.Module,
        parts: list[BlockParts],
        notes: Sequence[UnavailableSite] = (),
    ) -> None:
        self.spec = spec
        self.root = root
        self.parts = parts
        self.blocks: list[BlockAnatomy] = []
        self.notes = list(notes)
        self._unfused_lock = threading.Lock()
        self._unfused_users: dict[str, int] = {}
        self._context_users: dict[str, int] = {}
        self._final_ok = False
        self._class_head: ClassifierHead | Missing = self.missing("it has no classifier head")
        self._attention_math: AttentionMath | Missing = self.missing(
            "its attention output cannot be recomputed from its probabilities"
        )
        # The declared number of prefix tokens, tried first when reading a block's grid.
        self.prefix_hint = 0
        # Whether its blocks run compiled (core/model/loading.compile_blocks).
        self.compiled = False
        # SAEs served on this model's sites, by name (core/model/sae_loading.py).
        self.saes: dict[str, ServedSae] = {}

    def settle(
        self, blocks: list[BlockAnatomy], notes: Sequence[UnavailableSite], final_ok: bool
    ) -> None:
        """Called once by the probe with the anatomy it checked."""
        self.blocks = blocks
        self.notes = [*self.notes, *notes]
        self._final_ok = final_ok

    @property
    def unavailable_sites(self) -> list[UnavailableSite]:
        """Model-level notes, then every block part the probe or the adapter ruled out."""
        per_block = [
            UnavailableSite(f"blocks.{i}.{part}", reason)
            for i, block in enumerate(self.blocks)
            for part, reason in block.unavailable.items()
        ]
        return [*self.notes, *per_block]

    @property
    @abstractmethod
    def final_norm_path(self) -> str | None:
        """Module whose output is the `final` site, or None when the model has none."""

    @property
    @abstractmethod
    def data_config(self) -> DataConfig: ...

    @property
    @abstractmethod
    def class_names(self) -> list[str]: ...

    @property
    def module(self) -> nn.Module:
        """Everything that moves to the device: the root, or more (a whole CLIP model)."""
        return self.root

    @property
    def num_prefix_tokens(self) -> int:
        return self.blocks[0].num_prefix_tokens

    @property
    def grid(self) -> tuple[int, int]:
        return self.blocks[0].grid

    @property
    def embed_dim(self) -> int:
        return self.blocks[0].width

    @property
    def uniform(self) -> bool:
        """Whether every block has the same grid, prefix, width and global attention."""
        first = self.blocks[0]
        return all(
            (b.grid, b.num_prefix_tokens, b.width)
            == (first.grid, first.num_prefix_tokens, first.width)
            and not b.windowed
            for b in self.blocks
        )

    @property
    def has_classifier(self) -> bool:
        return bool(self.class_names)

    @abstractmethod
    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """The model's own evaluation transform: PIL RGB image -> [3, H, W] float tensor."""

    def preprocess_peak_pixels(self, width: int, height: int) -> int:
        """The most pixels `preprocess` holds for a width x height image (its resize, say),
        known before decoding. Adapters without a torchvision-style `_transform` are assumed
        to resize the shortest side to the input size, the common and costliest case."""
        transform = getattr(self, "_transform", None)
        if transform is None:
            transform = SimpleNamespace(size=max(self.data_config.input_size[1:]))
        return peak_pixels(transform, width, height)

    @abstractmethod
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Logits [B, classes] when the model has a classifier, else its embedding."""

    # Whether forward_features stops before every op that reads one row per image (the
    # head, an output projection): only then is a request's output exact in a shared batch.
    head_apart: bool = False

    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The forward up to the head; forward_head(forward_features(x)) is forward(x)."""
        return self.forward(pixels)

    def forward_by_request(self, pixels: torch.Tensor, requests: Sequence[slice]) -> torch.Tensor:
        """forward(pixels) for a batch of several requests' rows, the head applied to each
        request's own rows (see forward_head); one request spanning the batch is forward."""
        features = self.forward_features(pixels)
        if len(requests) == 1:
            return self.forward_head(features)
        return torch.cat([self.forward_head_on(features, rows) for rows in requests])

    def forward_head_on(self, features: torch.Tensor, rows: slice) -> torch.Tensor:
        """The head on some rows of forward_features' output, which may be one tensor or, for
        a model whose head aggregates several stages (CoaT), a list of them: each is sliced."""
        if isinstance(features, (list, tuple)):
            return self.forward_head(type(features)(f[rows] for f in features))
        return self.forward_head(features[rows])

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """The head on some images' features. A batched forward applies it per request:
        a head on one pooled row may use another kernel than on many, so the logits of a
        request match those it would get alone only when its own rows go through it."""
        return features

    @abstractmethod
    def _expose_attention_probs(self, attention_path: str) -> None:
        """Makes this attention module compute explicit probabilities (not the fused kernel)."""

    @abstractmethod
    def _restore_attention(self, attention_path: str) -> None:
        """Undoes _expose_attention_probs."""

    def _expose_head_context(self, attention_path: str) -> None:
        """Makes this attention call its output projection as a module (see HeadSplit);
        timm's attentions always do."""
        return None

    def _restore_head_context(self, attention_path: str) -> None:
        """Undoes _expose_head_context."""
        return None

    def head_layer_scale(self, site: SiteDef) -> torch.Tensor | None:
        """The LayerScale gamma after an attn.heads site's projection, or None."""
        path = site.heads.layer_scale_path if site.heads is not None else None
        if path is None:
            return None
        assert site.heads is not None
        gamma = getattr(self.root.get_submodule(path), site.heads.layer_scale_attribute, None)
        return gamma if isinstance(gamma, torch.Tensor) else None

    def to_canonical(self, tensor: torch.Tensor, site: SiteDef, batch: int) -> torch.Tensor:
        """Brings a captured tensor into the layout its site declares."""
        if site.layout is Layout.HEADS and site.heads is not None:
            weight = self.root.get_submodule(site.module_path).weight
            assert isinstance(weight, torch.Tensor)
            return head_contributions(tensor, weight, site.heads, self.head_layer_scale(site))
        if site.layout is Layout.TOKENS and tensor.dim() == 4:
            return tensor.reshape(tensor.shape[0], -1, tensor.shape[-1])
        if site.layout is Layout.WINDOW_ATTENTION and tensor.dim() == 4:
            return tensor.reshape(batch, -1, *tensor.shape[1:])
        return tensor

    @contextmanager
    def attention_probs_exposed(self, attention_paths: set[str]) -> Iterator[None]:
        """Turns off fused attention for these modules while any caller needs it."""
        with self._unfused_lock:
            for path in attention_paths:
                users = self._unfused_users.get(path, 0)
                if users == 0:
                    self._expose_attention_probs(path)
                self._unfused_users[path] = users + 1
        try:
            yield
        finally:
            with self._unfused_lock:
                for path in attention_paths:
                    self._unfused_users[path] -= 1
                    if self._unfused_users[path] == 0:
                        self._restore_attention(path)

    @contextmanager
    def head_contexts_exposed(self, attention_paths: set[str]) -> Iterator[None]:
        """Makes these attentions call their output projection as a module while any caller
        reads or edits their heads."""
        with self._unfused_lock:
            for path in attention_paths:
                users = self._context_users.get(path, 0)
                if users == 0:
                    self._expose_head_context(path)
                self._context_users[path] = users + 1
        try:
            yield
        finally:
            with self._unfused_lock:
                for path in attention_paths:
                    self._context_users[path] -= 1
                    if self._context_users[path] == 0:
                        self._restore_head_context(path)

    def unavailable_reason(self, index: int, part: str) -> str | None:
        """Why block `index` cannot serve `part`, or None when it can."""
        block = self.blocks[index]
        if part in block.taps or (part == "out" and "out" not in block.unavailable):
            return None
        return block.unavailable.get(part, "not found in the block")

    def block_site(self, index: int, part: str) -> SiteDef:
        """The site of one block part; the caller checks unavailable_reason first."""
        block = self.blocks[index]
        name = f"blocks.{index}.{part}"
        if part == "out":
            return SiteDef(name, block.path, Layout.TOKENS, block.grid, block.num_prefix_tokens)
        tap = block.taps[part]
        if part == "attn.heads":
            site = tap_site(name, tap, Layout.HEADS, block.grid, block.num_prefix_tokens)
            return replace(site, heads=block.heads)
        if part != "attn.probs":
            return tap_site(name, tap, Layout.TOKENS, block.grid, block.num_prefix_tokens)
        site = tap_site(name, tap, block.probs_layout, block.grid, block.num_prefix_tokens)
        return replace(site, attention_path=block.attention_path)

    def embed_site(self) -> SiteDef:
        first = self.blocks[0]
        return SiteDef(
            "embed", first.path, Layout.TOKENS, first.grid, first.num_prefix_tokens, from_input=True
        )

    def final_site(self) -> SiteDef | None:
        path = self.final_norm_path
        if path is None or not self._final_ok:
            return None
        last = self.blocks[-1]
        return SiteDef("final", path, Layout.TOKENS, last.grid, last.num_prefix_tokens)

    def canonical_sites(self) -> list[SiteDef]:
        """Every available canonical site, in forward order."""
        sites = [self.embed_site()]
        for index in range(len(self.blocks)):
            sites.extend(
                self.block_site(index, part)
                for part in CANONICAL_BLOCK_SITES
                if self.unavailable_reason(index, part) is None
            )
        final = self.final_site()
        return sites if final is None else [*sites, final]

    # Capabilities only some models have: a method asks for the one it needs and refuses
    # the model, naming the cause, when it gets a Missing.

    def block_input_site(self, index: int) -> SiteDef:
        """The residual stream entering block `index` (where a late class token has joined)."""
        block = self.blocks[index]
        name = "embed" if index == 0 else f"blocks.{index}.in"
        return SiteDef(
            name, block.path, Layout.TOKENS, block.grid, block.num_prefix_tokens, from_input=True
        )

    def tail_blocks(self) -> range:
        """The trailing blocks that hold the last block's token sequence (grid, prefix count,
        width): all of them, but in a hierarchical model its last stage's, and in a model
        whose class token enters late (ConViT) those after it."""

        def layout(block: BlockAnatomy) -> tuple[object, ...]:
            return (block.grid, block.num_prefix_tokens, block.width)

        first = len(self.blocks) - 1
        while first > 0 and layout(self.blocks[first - 1]) == layout(self.blocks[-1]):
            first -= 1
        return range(first, len(self.blocks))

    def settle_capabilities(self, pixels: torch.Tensor) -> None:
        """Called once by the probe after `settle`, with an input the model accepts: an
        adapter checks here what its capabilities read against a real forward."""
        return None

    def class_head(self) -> ClassifierHead | Missing:
        """The classifier that class-space methods project into."""
        return self._class_head

    def attention_math(self) -> AttentionMath | Missing:
        """Each block's attention output recomputed from its probabilities (gradients
        through attention)."""
        return self._attention_math

    def attention_probs(self) -> AttentionProbs | Missing:
        """Every block's attention probabilities over one token sequence."""
        if any(block.windowed for block in self.blocks):
            return self.missing(
                "it uses windowed attention, and the method needs every block's attention "
                "over the whole token sequence"
            )
        for index in range(len(self.blocks)):
            reason = self.unavailable_reason(index, "attn.probs")
            if reason is not None:
                return self.missing(f"block {index} serves no attention probabilities ({reason})")
        if not self.uniform:
            return self.missing(self._sequence_cause())
        return AttentionProbs([self.block_site(b, "attn.probs") for b in range(len(self.blocks))])

    def _sequence_cause(self) -> str:
        """Why the blocks hold no one token sequence (they are not uniform)."""
        first = self.blocks[0]
        late = [
            i for i, b in enumerate(self.blocks) if b.num_prefix_tokens != first.num_prefix_tokens
        ]
        if late and all((b.grid, b.width) == (first.grid, first.width) for b in self.blocks):
            return (
                f"its class token enters at block {late[0]}, so no one token sequence runs "
                "through every block, which the method needs"
            )
        return (
            "its blocks change token grid or width, and the method needs one token sequence "
            "through every block"
        )

    def runs_blocks_in_sequence(self) -> bool:
        """Whether the forward hands one [batch, tokens, width] tensor from block to block with
        nothing per image beside it, so that a forward may widen its batch at a block's input."""
        return False

    def missing(self, cause: str) -> Missing:
        return Missing(self.spec.name, cause)
