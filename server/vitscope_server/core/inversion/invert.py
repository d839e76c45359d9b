"""Invert: representations at a depth back to images, learned (modular inverses) or by optimization.

Depth convention (see inversion_modules): depth 0 = `embed`, depth k = `blocks.{k-1}.out`.
Reconstructions are 8-bit RGB images at the model's input size, exactly what the caller
receives; every score (MSE and PSNR against the original, representation distance) is of
that 8-bit image. The original is the caller's image after the model's own transform, in
[0, 1] pixels.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum

import numpy as np
import torch

from vitscope_server.core.inversion.catalog import InverterCatalog
from vitscope_server.core.inversion.modules import chain_names, depth_site
from vitscope_server.core.inversion.store import Manifest
from vitscope_server.core.model.adapters import ModelAdapter
from vitscope_server.core.model.capture import ForwardStopped, capture_sites
from vitscope_server.core.model.images import ImageInput, prepare_batch
from vitscope_server.core.model.loading import LoadedModel
from vitscope_server.core.model.pixels import denormalize, normalize, to_uint8
from vitscope_server.core.model.provenance import Provenance, provenance_of
from vitscope_server.core.model.sites import resolve_site
from vitscope_server.core.runtime.batching import item_rows
from vitscope_server.core.runtime.cancel import CancelToken
from vitscope_server.core.runtime.divergence import (
    MAX_LEARNING_RATE,
    MAX_TV_WEIGHT,
    require_converging,
)
from vitscope_server.core.runtime.errors import InvalidArgument, NotFound, Reason, ResourceExhausted

MAX_STEPS = 10_000
"""Most optimization steps of one inversion."""


class Method(Enum):
    LEARNED = "learned"
    OPTIMIZATION = "optimization"


@dataclass(frozen=True)
class OptimizationParams:
    """Mahendran & Vedaldi style: Adam on [0, 1] pixels, relative squared representation
    distance + tv_weight * anisotropic_tv_l1."""

    steps: int = 200
    learning_rate: float = 0.05
    tv_weight: float = 0.01
    seed: int = 0
    progress_every: int = 10


@dataclass(frozen=True)
class InvertQuery:
    method: Method
    depths: tuple[int, ...] = ()
    optimization: OptimizationParams = field(default_factory=OptimizationParams)


@dataclass(frozen=True)
class Progress:
    depth: int
    step: int
    total_steps: int
    loss: float
    representation_distance: float


@dataclass(frozen=True)
class Reconstruction:
    """One depth's reconstructions, uint8 [B, H, W, 3]; mse/psnr when the originals are known."""

    depth: int
    site: str
    images: np.ndarray
    mse: list[float] | None
    psnr: list[float] | None
    representation_distance: list[float]


@dataclass(frozen=True)
class InvertHeader:
    provenance: Provenance
    query: InvertQuery
    batch_size: int
    inverter: Manifest | None
    from_representation: bool


Event = InvertHeader | Progress | Reconstruction


@dataclass(frozen=True)
class PreparedInversion:
    loaded: LoadedModel
    query: InvertQuery
    # Normalized model inputs of the originals, when known.
    pixels: torch.Tensor | None
    # A caller-sent representation at query.depths[0], instead of computing it.
    representation: torch.Tensor | None
    inverter: Manifest | None
    # LEARNED: every module the deepest requested depth's chain needs, by name.
    modules: dict[str, torch.nn.Module]

    @property
    def batch_size(self) -> int:
        """Images inverted: the sent representation's batch, else the originals'."""
        if self.representation is not None:
            return int(self.representation.shape[0])
        return int(self.pixels.shape[0]) if self.pixels is not None else 0


