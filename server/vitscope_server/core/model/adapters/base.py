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

from vitscope_server.core.model.resize_size import peak_pixels
from vitscope_server.core.model.specs import ModelSpec

if TYPE_CHECKING:
    from vitscope_server.core.model.sae import SaeRead, ServedSae


class Layout(Enum):
    """How a captured tensor is arranged after canonicalisation."""

    TOKENS = "tokens"  # [B, T, C], prefix tokens first, then patches row-major
    ATTENTION = "attention"  # [B, heads, T, T]
    WINDOW_ATTENTION = "window_attention"  # [B, windows, heads, N, N]
    RAW = "raw"


BLOCK_PARTS = ("out", "attn.out", "attn.probs", "mlp.hidden", "mlp.out")


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
        self._final_ok = False
        # The declared number of prefix tokens, tried first when reading a block's grid.
        self.prefix_hint = 0
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
        return torch.cat([self.forward_head(features[rows]) for rows in requests])

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

    def to_canonical(self, tensor: torch.Tensor, site: SiteDef, batch: int) -> torch.Tensor:
        """Brings a captured tensor into the layout its site declares."""
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

    # Class-space anatomy: what class-embedding projection and key-value memories read.

    def class_projection_unsupported(self) -> str | None:
        """Why this model's tokens cannot be projected to its class space, or None when they can."""
        return (
            f"model {self.spec.name}: class-space projection supports timm ViT-like models "
            "(class token or average pooling) and open_clip ViT towers with token pooling"
        )

    def projection_norm(self, tokens: torch.Tensor, block: int, part: str) -> torch.Tensor:
        """The model's own final norm(s) applied per token to a representation of `part`
        ("out", "attn.out" or "mlp.out") of `block`."""
        raise NotImplementedError

    def attention_values(self, block: int, block_input: torch.Tensor) -> torch.Tensor:
        """The value vectors [B, heads, T, head_dim] that block's attention mixes."""
        raise NotImplementedError

    def attention_output(
        self, block: int, probs: torch.Tensor, values: torch.Tensor
    ) -> torch.Tensor:
        """The attention sublayer's output [B, queries, D] (before the residual add) from its
        probabilities and values, so gradients can flow to the probabilities."""
        raise NotImplementedError

    def mixed_values(self, probs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Per-head attention-weighted values, heads concatenated."""
        mixed = probs @ values  # [B, heads, queries, head_dim]
        batch, heads, queries, head_dim = mixed.shape
        return mixed.transpose(1, 2).reshape(batch, queries, heads * head_dim)

    def output_projection_input(
        self, block: int, probs: torch.Tensor, values: torch.Tensor
    ) -> torch.Tensor:
        """What the attention's output projection multiplies [B, queries, D]: the mixed values,
        after any norm the attention applies to them (the attention memories' coefficients)."""
        return self.mixed_values(probs, values)

    def mlp_fc1_path(self, block: int) -> str:
        """Module whose output holds the MLP's pre-activation hidden values (its keys' scores)."""
        raise NotImplementedError

    def mlp_value_matrix(self, block: int) -> torch.Tensor:
        """fc2.weight [D, hidden] times the block's layer scale, if any: each column is what one
        MLP memory adds to the residual stream per unit of its coefficient."""
        raise NotImplementedError

    def attention_value_matrix(self, block: int) -> torch.Tensor:
        """The output projection's weight [D, D] times the block's layer scale, if any: each
        column is one attention value vector as it reaches the residual stream."""
        raise NotImplementedError

    def classifier_head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The classifier's weight [C, D] and bias [C] over normed tokens."""
        raise NotImplementedError

    def reads_class_token(self) -> bool:
        """Whether the model's output is read at the class token alone (not pooled over
        patches), so it can be run on any subset of patch tokens."""
        return False

    def forward_from_embedded(self, tokens: torch.Tensor) -> torch.Tensor:
        """forward() from the tokens entering block 0 [B, T', D] (the `embed` site, position
        embeddings added): blocks, final norm, pooling and head or projection."""
        raise NotImplementedError
