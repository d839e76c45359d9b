"""A timm model's classifier head and attention math as capabilities (METHODS §3).

Projection: `head(fc_norm(norm(h)))` per token, one of the two norms usually Identity.
Models that pool by average get the block's own pre-norm on sublayer outputs first (norm1
for attention, norm2 for the MLP), as Vilas et al. did; a post-norm block's sublayer
outputs are already normed. A distilled DeiT's tokens all go through `head`, not
`head_dist`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vitscope_server.core.model.adapters.base import Layout, ModelAdapter, SiteDef, Tap, tap_site
from vitscope_server.core.model.adapters.capabilities import (
    AttentionMath,
    ClassifierHead,
    LinearClassifier,
    MemoryKind,
    Missing,
    mixed_values,
)
from vitscope_server.core.model.adapters.timm_capabilities import (
    attention_cause,
    head_cause,
    memory_cause,
    pre_norms,
    run_probe,
    value_matrices,
)
from vitscope_server.core.model.adapters.timm_sublayers import (
    ATTENTION,
    MLP,
    attention_values,
    block_norm,
    finish,
    projection_input,
)
from vitscope_server.core.runtime.errors import Reason

_SUBLAYER = {MemoryKind.MLP: MLP, MemoryKind.ATTENTION: ATTENTION}
_AVERAGE_POOLS = ("avg", "max", "avgmax")


class TimmHead(LinearClassifier):
    def __init__(
        self, adapter: ModelAdapter, pre_norm: list[bool], memory_causes: Mapping[int, str]
    ) -> None:
        self._adapter = adapter
        self._model: Any = adapter.root
        self._pre_norm = pre_norm
        self._memory_causes = dict(memory_causes)

    def _block(self, index: int) -> nn.Module:
        return self._model.get_submodule(self._adapter.blocks[index].path)

    @property
    def weight(self) -> torch.Tensor:
        weight: torch.Tensor = self._model.head.weight
        return weight

    @property
    def bias(self) -> torch.Tensor | None:
        bias: torch.Tensor | None = self._model.head.bias
        return bias

    def normed(self, tokens: torch.Tensor, block: int, part: str) -> torch.Tensor:
        model = self._model
        if part != "out" and model.global_pool in _AVERAGE_POOLS and self._pre_norm[block]:
            norm = block_norm(self._block(block), ATTENTION if part == "attn.out" else MLP)
            tokens = tokens if norm is None else norm(tokens)
        norm, fc_norm = (getattr(model, n, None) for n in ("norm", "fc_norm"))
        tokens = tokens if norm is None else norm(tokens)
        normed: torch.Tensor = tokens if fc_norm is None else fc_norm(tokens)
        return normed

    def memory_refusal(self, block: int) -> str | None:
        return self._memory_causes.get(block)

    def value_matrix(self, block: int, kind: MemoryKind) -> torch.Tensor:
        return value_matrices(self._adapter, block, self._pre_norm[block])[_SUBLAYER[kind]]

    def coefficient_sites(self, block: int, kind: MemoryKind) -> list[SiteDef]:
        """MLP: fc1's pre-activation outputs, as the authors read them, where they are the
        hidden units one to one (else the hidden layer itself, a GLU's gated product);
        attention: what the output projection multiplies."""
        anatomy = self._adapter.blocks[block]
        name = f"blocks.{block}.memories.{kind.value}"
        if kind is MemoryKind.ATTENTION:
            tap = Tap(f"{anatomy.attention_path}.proj", from_input=True)
        else:
            mlp: Any = self._block(block).get_submodule("mlp")
            hidden = anatomy.taps["mlp.hidden"]
            fc1 = getattr(mlp, "fc1", None)
            one_to_one = (
                isinstance(fc1, nn.Linear)
                and fc1.out_features == self.value_matrix(block, kind).shape[1]
            )
            plain = one_to_one and not isinstance(getattr(mlp, "norm", None), nn.LayerNorm)
            tap = Tap(f"{anatomy.path}.mlp.fc1") if plain else hidden
        return [tap_site(name, tap, Layout.TOKENS, anatomy.grid, anatomy.num_prefix_tokens)]

    def coefficients(
        self, block: int, kind: MemoryKind, captured: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        return captured[f"blocks.{block}.memories.{kind.value}"]

    def runs_on_token_subsets(self) -> bool:
        """Only the plain ViT family (DeiT included) runs as blocks -> norm -> head on any
        token subset: EVA-style blocks need their RoPE positions, CaiT adds its class token
        late."""
        model = self._model
        return (
            isinstance(model, VisionTransformer)
            and isinstance(model.blocks, nn.Sequential)
            and model.global_pool == "token"
            and self._adapter.num_prefix_tokens > 0
        )

    def forward_from_embedded(self, tokens: torch.Tensor) -> torch.Tensor:
        model = self._model
        output: torch.Tensor = model.forward_head(model.norm(model.blocks(tokens)))
        return output


class TimmAttentionMath(AttentionMath):
    def __init__(self, adapter: ModelAdapter, pre_norm: list[bool]) -> None:
        self._adapter = adapter
        self._pre_norm = pre_norm

    def _modules(self, block: int) -> tuple[nn.Module, Any]:
        anatomy = self._adapter.blocks[block]
        root = self._adapter.root
        return root.get_submodule(anatomy.path), root.get_submodule(str(anatomy.attention_path))

    def values(self, block: int, block_input: torch.Tensor) -> torch.Tensor:
        module, attention = self._modules(block)
        return attention_values(module, attention, block_input, self._pre_norm[block])

    def output(self, block: int, probs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        module, attention = self._modules(block)
        mixed = projection_input(attention, mixed_values(probs, values))
        return finish(module, ATTENTION, attention.proj(mixed), self._pre_norm[block])


def settle_timm_capabilities(
    adapter: ModelAdapter, pixels: torch.Tensor
) -> tuple[ClassifierHead | Missing, AttentionMath | Missing]:
    """Both capabilities from one checking forward, or each one's cause. A check that
    fails on an unforeseen layout refuses the capability with the error, never the load."""
    try:
        return _settle(adapter, pixels)
    except Exception as exc:  # a model the checks do not foresee
        missing = adapter.missing(f"checking its modules against its forward failed: {exc}"[:300])
        return missing, missing


def _settle(
    adapter: ModelAdapter, pixels: torch.Tensor
) -> tuple[ClassifierHead | Missing, AttentionMath | Missing]:
    probe = run_probe(adapter, pixels)
    if isinstance(probe, str):
        return adapter.missing(probe), adapter.missing(probe)
    norms = pre_norms(adapter, probe)
    math: AttentionMath | Missing = adapter.missing(str(norms))
    if not isinstance(norms, str):
        causes = (attention_cause(adapter, probe, i, norms[i]) for i in range(len(adapter.blocks)))
        cause = next((c for c in causes if c is not None), None)
        math = TimmAttentionMath(adapter, norms) if cause is None else adapter.missing(cause)
    if not adapter.has_classifier:
        return Missing(adapter.spec.name, "it has no classifier head", Reason.NO_CLASSIFIER), math
    cause = head_cause(adapter, probe) or (norms if isinstance(norms, str) else None)
    if cause is not None or isinstance(norms, str):
        return adapter.missing(str(cause)), math
    memory_causes = {
        i: memory_cause(adapter, probe, i, norms[i], value_matrices(adapter, i, norms[i]))
        for i in range(len(adapter.blocks))
    }
    found = {i: c for i, c in memory_causes.items() if c is not None}
    return TimmHead(adapter, norms, found), math