def representations(
    adapter: ModelAdapter, inputs: torch.Tensor, depths: list[int], cancel: CancelToken
) -> dict[int, torch.Tensor]:
    """Canonical [B, T, D] tokens at each depth, from one forward stopped after the deepest.

    Gradients flow when the caller has them enabled (optimization needs them).
    """
    sites = [resolve_site(adapter, depth_site(d)) for d in sorted(set(depths))]
    deepest = max(depths)
    stop = deepest - 1 if deepest > 0 else 0
    with (
        capture_sites(adapter, sites, inputs.shape[0], cancel, stop) as captured,
        contextlib.suppress(ForwardStopped),
    ):
        adapter.forward(inputs)
    return {d: captured[depth_site(d)] for d in depths}


def representation_shape(loaded: LoadedModel, depth: int) -> tuple[int, ...]:
    """[tokens, width] of one image's representation at depth."""
    return tuple(loaded.site_shapes[depth_site(depth)][1:])


def _check_depths(loaded: LoadedModel, depths: tuple[int, ...], field_name: str) -> None:
    num_blocks = len(loaded.adapter.blocks)
    bad = [d for d in depths if not 0 <= d <= num_blocks]
    if bad:
        raise InvalidArgument(
            field_name,
            f"depths {bad} out of range; allowed 0..{num_blocks} "
            f"(0 = embed, k = blocks.{{k-1}}.out)",
        )
    if len(set(depths)) != len(depths):
        raise InvalidArgument(field_name, f"each depth may appear once, got {list(depths)}")


def _check_optimization(params: OptimizationParams) -> None:
    if not 1 <= params.steps <= MAX_STEPS:
        raise InvalidArgument(
            "optimization.steps", f"{params.steps} not allowed; allowed 1..{MAX_STEPS}"
        )
    if not (math.isfinite(params.learning_rate) and 0 < params.learning_rate <= MAX_LEARNING_RATE):
        raise InvalidArgument(
            "optimization.learning_rate",
            f"{params.learning_rate} not allowed; allowed: finite, > 0 and <= {MAX_LEARNING_RATE}",
        )
    if not (math.isfinite(params.tv_weight) and 0 <= params.tv_weight <= MAX_TV_WEIGHT):
        raise InvalidArgument(
            "optimization.tv_weight",
            f"{params.tv_weight} not allowed; allowed: finite, >= 0 and <= {MAX_TV_WEIGHT}",
        )
    if params.progress_every < 1:
        raise InvalidArgument(
            "optimization.progress_every", f"{params.progress_every} not allowed; allowed >= 1"
        )


def _check_representation(
    loaded: LoadedModel, array: np.ndarray, depth: int, max_batch: int
) -> None:
    expected = representation_shape(loaded, depth)
    allowed = f"[batch, {', '.join(map(str, expected))}] of float32, float16 or bfloat16"
    if array.dtype not in (np.float32, np.float16):
        raise InvalidArgument(
            "representation.values", f"dtype {array.dtype} not allowed; expected {allowed}"
        )
    if array.ndim != 3 or tuple(array.shape[1:]) != expected or array.shape[0] < 1:
        raise InvalidArgument(
            "representation.values",
            f"shape {list(array.shape)} does not fit depth {depth} "
            f"({depth_site(depth)}) of {loaded.spec.name}; expected {allowed}",
        )
    if array.shape[0] > max_batch:
        raise ResourceExhausted(
            f"representation.values: batch {array.shape[0]} exceeds the limit of {max_batch} "
            "per request",
            reason=Reason.BATCH_TOO_LARGE,
            field="representation.values",
        )
    if not np.isfinite(array).all():
        raise InvalidArgument("representation.values", "contains NaN or infinity")


