"""timm families: ViT-like models (ViT, DeiT, with any prefix tokens) and Swin-like ones."""

from __future__ import annotations

from typing import Any

import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_model_data_config
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vitscope_server.core.adapters.base import (
    BlockAnatomy,
    DataConfig,
    ModelAdapter,
    layer_scaled,
    rgb_triple,
)
from vitscope_server.core.errors import FailedPrecondition
from vitscope_server.core.specs import ModelSpec

_AVERAGE_POOLS = ("avg", "avgmax", "max")


def _data_config(spec: ModelSpec, model: nn.Module) -> dict[str, Any]:
    config = dict(resolve_model_data_config(model))
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None and getattr(patch_embed, "img_size", None) is not None:
        # kwargs such as img_size change the model but not its pretrained_cfg.
        config["input_size"] = (int(patch_embed.proj.in_channels), *map(int, patch_embed.img_size))
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
    """Shared by timm's families: data config, transform, classifier, class names."""

    family = "timm"

    def __init__(self, spec: ModelSpec, model: nn.Module, blocks: list[BlockAnatomy]) -> None:
        super().__init__(spec, model, blocks)
        self._fused_defaults: dict[int, bool] = {}
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

    def _attention(self, block: int) -> nn.Module:
        return self.root.get_submodule(self.blocks[block].attn_probs_path.rsplit(".", 1)[0])

    def _expose_attention_probs(self, block: int) -> None:
        attention = self._attention(block)
        self._fused_defaults[block] = bool(attention.fused_attn)
        setattr(attention, "fused_attn", False)  # noqa: B010 - a torch.jit.Final attribute

    def _restore_attention(self, block: int) -> None:
        setattr(self._attention(block), "fused_attn", self._fused_defaults.pop(block))  # noqa: B010


class TimmViTAdapter(TimmAdapter):
    """VisionTransformer and its relatives (DeiT, distilled DeiT, register tokens)."""

    def __init__(self, spec: ModelSpec, model: nn.Module) -> None:
        grid = tuple(int(g) for g in model.patch_embed.grid_size)  # type: ignore[union-attr]
        prefix = int(getattr(model, "num_prefix_tokens", 0))
        width = int(model.embed_dim)  # type: ignore[arg-type]
        blocks = []
        for index, block in enumerate(model.blocks):  # type: ignore[arg-type]
            path = f"blocks.{index}"
            if not hasattr(block, "attn") or not hasattr(block.attn, "attn_drop"):
                raise FailedPrecondition(
                    f"model {spec.name}: block {index} has no timm Attention module"
                )
            blocks.append(
                BlockAnatomy(
                    path=path,
                    attn_out_path=f"{path}.ls1" if hasattr(block, "ls1") else f"{path}.attn",
                    mlp_hidden_path=f"{path}.mlp.act",
                    mlp_out_path=f"{path}.ls2" if hasattr(block, "ls2") else f"{path}.mlp",
                    attn_probs_path=f"{path}.attn.attn_drop",
                    attn_probs_output_index=0,
                    grid=grid,  # type: ignore[arg-type]
                    num_prefix_tokens=prefix,
                    width=width,
                )
            )
        super().__init__(spec, model, blocks)

    @property
    def final_norm_path(self) -> str:
        return "norm"

    # Class-space anatomy: head(fc_norm(norm(h))), one of the two norms Identity. Models
    # that pool by average have `norm` Identity and `fc_norm` acting on the pooled vector;
    # here fc_norm acts per token, after the block's own pre-norm for sublayer outputs
    # (norm1 for attention, norm2 for the MLP), as Vilas et al. did. A distilled DeiT's
    # tokens are all projected with `head` (its class-token classifier), not `head_dist`.

    def _block(self, block: int) -> Any:
        return self.root.get_submodule(self.blocks[block].path)

    def class_projection_unsupported(self) -> str | None:
        pool = getattr(self.root, "global_pool", "")
        if pool != "token" and pool not in _AVERAGE_POOLS:
            return (
                f"model {self.spec.name}: global_pool {pool!r} is not supported for class-space "
                f"projection; supported: 'token' (class token) and {_AVERAGE_POOLS}"
            )
        if pool == "token" and self.num_prefix_tokens == 0:
            return f"model {self.spec.name}: token pooling without a class token"
        if not isinstance(getattr(self.root, "head", None), nn.Linear):
            return f"model {self.spec.name}: no linear classifier head"
        if any(
            getattr(self._block(i).attn, "gate", None) is not None for i in range(len(self.blocks))
        ):
            return f"model {self.spec.name}: gated attention is not supported"
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

    def reads_class_token(self) -> bool:
        """Only the plain ViT family (DeiT included) runs as blocks -> norm -> head on any token
        subset: Eva-style blocks need their RoPE positions, CaiT adds its class token late."""
        return (
            isinstance(self.root, VisionTransformer)
            and isinstance(self.root.blocks, nn.Sequential)
            and self.root.global_pool == "token"
            and self.num_prefix_tokens > 0
        )

    def forward_from_embedded(self, tokens: torch.Tensor) -> torch.Tensor:
        model: Any = self.root
        output: torch.Tensor = model.forward_head(model.norm(model.blocks(tokens)))
        return output


class TimmSwinAdapter(TimmAdapter):
    """Swin: stages of windowed-attention blocks, numbered globally as blocks.0 .. blocks.N-1."""

    def __init__(self, spec: ModelSpec, model: nn.Module) -> None:
        blocks = []
        for stage_index, stage in enumerate(model.layers):  # type: ignore[arg-type]
            for block_index, block in enumerate(stage.blocks):
                path = f"layers.{stage_index}.blocks.{block_index}"
                blocks.append(
                    BlockAnatomy(
                        path=path,
                        attn_out_path=f"{path}.drop_path1",
                        mlp_hidden_path=f"{path}.mlp.act",
                        mlp_out_path=f"{path}.drop_path2",
                        attn_probs_path=f"{path}.attn.attn_drop",
                        attn_probs_output_index=0,
                        grid=tuple(int(r) for r in block.input_resolution),  # type: ignore[arg-type]
                        num_prefix_tokens=0,
                        width=int(block.dim),
                        windowed=True,
                    )
                )
        super().__init__(spec, model, blocks)

    @property
    def final_norm_path(self) -> str:
        return "norm"


def build_timm(spec: ModelSpec, pretrained_tag: str | None) -> nn.Module:
    name = spec.architecture
    if pretrained_tag:
        name = f"{name}.{pretrained_tag}"
    return timm.create_model(name, pretrained=pretrained_tag is not None, **spec.kwargs)


def timm_adapter(spec: ModelSpec, model: nn.Module) -> TimmAdapter:
    if hasattr(model, "layers") and all(hasattr(s, "blocks") for s in model.layers):  # type: ignore[union-attr]
        return TimmSwinAdapter(spec, model)
    if hasattr(model, "blocks") and hasattr(model, "patch_embed"):
        return TimmViTAdapter(spec, model)
    raise FailedPrecondition(
        f"model {spec.name}: timm architecture {spec.architecture} is neither ViT-like nor Swin-like"
    )
