"""open_clip image towers: open_clip's VisionTransformer, or a timm trunk inside a CLIP model."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import open_clip
import torch
from PIL import Image
from torch import nn
from torch.utils.hooks import RemovableHandle

from vitscope_server.core.model.adapters.base import (
    BlockParts,
    DataConfig,
    HeadSplit,
    Layout,
    ModelAdapter,
    SiteDef,
    Tap,
    UnavailableSite,
    layer_scaled,
    rgb_triple,
    tap_site,
)
from vitscope_server.core.model.adapters.capabilities import (
    AttentionMath,
    MemoryKind,
    TextClassifier,
    mixed_values,
)
from vitscope_server.core.model.adapters.timm_blocks import (
    FINAL_NORMS,
    find_blocks,
    prefix_hint,
    restore_fused,
    unfuse,
)
from vitscope_server.core.model.specs import ModelSpec
from vitscope_server.core.runtime.errors import FailedPrecondition


def _force_attention_weights(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return args, {**kwargs, "need_weights": True, "average_attn_weights": False}


def _resblock_parts(path: str, block: nn.Module) -> BlockParts:
    """open_clip's residual blocks: ls_1/ls_2 hold what each sublayer adds (LayerScale or
    Identity, after the custom block's ln_attn); c_proj's input is the MLP hidden layer."""
    attention_path = f"{path}.attn"
    taps = {
        "attn.out": Tap(f"{path}.ls_1"),
        "mlp.out": Tap(f"{path}.ls_2"),
        "mlp.hidden": Tap(f"{path}.mlp.c_proj", from_input=True),
    }
    attention = block.get_submodule("attn")
    unavailable = {}
    heads = None
    if isinstance(attention, nn.MultiheadAttention):
        taps["attn.probs"] = Tap(attention_path, output_index=1)
        taps["attn.heads"] = Tap(f"{attention_path}.out_proj", from_input=True)
        scale = getattr(block, "ls_1", None)
        scale_path = f"{path}.ls_1" if hasattr(scale, "gamma") else None
        heads = HeadSplit(attention.num_heads, scale_path, attention_path)
    else:
        taps["attn.probs"] = Tap(f"{attention_path}.attn_drop")
        unavailable["attn.heads"] = (
            f"attention class {type(attention).__name__}: heads are served for "
            "nn.MultiheadAttention towers"
        )
    return BlockParts(path, taps, unavailable, attention_path, heads=heads)


def _explicit_attention(attention: nn.MultiheadAttention) -> Any:
    """A forward for self-attention that computes the probabilities and calls out_proj as a
    module on the heads' context (torch's own path calls its weight functionally)."""

    def forward(
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        tokens = query if attention.batch_first else query.transpose(0, 1)
        batch, count, width = tokens.shape
        qkv = nn.functional.linear(tokens, attention.in_proj_weight, attention.in_proj_bias)
        q, k, v = qkv.reshape(batch, count, 3, attention.num_heads, -1).permute(2, 0, 3, 1, 4)
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        if attn_mask is not None:
            scores = (
                scores.masked_fill(attn_mask, float("-inf"))
                if attn_mask.dtype == torch.bool
                else scores + attn_mask
            )
        probs = scores.softmax(dim=-1)
        context = (probs @ v).transpose(1, 2).reshape(batch, count, width)
        output = attention.out_proj(context)
        output = output if attention.batch_first else output.transpose(0, 1)
        weights = (probs.mean(dim=1) if average_attn_weights else probs) if need_weights else None
        return output, weights

    return forward


def _trunk_heads(heads: HeadSplit | None) -> HeadSplit | None:
    """A timm trunk's head split with its LayerScale's path inside the tower."""
    if heads is None or heads.layer_scale_path is None:
        return heads
    return replace(heads, layer_scale_path=f"trunk.{heads.layer_scale_path}")


def _tower_parts(
    spec: ModelSpec, visual: nn.Module
) -> tuple[list[BlockParts], list[UnavailableSite], int]:
    """Blocks, notes and the prefix-count hint of an open_clip ViT tower or a timm trunk."""
    trunk = getattr(visual, "trunk", None)
    if isinstance(trunk, nn.Module):
        parts, notes = find_blocks(trunk)
        prefixed = [
            BlockParts(
                f"trunk.{p.path}",
                {
                    part: replace(tap, module_path=f"trunk.{tap.module_path}")
                    for part, tap in p.taps.items()
                },
                p.unavailable,
                f"trunk.{p.attention_path}" if p.attention_path else None,
                tuple(replace(t, module_path=f"trunk.{t.module_path}") for t in p.residual_taps),
                _trunk_heads(p.heads),
            )
            for p in parts
        ]
        return prefixed, notes, prefix_hint(trunk)
    if not hasattr(visual, "transformer") or not hasattr(visual, "ln_post"):
        raise FailedPrecondition(
            f"model {spec.name}: {spec.architecture} has no ViT image tower "
            f"({type(visual).__name__})"
        )
    parts = [
        _resblock_parts(f"transformer.resblocks.{i}", block)
        for i, block in enumerate(visual.transformer.resblocks)  # type: ignore[union-attr, arg-type]
    ]
    return parts, [], 1 if getattr(visual, "class_embedding", None) is not None else 0


class OpenClipTowerAdapter(ModelAdapter):
    """Sites are paths inside `model.visual`; the text tower stays loaded for later methods."""

    family = "open_clip"

    def __init__(self, spec: ModelSpec, model: nn.Module) -> None:
        visual = model.visual
        parts, notes, hint = _tower_parts(spec, visual)  # type: ignore[arg-type]
        super().__init__(spec, visual, parts, notes)  # type: ignore[arg-type]
        self.prefix_hint = hint
        self.clip = model
        self._batch_first = bool(getattr(getattr(visual, "transformer", None), "batch_first", True))
        self._hooks: dict[str, RemovableHandle] = {}
        self._fused_defaults: dict[str, bool] = {}
        preprocess_cfg: dict[str, Any] = getattr(visual, "preprocess_cfg")  # noqa: B009
        cfg = open_clip.transform.PreprocessCfg(**preprocess_cfg)
        self._preprocess_cfg = cfg
        self._transform = open_clip.transform.image_transform_v2(cfg, is_train=False)

    @property
    def module(self) -> nn.Module:
        return self.clip

    @property
    def final_norm_path(self) -> str | None:
        trunk = getattr(self.root, "trunk", None)
        if trunk is None:
            return "ln_post"
        return next((f"trunk.{n}" for n in FINAL_NORMS if hasattr(trunk, n)), None)

    @property
    def data_config(self) -> DataConfig:
        cfg = self._preprocess_cfg
        size = cfg.size if isinstance(cfg.size, tuple) else (cfg.size, cfg.size)
        return DataConfig(
            input_size=(3, int(size[0]), int(size[1])),
            mean=rgb_triple(cfg.mean),
            std=rgb_triple(cfg.std),
            interpolation=cfg.interpolation,
            crop_pct=1.0,
        )

    @property
    def class_names(self) -> list[str]:
        return []

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        tensor: torch.Tensor = self._transform(image)
        return tensor

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        output = self.root(pixels)
        return output[0] if isinstance(output, tuple) else output

    def to_canonical(self, tensor: torch.Tensor, site: Any, batch: int) -> torch.Tensor:
        if site.layout is Layout.HEADS:
            return super().to_canonical(tensor, site, batch)
        if not self._batch_first and tensor.dim() == 3 and tensor.shape[1] == batch:
            tensor = tensor.transpose(0, 1)
        return super().to_canonical(tensor, site, batch)

    def _expose_attention_probs(self, attention_path: str) -> None:
        attention = self.root.get_submodule(attention_path)
        if isinstance(attention, nn.MultiheadAttention):
            self._hooks[attention_path] = attention.register_forward_pre_hook(
                _force_attention_weights, with_kwargs=True
            )
        elif hasattr(attention, "use_fsdpa"):
            self._fused_defaults[attention_path] = bool(attention.use_fsdpa)
            setattr(attention, "use_fsdpa", False)  # noqa: B010
        else:
            unfuse(attention, attention_path, self._fused_defaults)

    def _expose_head_context(self, attention_path: str) -> None:
        attention = self.root.get_submodule(attention_path)
        if isinstance(attention, nn.MultiheadAttention):
            attention.forward = _explicit_attention(attention)  # type: ignore[method-assign]

    def _restore_head_context(self, attention_path: str) -> None:
        attention = self.root.get_submodule(attention_path)
        if "forward" in vars(attention):
            del attention.forward

    def _restore_attention(self, attention_path: str) -> None:
        attention = self.root.get_submodule(attention_path)
        if attention_path in self._hooks:
            self._hooks.pop(attention_path).remove()
        elif hasattr(attention, "use_fsdpa"):
            setattr(attention, "use_fsdpa", self._fused_defaults.pop(attention_path))  # noqa: B010
        else:
            restore_fused(attention, attention_path, self._fused_defaults)

    def runs_blocks_in_sequence(self) -> bool:
        return self._batch_first and self._class_space_cause() is None

    def settle_capabilities(self, pixels: torch.Tensor) -> None:
        cause = self._class_space_cause()
        if cause is not None:
            self._class_head = self._attention_math = self.missing(cause)
            return
        self._class_head = ClipTextHead(self)
        self._attention_math = ClipAttentionMath(self)

    def _class_space_cause(self) -> str | None:
        """Why the tower's tokens cannot be read in the text embedding space, or None."""
        visual = self.root
        if not hasattr(visual, "transformer"):
            return (
                "its tower is a timm trunk, whose pooling and projection head the class-space "
                "methods do not read; towers of ResidualAttentionBlocks are supported"
            )
        if not self.uniform:
            return "its blocks change token grid or width"
        kinds = {type(visual.get_submodule(b.path)).__name__ for b in self.blocks}
        if kinds != {"ResidualAttentionBlock"}:
            return (
                f"its blocks {sorted(kinds)} are not ResidualAttentionBlocks "
                "(nn.MultiheadAttention), whose weights the class-space methods read"
            )
        if getattr(visual, "attn_pool", None) is not None or visual.proj is None:
            return (
                "it pools with attention or has no projection (proj), so a single token has "
                "no image embedding of its own"
            )
        if getattr(visual, "pool_type", "tok") != "tok" or self.num_prefix_tokens == 0:
            return (
                "it pools by average (pool_type "
                f"{getattr(visual, 'pool_type', None)!r}), and its final norm applies after "
                "pooling; class-token pooling (pool_type 'tok') is supported"
            )
        return None


