"""Reading one site's tensor for a caller: token selection, reductions and the result's dtype,
shared by every method that returns site values (GetActivations, Intervene).

The work runs on the model's device and leaves it in one copy: `reduce_on_device` gives the
device tensors, which a batch gathers with everyone else's (core/runtime/transfer.py);
`reduce_site` is the same for one site alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

import numpy as np
import torch

from vitscope_server.core.model.adapters import Layout, SiteDef
from vitscope_server.core.model.tokens import (
    TokenMode,
    TokenSelection,
    resolve_token_indices,
    select_tokens,
)
from vitscope_server.core.runtime.errors import InvalidArgument, require_in_range
from vitscope_server.core.runtime.transfer import to_host


class Reduction(Enum):
    NONE = "none"
    MEAN = "mean"
    PATCH_MAP = "patch_map"
    TOP_CHANNELS = "top_channels"


class TensorDType(Enum):
    """Element types of result tensors; bfloat16 results hold their bit patterns as uint16."""

    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    INT64 = "int64"


OUTPUT_DTYPES = (TensorDType.FLOAT32, TensorDType.FLOAT16, TensorDType.BFLOAT16)
COMPUTE_DTYPES = {
    TensorDType.FLOAT32: torch.float32,
    TensorDType.FLOAT16: torch.float16,
    TensorDType.BFLOAT16: torch.bfloat16,
}


@dataclass(frozen=True)
class OutputTensor:
    """A result tensor; bfloat16 arrays hold bit patterns as uint16."""

    role: str
    dtype: TensorDType
    array: np.ndarray


@dataclass(frozen=True)
class SiteOutput:
    site: SiteDef
    token_indices: list[int]
    channels: list[int]
    tensors: list[OutputTensor]


@dataclass(frozen=True)
class DeviceTensor:
    """A result tensor still on the model's device, already in its output dtype."""

    role: str
    dtype: TensorDType
    tensor: torch.Tensor


@dataclass(frozen=True)
class DeviceSite:
    site: SiteDef
    token_indices: list[int]
    channels: list[int]
    tensors: list[DeviceTensor]

    def on_host(self, arrays: Iterator[np.ndarray]) -> SiteOutput:
        """The site with its tensors replaced, in order, by their host copies."""
        tensors = [OutputTensor(t.role, t.dtype, next(arrays)) for t in self.tensors]
        return SiteOutput(self.site, self.token_indices, self.channels, tensors)


@dataclass(frozen=True)
class Prediction:
    class_index: int
    class_name: str
    probability: float
    logit: float


class Readout(TokenSelection, Protocol):
    """What a request says about how to read a site (ActivationQuery, an Intervene output):
    its tokens, and the reduction and dtype of what it reads."""

    @property
    def reduction(self) -> Reduction: ...

    @property
    def channels(self) -> tuple[int, ...]: ...

    @property
    def top_k(self) -> int: ...

    @property
    def output_dtype(self) -> TensorDType: ...


def _device_output(role: str, tensor: torch.Tensor, dtype: TensorDType) -> DeviceTensor:
    """The tensor cast to its output dtype on the device; int64 (indices) stays int64."""
    if tensor.dtype == torch.int64:
        return DeviceTensor(role, TensorDType.INT64, tensor.contiguous())
    return DeviceTensor(role, dtype, tensor.to(COMPUTE_DTYPES[dtype]).contiguous())


def check_channels(channels: tuple[int, ...], site: SiteDef, num_channels: int) -> None:
    if len(channels) > num_channels:
        raise InvalidArgument("channels", f"at most {num_channels} for site {site.name!r}")
    require_in_range("channels", channels, 0, num_channels - 1, f" for site {site.name!r}")