def check_inversion(
    loaded: LoadedModel,
    catalog: InverterCatalog,
    query: InvertQuery,
    representation: tuple[np.ndarray, int] | None,
    images: int,
    max_batch: int,
) -> tuple[InvertQuery, Manifest | None]:
    """The query with its depths, and the inverter a learned inversion takes, with every
    check that needs no image but their number: the recipe, the depths, a representation's
    dtype, shape and values, and the inverter's reach."""
    if query.method is Method.OPTIMIZATION:
        _check_optimization(query.optimization)
    if representation is not None:
        values, depth = representation
        if query.depths:
            raise InvalidArgument(
                "depths",
                "leave empty when a representation is sent; its depth is representation.depth",
            )
        query = replace(query, depths=(depth,))
        _check_depths(loaded, query.depths, "representation.depth")
        _check_representation(loaded, values, depth, max_batch)
        if images and images != values.shape[0]:
            raise InvalidArgument(
                "images", f"{images} originals for a representation of batch {values.shape[0]}"
            )
    else:
        if not query.depths:
            raise InvalidArgument(
                "depths", "at least one depth is required with images", reason=Reason.FIELD_REQUIRED
            )
        _check_depths(loaded, query.depths, "depths")
    if query.method is not Method.LEARNED:
        return query, None
    inverter = catalog.for_model(loaded)
    deepest = max(query.depths)
    if deepest > inverter.max_depth:
        raise NotFound(
            Reason.INVERTER_NOT_FOUND,
            f"{loaded.spec.name} depth {deepest}",
            f"depths: the inverter of {loaded.spec.name} reaches depth {inverter.max_depth}, "
            f"asked for {deepest}",
            field="depths",
            metadata={"model": loaded.spec.name},
        )
    return query, inverter


def prepare_inversion(
    loaded: LoadedModel,
    catalog: InverterCatalog,
    images: list[ImageInput],
    checked: tuple[InvertQuery, Manifest | None],
    representation: tuple[np.ndarray, int] | None,
    max_batch: int,
    max_pixels: int,
) -> PreparedInversion:
    """Decoding and the inverter's modules for a query check_inversion passed (`checked` is
    what it returned): the rest of what needs no compute slot."""
    query, inverter = checked
    tensor = None
    if representation is not None:
        tensor = torch.from_numpy(np.array(representation[0], dtype=np.float32))
    pixels = None
    if images or representation is None:
        pixels = prepare_batch(loaded.adapter, images, max_batch, max_pixels)
    modules = {}
    if inverter is not None:
        modules = catalog.modules(inverter, chain_names(max(query.depths)), loaded.device)
    return PreparedInversion(loaded, query, pixels, tensor, inverter, modules)


def _score(
    reconstruction: torch.Tensor, original: torch.Tensor | None
) -> tuple[list[float] | None, list[float] | None]:
    """Per image MSE and PSNR (peak 1) in [0, 1] pixels, or None without originals."""
    if original is None:
        return None, None
    mse = ((reconstruction - original) ** 2).flatten(1).mean(1).double()
    psnr = 10 * torch.log10(1.0 / mse.clamp_min(1e-12))
    return mse.tolist(), psnr.tolist()