class _Tower:
    def __init__(self, adapter: OpenClipTowerAdapter) -> None:
        self._adapter = adapter
        self._visual: Any = adapter.root

    def _block(self, block: int) -> Any:
        return self._visual.get_submodule(self._adapter.blocks[block].path)


class ClipAttentionMath(_Tower, AttentionMath):
    def values(self, block: int, block_input: torch.Tensor) -> torch.Tensor:
        module = self._block(block)
        attention = module.attn
        batch, tokens, width = block_input.shape
        qkv = torch.nn.functional.linear(
            module.ln_1(block_input),
            attention.in_proj_weight,
            attention.in_proj_bias,
        )
        values = qkv[..., 2 * width :].reshape(batch, tokens, attention.num_heads, -1)
        return values.transpose(1, 2)

    def output(self, block: int, probs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        module = self._block(block)
        output: torch.Tensor = module.ls_1(module.attn.out_proj(mixed_values(probs, values)))
        return output


class ClipTextHead(_Tower, TextClassifier):
    """Tokens go through ln_post then proj; classes are text embeddings."""

    def normed(self, tokens: torch.Tensor, block: int, part: str) -> torch.Tensor:
        normed: torch.Tensor = self._visual.ln_post(tokens)
        return normed

    def image_projection(self) -> torch.Tensor:
        """visual.proj [D, E]: normed tokens -> the shared image-text embedding space."""
        proj: torch.Tensor = self._visual.proj
        return proj

    def logit_scale(self) -> float:
        clip: Any = self._adapter.clip
        return float(clip.logit_scale.exp())

    def encode_class_names(self, names: list[str], templates: list[str]) -> torch.Tensor:
        """Unit text embeddings [C, E]: per name, the mean of its unit template embeddings,
        renormalized (open_clip's zero-shot prompt ensemble)."""
        clip: Any = self._adapter.clip
        tokenizer = open_clip.get_tokenizer(
            self._adapter.spec.architecture, context_length=int(clip.context_length)
        )
        device = self.image_projection().device
        embeddings = []
        for name in names:
            texts = tokenizer([template.format(name) for template in templates]).to(device)
            per_template = torch.nn.functional.normalize(clip.encode_text(texts), dim=-1)
            embeddings.append(torch.nn.functional.normalize(per_template.mean(dim=0), dim=-1))
        return torch.stack(embeddings)

    def value_matrix(self, block: int, kind: MemoryKind) -> torch.Tensor:
        module = self._block(block)
        if kind is MemoryKind.MLP:
            return layer_scaled(module.mlp.c_proj.weight, module.ls_2)
        return layer_scaled(module.attn.out_proj.weight, module.ls_1)

    def coefficient_sites(self, block: int, kind: MemoryKind) -> list[SiteDef]:
        """MLP: c_fc's outputs; attention: the block's input and probabilities, from which
        the mixed values are recomputed (nn.MultiheadAttention calls out_proj unhooked)."""
        anatomy = self._adapter.blocks[block]
        if kind is MemoryKind.MLP:
            tap = Tap(f"{anatomy.path}.mlp.c_fc")
            name = f"blocks.{block}.memories.mlp"
            return [tap_site(name, tap, Layout.TOKENS, anatomy.grid, anatomy.num_prefix_tokens)]
        return [
            self._adapter.block_input_site(block),
            self._adapter.block_site(block, "attn.probs"),
        ]

    def coefficients(
        self, block: int, kind: MemoryKind, captured: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        if kind is MemoryKind.MLP:
            return captured[f"blocks.{block}.memories.mlp"]
        block_input, probs = (captured[s.name] for s in self.coefficient_sites(block, kind))
        return mixed_values(probs, ClipAttentionMath(self._adapter).values(block, block_input))

    def runs_on_token_subsets(self) -> bool:
        return True

    def forward_from_embedded(self, tokens: torch.Tensor) -> torch.Tensor:
        # ln_post per token then the class token equals open_clip's pooling for pool_type "tok".
        final = self._visual.transformer(tokens)[:, 0]
        return self.normed(final, len(self._adapter.blocks) - 1, "out") @ self.image_projection()


def build_open_clip(spec: ModelSpec, pretrained: str | None) -> nn.Module:
    preprocess_overrides = {
        key: value
        for key, value in (
            ("mean", spec.mean),
            ("std", spec.std),
            ("interpolation", spec.interpolation),
        )
        if value is not None
    }
    model = open_clip.create_model(
        spec.architecture,
        pretrained=pretrained,
        force_preprocess_cfg=preprocess_overrides or None,
        **spec.kwargs,
    )
    return model