def check_site(query: Readout, site: SiteDef, shape: tuple[int, ...]) -> list[int]:
    """Every check the site's shape allows (token selection, reduction, channels, top_k);
    returns the selected token indices. Run before any decode with the probed shape, and
    again on the captured tensor."""
    if site.layout in (Layout.WINDOW_ATTENTION, Layout.RAW):
        if query.reduction is not Reduction.NONE or query.token_mode is not TokenMode.ALL:
            raise InvalidArgument(
                "sites",
                f"{site.name!r} has {site.layout.value} layout {list(shape)}; "
                "it allows only REDUCTION_NONE with all tokens",
            )
        return []
    token_axis = 2 if site.layout is Layout.ATTENTION else 1
    indices = resolve_token_indices(query, site, shape[token_axis])
    reduced = query.reduction not in (Reduction.NONE, Reduction.MEAN)
    if reduced and site.layout in (Layout.ATTENTION, Layout.HEADS):
        what = "attention probabilities" if site.layout is Layout.ATTENTION else "heads"
        raise InvalidArgument("reduction", f"site {site.name!r} holds {what}; allowed: NONE, MEAN")
    if query.reduction is Reduction.PATCH_MAP:
        check_channels(query.channels, site, shape[-1])
    if query.reduction is Reduction.TOP_CHANNELS and query.top_k > shape[-1]:
        raise InvalidArgument(
            "top_k", f"{query.top_k} exceeds the {shape[-1]} channels of {site.name!r}"
        )
    return indices


def reduce_on_device(query: Readout, site: SiteDef, tensor: torch.Tensor) -> DeviceSite:
    """Selects tokens and applies the reduction to one site's canonical tensor, on its device."""
    indices = check_site(query, site, tuple(tensor.shape))
    dtype = query.output_dtype
    if site.layout in (Layout.WINDOW_ATTENTION, Layout.RAW):
        return DeviceSite(site, [], [], [_device_output("values", tensor, dtype)])
    token_axis = 2 if site.layout is Layout.ATTENTION else 1
    selected = select_tokens(tensor, token_axis, indices)
    if query.reduction is Reduction.PATCH_MAP:
        channel_tensor = torch.tensor(query.channels, device=tensor.device)
        height, width = site.grid
        maps = selected.index_select(2, channel_tensor).transpose(1, 2)
        values = maps.reshape(tensor.shape[0], len(query.channels), height, width)
        return DeviceSite(
            site, indices, list(query.channels), [_device_output("values", values, dtype)]
        )
    if query.reduction is Reduction.TOP_CHANNELS:
        top = selected.mean(dim=1).topk(query.top_k, dim=-1)
        outputs = [
            _device_output("values", top.values, dtype),
            _device_output("channel_indices", top.indices, TensorDType.INT64),
        ]
        return DeviceSite(site, indices, [], outputs)
    values = selected.mean(dim=token_axis) if query.reduction is Reduction.MEAN else selected
    return DeviceSite(site, indices, [], [_device_output("values", values, dtype)])


def reduce_site(query: Readout, site: SiteDef, tensor: torch.Tensor) -> SiteOutput:
    """reduce_on_device for one site, copied to the host."""
    reduced = reduce_on_device(query, site, tensor)
    return reduced.on_host(iter(to_host([t.tensor for t in reduced.tensors])))


def top_predictions(
    logits: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(probabilities, class indices, logits) of the k most probable classes, on the device."""
    scores = logits.float()
    top = scores.softmax(dim=-1).topk(k, dim=-1)
    return top.values.contiguous(), top.indices.contiguous(), scores.gather(1, top.indices)


def predictions_of(
    names: Sequence[str], probabilities: np.ndarray, classes: np.ndarray, logits: np.ndarray
) -> list[list[Prediction]]:
    """Each row's predictions from top_predictions' tensors, copied to the host."""
    return [
        [
            Prediction(int(c), names[int(c)], float(p), float(v))
            for p, c, v in zip(row_p, row_c, row_v, strict=True)
        ]
        for row_p, row_c, row_v in zip(probabilities, classes, logits, strict=True)
    ]


def predictions(names: Sequence[str], logits: torch.Tensor, k: int) -> list[list[Prediction]]:
    """Each row's top-k classes by probability."""
    return predictions_of(names, *to_host(list(top_predictions(logits, k))))
