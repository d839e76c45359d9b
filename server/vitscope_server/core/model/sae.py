"""Sparse autoencoders over a site's token vectors (METHODS §6): encode, decode, and what a
site named `{site}@sae:{name}` reads.

The module lives in the model package, not in the `sae` family, because site resolution
and capture (core/model/sites.py, capture.py) must apply it for every method family.
Its arithmetic is SAELens's, so a file either side writes gives the same codes:
`f = σ((x − b_dec) W_enc + b_enc)`, `x̂ = f W_dec + b_dec`. The training-time input
scaling is folded into the weights when saving (core/model/sae_files.py), so inference
needs no scale of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn


class SaeKind(Enum):
    """The activation σ; BatchTopK SAEs are served as JUMPRELU with one global threshold."""

    RELU = "relu"
    TOPK = "topk"
    JUMPRELU = "jumprelu"


class SaeOutput(Enum):
    """What an SAE site reads: the latents, the reconstruction, or the error x − x̂."""

    LATENTS = ""
    RECON = "recon"
    ERROR = "error"


class SparseAutoencoder(nn.Module):
    """W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in], and for
    JUMPRELU a per-latent threshold [d_sae]. Every token is encoded on its own."""

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        kind: SaeKind,
        k: int = 0,
        apply_b_dec_to_input: bool = True,
    ) -> None:
        super().__init__()
        if kind is SaeKind.TOPK and not 1 <= k <= d_sae:
            raise ValueError(f"a TopK SAE needs 1 <= k <= d_sae={d_sae}, got k={k}")
        self.kind = kind
        self.k = k
        self.apply_b_dec_to_input = apply_b_dec_to_input
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.threshold = nn.Parameter(torch.zeros(d_sae), requires_grad=False)

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """(x − b_dec) W_enc + b_enc over the last axis, in the SAE's dtype."""
        x = x.to(self.W_enc.dtype)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """σ of the pre-activations, token by token."""
        if self.kind is SaeKind.RELU:
            return torch.relu(pre)
        if self.kind is SaeKind.JUMPRELU:
            return torch.relu(pre) * (pre > self.threshold)
        top = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.pre_activations(x))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def read(self, x: torch.Tensor, output: SaeOutput) -> torch.Tensor:
        """The tensor a site reads from the base site's tokens x, in x's dtype."""
        if output is SaeOutput.LATENTS:
            return self.encode(x).to(x.dtype)
        recon = self(x).to(x.dtype)
        return recon if output is SaeOutput.RECON else x - recon


@dataclass(frozen=True)
class SaeInfo:
    """What DescribeModel says of a served SAE, read from its file."""

    name: str
    site: str
    d_in: int
    d_sae: int
    kind: SaeKind
    k: int
    # The architecture as trained (batchtopk is served as jumprelu).
    trained_as: str
    metrics: dict[str, float]
    path: str


@dataclass(frozen=True)
class ServedSae:
    """One SAE loaded beside its model."""

    info: SaeInfo
    module: SparseAutoencoder


@dataclass(frozen=True, eq=False)
class SaeRead:
    """The SAE step a site applies to its base site's canonical tokens."""

    sae: ServedSae
    output: SaeOutput

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.sae.module.read(tokens, self.output)

    def values(self, tokens: torch.Tensor) -> torch.Tensor:
        """The site's values as an edit reads them: latents in the SAE's own precision (a read
        casts them to the tokens' dtype, which would round them on a half-precision model)."""
        if self.output is SaeOutput.LATENTS:
            return self.sae.module.encode(tokens)
        return self(tokens)

    def lift(self, change: torch.Tensor) -> torch.Tensor:
        """A change of this site's values as the change of the base tokens that makes it,
        with the SAE's error term kept: latents move the tokens through the decoder
        (decode(c') - decode(c) = (c' - c) W_dec); the reconstruction and the error are in
        the tokens' own space already."""
        if self.output is SaeOutput.LATENTS:
            decoder = self.sae.module.W_dec
            return change.to(decoder.dtype) @ decoder
        return change


SAE_MARK = "@sae:"


def sae_site_name(site: str, name: str, output: SaeOutput = SaeOutput.LATENTS) -> str:
    """`{site}@sae:{name}`, with `.recon` or `.error` for those outputs."""
    suffix = f".{output.value}" if output.value else ""
    return f"{site}{SAE_MARK}{name}{suffix}"


def split_sae_site(name: str) -> tuple[str, str, SaeOutput] | None:
    """(base site, SAE name, output) of an SAE site name, or None for any other site."""
    base, mark, rest = name.partition(SAE_MARK)
    if not mark:
        return None
    for output in (SaeOutput.RECON, SaeOutput.ERROR):
        suffix = f".{output.value}"
        if rest.endswith(suffix):
            return base, rest.removesuffix(suffix), output
    return base, rest, SaeOutput.LATENTS
