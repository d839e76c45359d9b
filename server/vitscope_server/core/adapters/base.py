"""The anatomy every model family exposes, so capture and methods need not know the family."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum

import torch
from PIL import Image
from torch import nn

from vitscope_server.core.specs import ModelSpec


class Layout(Enum):
    """How a captured tensor is arranged after canonicalisation."""

    TOKENS = "tokens"  # [B, T, C], prefix tokens first, then patches row-major
    ATTENTION = "attention"  # [B, heads, T, T]
    WINDOW_ATTENTION = "window_attention"  # [B, windows, heads, N, N]
    RAW = "raw"


@dataclass(frozen=True)
class BlockAnatomy:
    """Module paths (relative to the adapter's root) of one transformer block's parts."""

    path: str
    attn_out_path: str
    mlp_hidden_path: str
    mlp_out_path: str
    attn_probs_path: str
    # Which element of the probs module's output holds the probabilities.
    attn_probs_output_index: int
    grid: tuple[int, int]
    num_prefix_tokens: int
    width: int
    windowed: bool = False


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
    # Block whose attention must expose probabilities, for attn.probs sites.
    attention_block: int | None = None


CANONICAL_BLOCK_SITES = ("out", "attn.out", "attn.probs", "mlp.hidden", "mlp.out")


class ModelAdapter(ABC):
    """One loaded model seen through the common anatomy."""

    family: str

    def __init__(self, spec: ModelSpec, root: nn.Module, blocks: list[BlockAnatomy]) -> None:
        self.spec = spec
        self.root = root
        self.blocks = blocks
        self._unfused_lock = threading.Lock()
        self._unfused_users: dict[int, int] = {}

    @property
    @abstractmethod
    def final_norm_path(self) -> str: ...

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
    def has_classifier(self) -> bool:
        return bool(self.class_names)

    @abstractmethod
    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """The model's own evaluation transform: PIL RGB image -> [3, H, W] float tensor."""

    @abstractmethod
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Logits [B, classes] when the model has a classifier, else its embedding."""

    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The forward up to the head; forward_head(forward_features(x)) is forward(x)."""
        return self.forward(pixels)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """The head on some images' features. A batched forward applies it per request:
        a head on one pooled row may use another kernel than on many, so the logits of a
        request match those it would get alone only when its own rows go through it."""
        return features

    @abstractmethod
    def _expose_attention_probs(self, block: int) -> None:
        """Makes block's attention compute explicit probabilities (not the fused kernel)."""

    @abstractmethod
    def _restore_attention(self, block: int) -> None:
        """Undoes _expose_attention_probs."""

    def to_canonical(self, tensor: torch.Tensor, site: SiteDef, batch: int) -> torch.Tensor:
        """Brings a captured tensor into the layout its site declares."""
        if site.layout is Layout.TOKENS and tensor.dim() == 4:
            return tensor.reshape(tensor.shape[0], -1, tensor.shape[-1])
        if site.layout is Layout.WINDOW_ATTENTION:
            return tensor.reshape(batch, -1, *tensor.shape[1:])
        return tensor

    @contextmanager
    def attention_probs_exposed(self, blocks: set[int]) -> Iterator[None]:
        """Turns off fused attention for these blocks while any caller needs it."""
        with self._unfused_lock:
            for block in blocks:
                users = self._unfused_users.get(block, 0)
                if users == 0:
                    self._expose_attention_probs(block)
                self._unfused_users[block] = users + 1
        try:
            yield
        finally:
            with self._unfused_lock:
                for block in blocks:
                    self._unfused_users[block] -= 1
                    if self._unfused_users[block] == 0:
                        self._restore_attention(block)

    def block_site(self, index: int, part: str) -> SiteDef:
        block = self.blocks[index]
        name = f"blocks.{index}.{part}"
        if part == "out":
            return SiteDef(name, block.path, Layout.TOKENS, block.grid, block.num_prefix_tokens)
        if part == "attn.out":
            return SiteDef(
                name, block.attn_out_path, Layout.TOKENS, block.grid, block.num_prefix_tokens
            )
        if part == "mlp.hidden":
            return SiteDef(
                name, block.mlp_hidden_path, Layout.TOKENS, block.grid, block.num_prefix_tokens
            )
        if part == "mlp.out":
            return SiteDef(
                name, block.mlp_out_path, Layout.TOKENS, block.grid, block.num_prefix_tokens
            )
        layout = Layout.WINDOW_ATTENTION if block.windowed else Layout.ATTENTION
        return SiteDef(
            name,
            block.attn_probs_path,
            layout,
            block.grid,
            block.num_prefix_tokens,
            output_index=block.attn_probs_output_index,
            attention_block=index,
        )

    def canonical_sites(self) -> list[SiteDef]:
        first = self.blocks[0]
        last = self.blocks[-1]
        sites = [
            SiteDef(
                "embed",
                first.path,
                Layout.TOKENS,
                first.grid,
                first.num_prefix_tokens,
                from_input=True,
            )
        ]
        for index in range(len(self.blocks)):
            sites.extend(self.block_site(index, part) for part in CANONICAL_BLOCK_SITES)
        sites.append(
            SiteDef("final", self.final_norm_path, Layout.TOKENS, last.grid, last.num_prefix_tokens)
        )
        return sites

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
