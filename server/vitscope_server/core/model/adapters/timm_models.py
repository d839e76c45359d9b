"""timm models of every family: data config, classifier, and the class-space anatomy of ViTs."""

from __future__ import annotations

from typing import Any

import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_model_data_config
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vitscope_server.core.model.adapters.base import (
    DataConfig,
    ModelAdapter,
    rgb_triple,
)
from vitscope_server.core.model.adapters.timm_blocks import (
    FINAL_NORMS,
    find_blocks,
    prefix_hint,
    restore_fused,
    unfuse,
)
from vitscope_server.core.model.adapters.timm_head import settle_timm_capabilities
from vitscope_server.core.model.specs import ModelSpec
from vitscope_server.core.runtime.errors import FailedPrecondition


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

    def runs_blocks_in_sequence(self) -> bool:
        """The plain ViT family: one [batch, tokens, width] tensor from block to block."""
        return isinstance(self.root, VisionTransformer) and self.uniform

    def settle_capabilities(self, pixels: torch.Tensor) -> None:
        self._class_head, self._attention_math = settle_timm_capabilities(self, pixels)


def build_timm(spec: ModelSpec, pretrained_tag: str | None) -> nn.Module:
    name = spec.architecture
    if pretrained_tag:
        name = f"{name}.{pretrained_tag}"
    return timm.create_model(name, pretrained=pretrained_tag is not None, **spec.kwargs)


def timm_adapter(spec: ModelSpec, model: nn.Module) -> TimmAdapter:
    return TimmAdapter(spec, model)
