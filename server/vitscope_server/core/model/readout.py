"""Reading one site's tensor for a caller: token selection, reductions and the result's dtype,
shared by every method that returns site values (GetActivations, Intervene)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Protocol

import numpy as np
import torch

from vitscope_server.core.model.adapters import Layout, SiteDef
from vitscope_server.core.model.tokens import TokenMode, resolve_token_indices, select_tokens
from vitscope_server.core.runtime.errors import InvalidArgument, require_in_range


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


class Readout(Protocol):
    """What a request says about how to read a site (ActivationQuery, an Intervene output)."""

    @property
    def token_mode(self) -> TokenMode: ...

    @property
    def token_indices(self) -> tuple[int, ...]: ...

    @property
    def positions(self) -> tuple[tuple[int, int], ...]: ...

    @property
    def reduction(self) -> Reduction: ...

    @property
    def channels(self) -> tuple[int, ...]: ...

    @property
    def top_k(self) -> int: ...

    @property
    def output_dtype(self) -> TensorDType: ...


def to_output(role: str, tensor: torch.Tensor, dtype: TensorDType) -> OutputTensor:
    if tensor.dtype == torch.int64:
        return OutputTensor(role, TensorDType.INT64, tensor.contiguous().cpu().numpy())
    if dtype is TensorDType.BFLOAT16:
        bits = (
            tensor.to(torch.bfloat16).contiguous().view(torch.int16).cpu().numpy().view(np.uint16)
        )
        return OutputTensor(role, dtype, bits)
    target = torch.float16 if dtype is TensorDType.FLOAT16 else torch.float32
    return OutputTensor(role, dtype, tensor.to(target).contiguous().cpu().numpy())


def check_channels(channels: tuple[int, ...], site: SiteDef, num_channels: int) -> None:
    if len(channels) > num_channels:
        raise InvalidArgument("channels", f"at most {num_channels} for site {site.name!r}")
    require_in_range("channels", channels, 0, num_channels - 1, f" for site {site.name!r}")


def reduce_site(query: Readout, site: SiteDef, tensor: torch.Tensor) -> SiteOutput:
    """Selects tokens and applies the reduction to one site's canonical tensor."""
    reduction = query.reduction
    if site.layout in (Layout.WINDOW_ATTENTION, Layout.RAW):
        if reduction is not Reduction.NONE or query.token_mode is not TokenMode.ALL:
            raise InvalidArgument(
                "sites",
                f"{site.name!r} has {site.layout.value} layout {list(tensor.shape)}; "
                "it allows only REDUCTION_NONE with all tokens",
            )
        return SiteOutput(site, [], [], [to_output("values", tensor, query.output_dtype)])
    token_axis = 2 if site.layout is Layout.ATTENTION else 1
    indices = resolve_token_indices(query, site, tensor.shape[token_axis])
    selected = select_tokens(tensor, token_axis, indices)
    if reduction is Reduction.NONE:
        values = selected
    elif reduction is Reduction.MEAN:
        values = selected.mean(dim=token_axis)
    elif site.layout in (Layout.ATTENTION, Layout.HEADS):
        what = "attention probabilities" if site.layout is Layout.ATTENTION else "heads"
        raise InvalidArgument("reduction", f"site {site.name!r} holds {what}; allowed: NONE, MEAN")
    elif reduction is Reduction.PATCH_MAP:
        check_channels(query.channels, site, tensor.shape[-1])
        channel_tensor = torch.tensor(query.channels, device=tensor.device)
        height, width = site.grid
        maps = selected.index_select(2, channel_tensor).transpose(1, 2)
        values = maps.reshape(tensor.shape[0], len(query.channels), height, width)
        return SiteOutput(
            site, indices, list(query.channels), [to_output("values", values, query.output_dtype)]
        )
    else:
        num_channels = tensor.shape[-1]
        if query.top_k > num_channels:
            raise InvalidArgument(
                "top_k", f"{query.top_k} exceeds the {num_channels} channels of {site.name!r}"
            )
        top = selected.mean(dim=1).topk(query.top_k, dim=-1)
        return SiteOutput(
            site,
            indices,
            [],
            [
                to_output("values", top.values, query.output_dtype),
                to_output("channel_indices", top.indices, TensorDType.INT64),
            ],
        )
    return SiteOutput(site, indices, [], [to_output("values", values, query.output_dtype)])


@dataclass(frozen=True)
class Prediction:
    class_index: int
    class_name: str
    probability: float
    logit: float


def predictions(names: list[str], logits: torch.Tensor, k: int) -> list[list[Prediction]]:
    """Each row's top-k classes by probability."""
    probabilities = logits.float().softmax(dim=-1)
    top = probabilities.topk(k, dim=-1)
    result = []
    for row in range(logits.shape[0]):
        result.append(
            [
                Prediction(int(c), names[int(c)], float(p), float(logits[row, int(c)]))
                for p, c in zip(top.values[row].tolist(), top.indices[row].tolist(), strict=True)
            ]
        )
    return result
