"""Inverse networks, one per forward component of a ViT (Rathjens et al. 2024).

Depth convention: depth 0 is the `embed` site (tokens entering block 0), depth k >= 1 is
`blocks.{k-1}.out`. Module `embed` maps depth 0 back to pixels; module `blocks.{i}` maps
depth i+1 back to depth i. Reconstructing from depth k chains
`embed(blocks.0(... blocks.{k-1}(h)))`.

Pixel space: every pixel-side module returns [0, 1] RGB pixels (what PSNR is measured in);
the model's own mean/std turns them into the model's input.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from timm.models.vision_transformer import Block
from torch import nn

from vitscope_server.core.model.loading import LoadedModel
from vitscope_server.core.model.pixels import denormalize
from vitscope_server.core.runtime.errors import FailedPrecondition, InvalidArgument

EMBED = "embed"
EMBED_KINDS = ("conv", "linear")


def depth_site(depth: int) -> str:
    """The canonical site holding the representation at `depth`."""
    return EMBED if depth == 0 else f"blocks.{depth - 1}.out"


def module_name(index: int) -> str:
    """Module index 0 is the embedding inverse; index i >= 1 inverts block i-1."""
    return EMBED if index == 0 else f"blocks.{index - 1}"


def chain_names(depth: int) -> list[str]:
    """Modules applied, in order, to invert from `depth` to pixels."""
    return [f"blocks.{i}" for i in reversed(range(depth))] + [EMBED]


@dataclass(frozen=True)
class Geometry:
    """What an inverse module must know about the forward model."""

    width: int
    num_heads: int
    num_prefix_tokens: int
    grid: tuple[int, int]
    image_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def as_json(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Geometry:
        return cls(
            width=int(data["width"]),  # type: ignore[call-overload]
            num_heads=int(data["num_heads"]),  # type: ignore[call-overload]
            num_prefix_tokens=int(data["num_prefix_tokens"]),  # type: ignore[call-overload]
            grid=tuple(data["grid"]),  # type: ignore[arg-type]
            image_size=tuple(data["image_size"]),  # type: ignore[arg-type]
            mean=tuple(data["mean"]),  # type: ignore[arg-type]
            std=tuple(data["std"]),  # type: ignore[arg-type]
        )


def geometry_of(loaded: LoadedModel) -> Geometry:
    """What the inverse modules need to know of a loaded model (what training records and
    serving compares); only for models with one token grid and width."""
    adapter = loaded.adapter
    if not adapter.uniform:
        raise FailedPrecondition(
            f"model {loaded.spec.name}: learned inversion needs one token grid, width and global "
            "attention in every block; hierarchical or windowed-attention (Swin-like) models "
            "have no modular inverter; use OPTIMIZATION inversion",
            subject=loaded.spec.name,
            field="method",
        )
    config = adapter.data_config
    rows, cols = adapter.grid
    return Geometry(
        width=int(loaded.site_shapes[EMBED][-1]),
        num_heads=_num_heads(loaded),
        num_prefix_tokens=int(adapter.num_prefix_tokens),
        grid=(int(rows), int(cols)),
        image_size=(int(config.input_size[1]), int(config.input_size[2])),
        mean=_three(config.mean),
        std=_three(config.std),
    )


def _three(values: tuple[float, float, float]) -> tuple[float, float, float]:
    return (float(values[0]), float(values[1]), float(values[2]))


def _num_heads(loaded: LoadedModel) -> int:
    path = loaded.adapter.blocks[0].attention_path
    attention = loaded.adapter.root.get_submodule(path) if path else None
    return int(getattr(attention, "num_heads", 1))


class ConvInverseEmbed(nn.Module):
    """The authors' inverse patch embedding: drop prefix tokens, reshape to D x H x W, then
    stride-2 transposed convolutions (BatchNorm + ReLU) halving channels down to 3, sigmoid.

    When the patch size is not a power of two the last doubling overshoots and a bilinear
    resize lands on the exact image size.
    """

    def __init__(self, geometry: Geometry) -> None:
        super().__init__()
        self.geometry = geometry
        patch = max(geometry.image_size[0] // geometry.grid[0], 1)
        doublings = max(1, math.ceil(math.log2(patch)))
        layers: list[nn.Module] = []
        channels = geometry.width
        for step in range(doublings):
            last = step == doublings - 1
            out = 3 if last else max(channels // 2, 16)
            layers.append(nn.ConvTranspose2d(channels, out, kernel_size=4, stride=2, padding=1))
            if not last:
                layers += [nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            channels = out
        self.decoder = nn.Sequential(*layers)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        patches = tokens[:, g.num_prefix_tokens :]
        grid = patches.transpose(1, 2).reshape(tokens.shape[0], g.width, *g.grid)
        image = self.decoder(grid)
        if tuple(image.shape[-2:]) != g.image_size:
            image = nn.functional.interpolate(
                image, size=g.image_size, mode="bilinear", align_corners=False
            )
        return torch.sigmoid(image)


class LinearInverseEmbed(nn.Module):
    """Exact inverse of an affine patch embedding: p = W^+ (t - offset), per patch.

    `offset` [grid tokens, D] is the embedding of an all-zero model input (projection bias
    plus position embedding); `projection` is the patch projection as a [D, 3*P*P] matrix.
    Exact when W has full column rank (always so when square, 3*P*P == D).
    """

    pinv: torch.Tensor
    offset: torch.Tensor

    def __init__(self, geometry: Geometry) -> None:
        super().__init__()
        self.geometry = geometry
        rows, cols = geometry.grid
        patch = geometry.image_size[0] // rows
        self.patch = patch
        tokens = rows * cols
        self.register_buffer("pinv", torch.zeros(3 * patch * patch, geometry.width))
        self.register_buffer("offset", torch.zeros(tokens, geometry.width))

    def fit(self, projection: torch.Tensor, offset: torch.Tensor) -> None:
        self.pinv.copy_(torch.linalg.pinv(projection.double()).float())
        self.offset.copy_(offset)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        rows, cols = g.grid
        patches = (tokens[:, g.num_prefix_tokens :] - self.offset) @ self.pinv.T
        batch, p = tokens.shape[0], self.patch
        image = patches.reshape(batch, rows, cols, 3, p, p).permute(0, 3, 1, 4, 2, 5)
        normalized = image.reshape(batch, 3, rows * p, cols * p)
        return denormalize(normalized, g).clamp(0.0, 1.0)


class InverseBlock(nn.Module):
    """A transformer block of the forward block's width and heads, token layout kept."""

    def __init__(self, geometry: Geometry) -> None:
        super().__init__()
        self.block = Block(geometry.width, geometry.num_heads, mlp_ratio=4.0, qkv_bias=True)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        output: torch.Tensor = self.block(tokens)
        return output


def build_module(name: str, kind: str, geometry: Geometry) -> nn.Module:
    """An untrained inverse module of this kind for component `name`."""
    if name == EMBED:
        if kind == "conv":
            return ConvInverseEmbed(geometry)
        if kind == "linear":
            return LinearInverseEmbed(geometry)
        raise InvalidArgument("embed.kind", f"{kind!r} not allowed; allowed: {EMBED_KINDS}")
    if kind != "block":
        raise InvalidArgument(f"{name}.kind", f"{kind!r} not allowed; allowed: block")
    return InverseBlock(geometry)
