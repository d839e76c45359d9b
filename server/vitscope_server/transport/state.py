"""What every RPC mixin of the Inspector servicer reads; InspectorServicer sets it once."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vitscope_server.core.activations.service import ActivationService
from vitscope_server.core.inversion.catalog import InverterCatalog
from vitscope_server.core.model.registry import ModelRegistry
from vitscope_server.core.projection.service import ProjectionService
from vitscope_server.core.runtime.budget import MemoryBudget
from vitscope_server.core.runtime.limits import RequestLimits
from vitscope_server.core.runtime.slots import ComputeSlots
from vitscope_server.transport.batchers import Batchers
from vitscope_server.transport.metrics import Metrics


class ServicerState:
    _registry: ModelRegistry
    _slots: ComputeSlots
    _metrics: Metrics
    _limits: RequestLimits
    _chunk_bytes: int
    _max_message_bytes: int
    _image_roots: Sequence[Path]
    _budget: MemoryBudget
    _batchers: Batchers
    _activation_service: ActivationService
    _projection_service: ProjectionService
    _inverters: InverterCatalog