def relative_distance(got: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per image ||got - target||^2 / ||target||^2."""
    error = ((got - target) ** 2).flatten(1).sum(1)
    return error / (target**2).flatten(1).sum(1).clamp_min(1e-12)


def chain(modules: list[torch.nn.Module], tokens: torch.Tensor) -> torch.Tensor:
    for module in modules:
        tokens = module(tokens)
    return tokens


def anisotropic_tv_l1(pixels: torch.Tensor) -> torch.Tensor:
    """Total-variation prior of OPTIMIZATION inversion: mean |horizontal neighbor difference|
    plus mean |vertical neighbor difference|.

    Mahendran & Vedaldi (2015) regularize inversions with TV^beta, the sum over pixels of
    ((dx)^2 + (dy)^2)^(beta/2). This is the anisotropic beta = 1 form: like classic TV it
    favors piecewise-constant images over noise; abs has a defined (zero) gradient where
    neighbors are equal, where the square root of the isotropic form has none; and as a
    mean it does not grow with the input size, so one default weight suits every model.
    Feature visualization uses another TV (four directions, L2 per difference map), in
    core/features/optimize.py.
    """
    dx = (pixels[..., :, 1:] - pixels[..., :, :-1]).abs().mean()
    dy = (pixels[..., 1:, :] - pixels[..., :-1, :]).abs().mean()
    return dx + dy


def optimize(
    adapter: ModelAdapter,
    target: torch.Tensor,
    depth: int,
    params: OptimizationParams,
    cancel: CancelToken,
    on_step: Callable[[], object],
) -> Generator[Progress, None, torch.Tensor]:
    """Pixels [B, 3, H, W] in [0, 1] whose representation at `depth` matches `target`; yields
    progress as it goes and returns the pixels. on_step is called after every step taken.

    Starts from mid-grey plus small seeded noise; clamps to [0, 1] after every step; checks
    the cancel token every step (and inside the forward, between blocks).
    """
    generator = torch.Generator().manual_seed(params.seed)
    shape = (target.shape[0], *adapter.data_config.input_size)
    start = 0.5 + 0.05 * torch.randn(shape, generator=generator)
    pixels = start.to(target.device).requires_grad_(True)
    optimizer = torch.optim.Adam([pixels], lr=params.learning_rate)
    for step in range(1, params.steps + 1):
        cancel.raise_if_cancelled()
        got = representations(adapter, normalize(pixels, adapter.data_config), [depth], cancel)[
            depth
        ]
        per_image = relative_distance(got, target)
        loss = per_image.mean() + params.tv_weight * anisotropic_tv_l1(pixels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            pixels.clamp_(0.0, 1.0)
        on_step()
        if step % params.progress_every == 0 or step == params.steps:
            require_converging(loss, "optimization.learning_rate", step)
            yield Progress(depth, step, params.steps, loss.item(), float(per_image.detach().mean()))
    return pixels.detach()


def header(prepared: PreparedInversion) -> InvertHeader:
    query = prepared.query
    seed = query.optimization.seed if query.method is Method.OPTIMIZATION else 0
    return InvertHeader(
        provenance_of(prepared.loaded, seed),
        query,
        prepared.batch_size,
        prepared.inverter,
        prepared.representation is not None,
    )


def scored(
    adapter: ModelAdapter,
    depth: int,
    images: Sequence[np.ndarray],
    targets: Sequence[torch.Tensor],
    originals: Sequence[torch.Tensor | None],
    cancel: CancelToken,
) -> list[Reconstruction]:
    """Each request's delivered 8-bit images at `depth`, scored after one forward over all
    of them (several requests' rows are independent of one another)."""
    cancel.raise_if_cancelled()
    device = targets[0].device
    delivered = [torch.from_numpy(i).to(device).movedim(-1, -3).float() / 255 for i in images]
    with torch.no_grad():
        pixels = normalize(torch.cat(delivered), adapter.data_config)
        again = representations(adapter, pixels, [depth], cancel)[depth]
    results = []
    rows_of = item_rows(image.shape[0] for image in images)
    for image, pixels_01, target, original, rows in zip(
        images, delivered, targets, originals, rows_of, strict=True
    ):
        mse, psnr = _score(pixels_01, original)
        distance = relative_distance(again[rows], target).tolist()
        results.append(Reconstruction(depth, depth_site(depth), image, mse, psnr, distance))
    return results


def invert_by_optimization(
    prepared: PreparedInversion,
    cancel: CancelToken,
    on_step: Callable[[], object] = lambda: None,
) -> Iterator[Event]:
    """Yields the header, progress and one Reconstruction per depth; on_step is called after
    every optimization step (for the steps metric). Learned inversion is learned_inversion's."""
    loaded, query = prepared.loaded, prepared.query
    adapter, device = loaded.adapter, loaded.device
    inputs = prepared.pixels.to(device) if prepared.pixels is not None else None
    originals = denormalize(inputs, adapter.data_config) if inputs is not None else None
    yield header(prepared)
    with torch.no_grad():
        if prepared.representation is not None:
            targets = {query.depths[0]: prepared.representation.to(device)}
        else:
            assert inputs is not None
            targets = representations(adapter, inputs, list(query.depths), cancel)
    for depth in query.depths:
        cancel.raise_if_cancelled()
        target = targets[depth]
        with torch.enable_grad():
            pixels = yield from optimize(
                adapter, target, depth, query.optimization, cancel, on_step
            )
        yield scored(adapter, depth, [to_uint8(pixels)], [target], [originals], cancel)[0]
