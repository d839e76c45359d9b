"""A timm model's classifier head and attention math as capabilities (METHODS §3).

Projection: `fc(fc_norm(norm(h)))` per token (timm_classifier.py), one of the two norms
usually Identity.
Models that pool by average get the block's own pre-norm on sublayer outputs first (norm1
for attention, norm2 for the MLP), as Vilas et al. did; a post-norm block's sublayer
outputs are already normed. A distilled DeiT's tokens all go through `head`, not
`head_dist`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

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
    Probe,
    attention_cause,
    head_cause,
    memory_causes,
    pre_norm_of,
    run_probe,
    value_matrices,
)
from vitscope_server.core.model.adapters.timm_classifier import Classifier
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
    """The classifier over the blocks that hold its token sequence (tail_blocks), with each
    one's norm placement and the memory kinds its forward confirmed."""

    def __init__(
        self,
        adapter: ModelAdapter,
        classifier: Classifier,
        pre_norm: Mapping[int, bool],
        memory_causes: Mapping[int, Mapping[MemoryKind, str]],
    ) -> None:
        self._adapter = adapter
        self._model: Any = adapter.root
        self._classifier = classifier
        self._pre_norm = dict(pre_norm)
        self._memory_causes = {block: dict(causes) for block, causes in memory_causes.items()}

    def _block(self, index: int) -> nn.Module:
        return self._model.get_submodule(self._adapter.blocks[index].path)

    @property
    def weight(self) -> torch.Tensor:
        return self._classifier.fc.weight

    @property
    def bias(self) -> torch.Tensor | None:
        bias: torch.Tensor | None = self._classifier.fc.bias
        return bias

    def normed(self, tokens: torch.Tensor, block: int, part: str) -> torch.Tensor:
        classifier = self._classifier
        if part != "out" and classifier.pool in _AVERAGE_POOLS and self._pre_norm.get(block):
            norm = block_norm(self._block(block), ATTENTION if part == "attn.out" else MLP)
            tokens = tokens if norm is None else norm(tokens)
        return classifier.normed(tokens)

    def memory_refusal(self, block: int, kind: MemoryKind) -> str | None:
        if block not in self._memory_causes:
            allowed = self._adapter.tail_blocks()
            return (
                f"block {block} holds another token sequence than the classifier reads; "
                f"blocks {allowed.start}..{allowed.stop - 1} do"
            )
        return self._memory_causes[block].get(kind)

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
    """Values from the attention's own value projection of the block's (pre-normed) input;
    the output through its output projection, then the layer scale or post-norm."""

    def __init__(self, adapter: ModelAdapter, pre_norm: Mapping[int, bool]) -> None:
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
    """Both capabilities from one checking forward, or each one's cause."""
    probe = run_probe(adapter, pixels)
    if isinstance(probe, str):
        return adapter.missing(probe), adapter.missing(probe)
    norms = {i: pre_norm_of(probe, i) for i in range(len(adapter.blocks))}
    with torch.inference_mode():
        head = _guarded(adapter, lambda: _head(adapter, probe, norms))
        math = _guarded(adapter, lambda: _attention_math(adapter, probe, norms))
    return head, math


Found = TypeVar("Found")


def _guarded(adapter: ModelAdapter, check: Callable[[], Found | Missing]) -> Found | Missing:
    """A check that fails on a layout it does not foresee refuses the capability with the
    error, never the model's load."""
    try:
        return check()
    except Exception as exc:  # a model the checks do not foresee
        return adapter.missing(f"its modules do not compute what the checks expect: {exc}"[:300])


def _head(
    adapter: ModelAdapter, probe: Probe, norms: Mapping[int, bool | None]
) -> ClassifierHead | Missing:
    if not adapter.has_classifier:
        return Missing(adapter.spec.name, "it has no classifier head", Reason.NO_CLASSIFIER)
    found = head_cause(adapter, probe)
    if isinstance(found, str):
        return adapter.missing(found)
    tail = {i: norms[i] for i in adapter.tail_blocks()}
    unknown = [i for i, pre_norm in tail.items() if pre_norm is None]
    if unknown:
        return adapter.missing(f"block {unknown[0]} has no norm1 before or after its attention")
    known = {i: bool(pre_norm) for i, pre_norm in tail.items()}
    causes = {i: memory_causes(adapter, probe, i, pre_norm) for i, pre_norm in known.items()}
    return TimmHead(adapter, found, known, causes)


def _attention_math(
    adapter: ModelAdapter, probe: Probe, norms: Mapping[int, bool | None]
) -> AttentionMath | Missing:
    for index, pre_norm in norms.items():
        if pre_norm is None:
            return adapter.missing(f"block {index} has no norm1 before or after its attention")
        cause = attention_cause(adapter, probe, index, pre_norm)
        if cause is not None:
            return adapter.missing(cause)
    return TimmAttentionMath(adapter, {i: bool(p) for i, p in norms.items()})
