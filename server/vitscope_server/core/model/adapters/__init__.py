"""Model adapters: one per family, all exposing the same anatomy."""

from vitscope_server.core.model.adapters.base import (
    BlockAnatomy,
    DataConfig,
    Layout,
    ModelAdapter,
    SiteDef,
)

__all__ = ["BlockAnatomy", "DataConfig", "Layout", "ModelAdapter", "SiteDef"]
