"""timm models of every family: data config, classifier, and the class-space anatomy of ViTs."""

from __future__ import annotations

from typing import Any

import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_model_data_config
from timm.layers import Attention, LayerScale, Mlp
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from vitscope_server.core.model.adapters.base import (
    DataConfig,
    ModelAdapter,
    layer_scaled,
    rgb_triple,
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

_AVERAGE_POOLS = ("avg", "avgmax", "max")
_SUPPORTED_BLOCK = "supported: Block with Attention and Mlp, pre-norm, LayerScale as a module"


def _unsupported_block(block: nn.Module) -> str | None:
    """Why class-space methods cannot read this block's attention and MLP by their weights:
    only the plain pre-norm ViT block is written out (no rotary or relative position, no
    GLU, no post-norm, no parameter LayerScale, no gate)."""
    attention, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
    kinds = (type(block), type(attention), type(mlp))
    if kinds != (Block, Attention, Mlp):
        names = ", ".join(kind.__name__ for kind in kinds)
        return f"({names}) is not supported for class-space methods; {_SUPPORTED_BLOCK}"
    if getattr(attention, "gate", None) is not None:
        return "has gated attention, which class-space methods do not support"
    scales = (block.ls1, block.ls2)
    if not all(isinstance(scale, (LayerScale, nn.Identity)) for scale in scales):
        return f"has an unknown layer scale; {_SUPPORTED_BLOCK}"
    return None


def _data_config(spec: ModelSpec, model: nn.Module) -> dict[str, Any]:
    config = dict(resolve_model_data_config(model))
    # kwargs such as img_size change the model but not its pretrained_cfg.
    patch_embed = getattr(model, "patch_embed", None)
    size = spec.kwargs.get("img_size") or getattr(patch_embed, "img_size", None)
    if size is not None:
        height, width = (size, size) if isinstance(size, int) else size
        channels = int(spec.kwargs.get("in_chans", config["input_size"][0]))
        config["input_size"] = (channels, int(height), int(width))
    for key in ("mean", "std", "crop_pct", "interpolation"):
        value = getattr(spec, key)
        if value is not None:
            config[key] = tuple(value) if isinstance(value, tuple) else value
    return config


def _imagenet_class_names(model: nn.Module, num_classes: int) -> list[str]:
    subset = timm.data.infer_imagenet_subset(model)
    if subset is None:
        return []
    names = timm.data.ImageNetInfo(subset).label_descriptions(as_dict=False)
    return list(names) if len(names) == num_classes else []


class TimmAdapter(ModelAdapter):
    """Every timm family: blocks found through feature_info, parts by the library's names."""

    family = "timm"
    head_apart = True

    def __init__(self, spec: ModelSpec, model: nn.Module) -> None:
        parts, notes = find_blocks(model)
        if not parts:
            raise FailedPrecondition(
                f"model {spec.name}: timm architecture {spec.architecture} "
                f"({type(model).__name__}) has no transformer blocks to serve"
            )
        super().__init__(spec, model, parts, notes)
        self.prefix_hint = prefix_hint(model)
        self._fused_defaults: dict[str, bool] = {}
        self._config = _data_config(spec, model)
        self._transform = create_transform(**self._config, is_training=False)
        num_classes = int(getattr(model, "num_classes", 0) or 0)
        self._class_names = list(spec.class_names) if spec.class_names else []
        if self._class_names and len(self._class_names) != num_classes:
            raise FailedPrecondition(
                f"model {spec.name}: {len(self._class_names)} class_names given, classifier has {num_classes}"
            )
        if not self._class_names and num_classes > 0:
            self._class_names = _imagenet_class_names(model, num_classes) or [
                str(i) for i in range(num_classes)
            ]

    @property
    def final_norm_path(self) -> str | None:
        return next((name for name in FINAL_NORMS if hasattr(self.root, name)), None)

    @property
    def data_config(self) -> DataConfig:
        c = self._config
        return DataConfig(
            input_size=(int(c["input_size"][0]), int(c["input_size"][1]), int(c["input_size"][2])),
            mean=rgb_triple(c["mean"]),
            std=rgb_triple(c["std"]),
            interpolation=str(c["interpolation"]),
            crop_pct=float(c["crop_pct"]),
        )

    @property
    def class_names(self) -> list[str]:
        return self._class_names

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        tensor: torch.Tensor = self._transform(image)
        return tensor

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        output: torch.Tensor = self.root(pixels)
        return output

    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor:
        features: torch.Tensor = self.root.forward_features(pixels)  # type: ignore[operator]
        return features

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.root.forward_head(features)  # type: ignore[operator]
        return logits

    def _expose_attention_probs(self, attention_path: str) -> None:
        unfuse(self.root.get_submodule(attention_path), attention_path, self._fused_defaults)

    def _restore_attention(self, attention_path: str) -> None:
        restore_fused(self.root.get_submodule(attention_path), attention_path, self._fused_defaults)

    # Class-space anatomy: head(fc_norm(norm(h))), one of the two norms Identity. Models
    # that pool by average have `norm` Identity and `fc_norm` acting on the pooled vector;
    # here fc_norm acts per token, after the block's own pre-norm for sublayer outputs
    # (norm1 for attention, norm2 for the MLP), as Vilas et al. did. A distilled DeiT's
    # tokens are all projected with `head` (its class-token classifier), not `head_dist`.

    def _block(self, block: int) -> Any:
        return self.root.get_submodule(self.blocks[block].path)

    def class_projection_unsupported(self) -> str | None:
        model = self.root
        if not isinstance(model, VisionTransformer) or not self.uniform:
            generic = str(super().class_projection_unsupported()).partition(": ")[2]
            shape = "" if self.uniform else " (blocks of several grids or widths)"
            return (
                f"model {self.spec.name}: {type(model).__name__}{shape} is not supported for "
                f"class-space methods; {generic}"
            )
        pool = getattr(model, "global_pool", "")
        if pool != "token" and pool not in _AVERAGE_POOLS:
            return (
                f"model {self.spec.name}: global_pool {pool!r} is not supported for class-space "
                f"projection; supported: 'token' (class token) and {_AVERAGE_POOLS}"
            )
        if pool == "token" and self.num_prefix_tokens == 0:
            return f"model {self.spec.name}: token pooling without a class token"
        if not isinstance(getattr(model, "head", None), nn.Linear):
            return f"model {self.spec.name}: no linear classifier head"
        for index in range(len(self.blocks)):
            reason = _unsupported_block(self._block(index))
            if reason is not None:
                return f"model {self.spec.name}: block {index} {reason}"
        return None

    def projection_norm(self, tokens: torch.Tensor, block: int, part: str) -> torch.Tensor:
        model: Any = self.root
        if part != "out" and model.global_pool in _AVERAGE_POOLS:
            pre_norm = self._block(block).norm1 if part == "attn.out" else self._block(block).norm2
            tokens = pre_norm(tokens)
        normed: torch.Tensor = model.fc_norm(model.norm(tokens))
        return normed

    def classifier_head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        head: Any = self.root.head
        return head.weight, head.bias

    def attention_values(self, block: int, block_input: torch.Tensor) -> torch.Tensor:
        module = self._block(block)
        attention = module.attn
        batch, tokens, _ = block_input.shape
        qkv = attention.qkv(module.norm1(block_input))
        qkv = qkv.reshape(batch, tokens, 3, attention.num_heads, -1)
        return qkv[:, :, 2].transpose(1, 2)

    def output_projection_input(
        self, block: int, probs: torch.Tensor, values: torch.Tensor
    ) -> torch.Tensor:
        normed: torch.Tensor = self._block(block).attn.norm(self.mixed_values(probs, values))
        return normed

    def attention_output(
        self, block: int, probs: torch.Tensor, values: torch.Tensor
    ) -> torch.Tensor:
        module = self._block(block)
        projected = module.attn.proj(self.output_projection_input(block, probs, values))
        output: torch.Tensor = module.ls1(projected)
        return output

    def mlp_fc1_path(self, block: int) -> str:
        return f"{self.blocks[block].path}.mlp.fc1"

    def mlp_value_matrix(self, block: int) -> torch.Tensor:
        module = self._block(block)
        return layer_scaled(module.mlp.fc2.weight, module.ls2)

    def attention_value_matrix(self, block: int) -> torch.Tensor:
        module = self._block(block)
        return layer_scaled(module.attn.proj.weight, module.ls1)

    def runs_blocks_in_sequence(self) -> bool:
        """The plain ViT family: blocks -> norm -> pooling and head."""
        return self.class_projection_unsupported() is None

    def reads_class_token(self) -> bool:
        """Only the plain ViT family (DeiT included) runs as blocks -> norm -> head on any token
        subset: Eva-style blocks need their RoPE positions, CaiT adds its class token late."""
        return (
            self.class_projection_unsupported() is None
            and isinstance(self.root, VisionTransformer)
            and isinstance(self.root.blocks, nn.Sequential)
            and self.root.global_pool == "token"
            and self.num_prefix_tokens > 0
        )

    def forward_from_embedded(self, tokens: torch.Tensor) -> torch.Tensor:
        model: Any = self.root
        output: torch.Tensor = model.forward_head(model.norm(model.blocks(tokens)))
        return output


def build_timm(spec: ModelSpec, pretrained_tag: str | None) -> nn.Module:
    name = spec.architecture
    if pretrained_tag:
        name = f"{name}.{pretrained_tag}"
    return timm.create_model(name, pretrained=pretrained_tag is not None, **spec.kwargs)


def timm_adapter(spec: ModelSpec, model: nn.Module) -> TimmAdapter:
    return TimmAdapter(spec, model)
