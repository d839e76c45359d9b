"""Feature optimization (Ghiasi et al. 2022): an image optimized so a feature's objective grows.

The paper's recipe is the default (docs/methods.md section 2); the image parameterization
(see feature_images), learning-rate schedule and optimizer can be switched. Several
features run as one batch: feature k owns image k and rows k*copies .. (k+1)*copies-1 of
the augmented batch, and its loss reaches only its own image. Every random draw comes from
one CPU torch.Generator seeded by the caller, in a fixed order (the initial image
parameters, then each step's `draw_augmentation`), so the
same seed and parameters give the same images on the same device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum

import numpy as np
import torch
import torch.nn.functional as F

from vitscope_server.core.features.parameterization import Parameterization, image_parameters
from vitscope_server.core.model.adapters import Layout, ModelAdapter, SiteDef
from vitscope_server.core.model.capture import ForwardStopped, capture_sites, last_block_needed
from vitscope_server.core.model.loading import LoadedModel
from vitscope_server.core.model.pixels import normalize, to_uint8
from vitscope_server.core.model.provenance import Provenance, provenance_of
from vitscope_server.core.model.sites import resolve_site
from vitscope_server.core.model.tokens import as_site_layout
from vitscope_server.core.runtime.cancel import CancelToken
from vitscope_server.core.runtime.divergence import (
    MAX_LEARNING_RATE,
    MAX_TV_WEIGHT,
    require_converging,
)
from vitscope_server.core.runtime.errors import (
    FailedPrecondition,
    InvalidArgument,
    Reason,
    ResourceExhausted,
)

ADAM_BETAS = (0.5, 0.99)
ADAM_EPS = 1e-8
DEFAULT_STEPS = 400
# The paper's TV weight: 0.0005 x a multiplier of 1.
DEFAULT_TV_WEIGHT = 0.0005
DEFAULT_COPIES = 8
# Jitter of 32 px at 224 px, scaled with the image size.
JITTER_AT_224 = 32
VIT_LEARNING_RATE = 0.1
CLIP_LEARNING_RATE = 1.0
MAX_STEPS = 100_000
MAX_COPIES = 64
MIN_IMAGE_SIZE = 8
MAX_IMAGE_SIZE = 1024
# What one feature takes in a response beside its image, map and direction: names, framing.
FEATURE_FRAMING_BYTES = 1024


class Schedule(Enum):
    COSINE = "cosine"
    CONSTANT = "constant"


SCHEDULE_DETAILS = {
    Schedule.COSINE: "cosine annealing to 0 over the steps",
    Schedule.CONSTANT: "constant",
}


class Optimizer(Enum):
    ADAM = "adam"
    ADAMAX = "adamax"


class Objective(Enum):
    PATCH_MEAN = "patch_mean"
    TOKEN = "token"
    CLS = "cls"
    DIRECTION = "direction"
    CLASS_LOGIT = "class_logit"


@dataclass(frozen=True)
class FeatureSpec:
    site: str
    channel: int = 0
    objective: Objective = Objective.PATCH_MEAN
    token_index: int = 0
    # As decoded from the wire, any numeric dtype; its length is checked before any use.
    direction: np.ndarray | None = None
    class_index: int = 0


@dataclass(frozen=True)
class OptimizationParams:
    """None means the paper's default for this model."""

    steps: int | None = None
    learning_rate: float | None = None
    tv_weight: float | None = None
    copies: int | None = None
    jitter: int | None = None
    image_size: int | None = None
    seed: int = 0
    progress_every: int = 0
    preview: bool = False
    parameterization: Parameterization = Parameterization.PIXEL
    schedule: Schedule = Schedule.COSINE
    optimizer: Optimizer = Optimizer.ADAM


@dataclass(frozen=True)
class EffectiveParams:
    steps: int
    learning_rate: float
    tv_weight: float
    copies: int
    jitter: int
    image_size: int
    seed: int
    progress_every: int
    preview: bool
    parameterization: Parameterization
    schedule: Schedule
    optimizer: Optimizer


@dataclass(frozen=True)
class PreparedOptimization:
    loaded: LoadedModel
    features: list[FeatureSpec]
    # The site of each feature; None for class logits.
    sites: list[SiteDef | None]
    params: EffectiveParams


@dataclass(frozen=True)
class Progress:
    step: int
    loss: float
    objectives: list[float]
    # uint8 [K, S, S, 3] when a preview was asked for.
    images: np.ndarray | None


@dataclass(frozen=True)
class OptimizedFeature:
    feature: FeatureSpec
    image: np.ndarray  # uint8 [S, S, 3]
    objective: float
    patch_map: np.ndarray | None  # float32 [H, W]


@dataclass(frozen=True)
class OptimizationResult:
    provenance: Provenance
    params: EffectiveParams
    features: list[OptimizedFeature]


def _finite(value: float, field: str, low: float, low_inclusive: bool, high: float) -> float:
    ok = math.isfinite(value) and (value >= low if low_inclusive else value > low)
    if not ok or value > high:
        bound = f">= {low}" if low_inclusive else f"> {low}"
        raise InvalidArgument(field, f"must be a finite number {bound} and <= {high}, got {value}")
    return value


def _in_range(value: int, field: str, low: int, high: int) -> int:
    if not low <= value <= high:
        raise InvalidArgument(field, f"must be in {low}..{high}, got {value}")
    return value


def effective_params(params: OptimizationParams, adapter: ModelAdapter) -> EffectiveParams:
    """Fills the paper's defaults and checks every value against its allowed range."""
    native = adapter.data_config.input_size[1]
    size = params.image_size if params.image_size is not None else native
    _in_range(size, "parameters.image_size", MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)
    default_lr = CLIP_LEARNING_RATE if adapter.family == "open_clip" else VIT_LEARNING_RATE
    jitter = params.jitter if params.jitter is not None else round(JITTER_AT_224 * size / 224)
    return EffectiveParams(
        steps=_in_range(
            params.steps if params.steps is not None else DEFAULT_STEPS,
            "parameters.steps",
            1,
            MAX_STEPS,
        ),
        learning_rate=_finite(
            params.learning_rate if params.learning_rate is not None else default_lr,
            "parameters.learning_rate",
            0.0,
            low_inclusive=False,
            high=MAX_LEARNING_RATE,
        ),
        tv_weight=_finite(
            params.tv_weight if params.tv_weight is not None else DEFAULT_TV_WEIGHT,
            "parameters.tv_weight",
            0.0,
            low_inclusive=True,
            high=MAX_TV_WEIGHT,
        ),
        copies=_in_range(
            params.copies if params.copies is not None else DEFAULT_COPIES,
            "parameters.copies",
            1,
            MAX_COPIES,
        ),
        jitter=_in_range(jitter, "parameters.jitter", 0, size - 1),
        image_size=size,
        seed=_in_range(params.seed, "seed", 0, 2**64 - 1),
        progress_every=_in_range(params.progress_every, "progress_every", 0, MAX_STEPS),
        preview=params.preview,
        parameterization=params.parameterization,
        schedule=params.schedule,
        optimizer=params.optimizer,
    )


def _feature_site(loaded: LoadedModel, feature: FeatureSpec, field: str) -> SiteDef | None:
    adapter = loaded.adapter
    if feature.objective is Objective.CLASS_LOGIT:
        if not adapter.has_classifier:
            raise FailedPrecondition(
                f"{field}.objective: model {adapter.spec.name} has no classifier",
                reason=Reason.NO_CLASSIFIER,
                subject=adapter.spec.name,
                field=f"{field}.objective",
            )
        _in_range(feature.class_index, f"{field}.class_index", 0, len(adapter.class_names) - 1)
        return None
    site = resolve_site(adapter, feature.site, f"{field}.site")
    shape = loaded.site_shapes.get(site.name)
    if shape is not None:
        site = as_site_layout(site, shape)
    if site.layout is not Layout.TOKENS or shape is None:
        raise InvalidArgument(
            f"{field}.site",
            f"{site.name!r} has no [tokens, channels] layout; use a token site "
            "such as blocks.{i}.mlp.hidden, blocks.{i}.out or final",
        )
    channels = shape[-1]
    tokens = shape[1]
    if feature.objective is Objective.DIRECTION:
        given = 0 if feature.direction is None else feature.direction.size
        if feature.direction is None or given != channels:
            raise InvalidArgument(
                f"{field}.direction", f"needs {channels} values for {site.name!r}, got {given}"
            )
        if not np.isfinite(feature.direction).all():
            raise InvalidArgument(f"{field}.direction", "contains NaN or infinity")
    else:
        _in_range(feature.channel, f"{field}.channel", 0, channels - 1)
    if feature.objective is Objective.TOKEN:
        _in_range(feature.token_index, f"{field}.token_index", 0, tokens - 1)
    if feature.objective is Objective.CLS and site.num_prefix_tokens == 0:
        raise InvalidArgument(f"{field}.objective", f"{site.name!r} has no prefix (CLS) token")
    return site


def encoded_image_bound(size: int) -> int:
    """The most bytes an 8-bit RGB PNG of size x size takes: its raw rows with a filter byte
    each, plus stored-block and chunk framing per 64 KiB, plus the header."""
    raw = size * (3 * size + 1)
    return raw + 32 * (raw // 65535 + 1) + 1024


def response_bytes_bound(
    features: list[FeatureSpec], sites: list[SiteDef | None], image_size: int
) -> int:
    """The most bytes the final result (the largest response) takes: every feature's image,
    patch map and direction, the direction twice (the request's echo and the result)."""
    total = 0
    for feature, site in zip(features, sites, strict=True):
        patch_map = math.prod(site.grid) * 4 if site is not None else 0
        direction = 4 * feature.direction.size if feature.direction is not None else 0
        total += encoded_image_bound(image_size) + patch_map + 2 * direction
        total += FEATURE_FRAMING_BYTES
    return total


def prepare_optimization(
    loaded: LoadedModel,
    features: list[FeatureSpec],
    params: OptimizationParams,
    max_batch: int,
    max_pixels: int,
    max_response_bytes: int,
) -> PreparedOptimization:
    """Validation and defaults; needs no compute slot.

    Every step forwards and backpropagates features x copies images at the model's native
    size (or the image size, when larger), so that batch is held to the server's batch and
    pixel limits. The result goes out in one message, so it is held to max_response_bytes
    before any step is run.
    """
    if not features:
        raise InvalidArgument(
            "features", "at least one feature is required", reason=Reason.FIELD_REQUIRED
        )
    effective = effective_params(params, loaded.adapter)
    batch = len(features) * effective.copies
    if batch > max_batch:
        raise ResourceExhausted(
            f"features x copies = {len(features)} x {effective.copies} = {batch} images per step "
            f"exceeds the server's batch limit of {max_batch}; ask for fewer features or copies",
            reason=Reason.BATCH_TOO_LARGE,
        )
    sites = [_feature_site(loaded, f, f"features[{i}]") for i, f in enumerate(features)]
    _, native_height, native_width = loaded.adapter.data_config.input_size
    size = effective.image_size
    batch_pixels = batch * max(size, native_height) * max(size, native_width)
    if batch_pixels > max_pixels:
        raise ResourceExhausted(
            f"features x copies x max(image_size, native size)^2 = {batch_pixels} pixels "
            f"exceeds {max_pixels}; ask for fewer features, copies or a smaller image",
            reason=Reason.BATCH_TOO_LARGE,
        )
    response_bytes = response_bytes_bound(features, sites, size)
    if response_bytes > max_response_bytes:
        raise ResourceExhausted(
            f"features, parameters.image_size: {len(features)} images of {size}x{size} take up to "
            f"{response_bytes} bytes, over the response limit of {max_response_bytes} bytes; "
            "ask for fewer features or a smaller image",
            reason=Reason.RESULT_TOO_LARGE,
        )
    return PreparedOptimization(loaded, features, sites, effective)


@dataclass(frozen=True)
class AugmentationDraw:
    """One step's random draws, made in this order from the generator."""

    color_shift: torch.Tensor  # [N, 3] U(-1, 1), subtracted
    color_scale: torch.Tensor  # [N, 3] U(-1, 1), divided by its exp
    offset: torch.Tensor  # [N, 3] N(0, 1)
    shift: tuple[int, int]  # one circular shift (rows, cols) in [-jitter, jitter]


def draw_augmentation(generator: torch.Generator, count: int, jitter: int) -> AugmentationDraw:
    color_shift = torch.rand(count, 3, generator=generator) * 2 - 1
    color_scale = torch.rand(count, 3, generator=generator) * 2 - 1
    offset = torch.randn(count, 3, generator=generator)
    shift = torch.randint(-jitter, jitter + 1, (2,), generator=generator)
    return AugmentationDraw(color_shift, color_scale, offset, (int(shift[0]), int(shift[1])))


def augment(
    images: torch.Tensor, draw: AugmentationDraw, copies: int, offset_scale: float
) -> torch.Tensor:
    """[K, 3, S, S] -> [K * copies, 3, S, S]: color shift, decaying offset, one jitter."""
    batch = images.repeat_interleave(copies, dim=0)
    device = images.device
    shift = draw.color_shift.to(device)[:, :, None, None]
    scale = draw.color_scale.to(device).exp()[:, :, None, None]
    batch = (batch - shift) / scale
    batch = batch + draw.offset.to(device)[:, :, None, None] * offset_scale
    return torch.roll(batch, shifts=draw.shift, dims=(2, 3))


def total_variation(batch: torch.Tensor) -> torch.Tensor:
    """Per image of [N, 3, S, S]: over four directions, the unsquared L2 norm of the
    difference map of each channel, averaged over channels, summed over directions. [N]."""
    differences = (
        batch[..., :, 1:] - batch[..., :, :-1],
        batch[..., 1:, :] - batch[..., :-1, :],
        batch[..., 1:, 1:] - batch[..., :-1, :-1],
        batch[..., 1:, :-1] - batch[..., :-1, 1:],
    )
    norms = [d.flatten(2).norm(dim=2).mean(dim=1) for d in differences]
    return torch.stack(norms).sum(dim=0)


class FeatureForward:
    """Normalizes, resizes to the model's input and reads each feature's objective per image."""

    def __init__(self, prepared: PreparedOptimization) -> None:
        self.prepared = prepared
        adapter = prepared.loaded.adapter
        config = adapter.data_config
        device = prepared.loaded.device
        self.normalization = config
        self.native = (config.input_size[1], config.input_size[2])
        unique: dict[str, SiteDef] = {s.name: s for s in prepared.sites if s is not None}
        self.sites = list(unique.values())
        needs_logits = any(s is None for s in prepared.sites)
        self.stop_after = None if needs_logits else last_block_needed(adapter, self.sites)
        self.directions = [
            torch.from_numpy(f.direction.reshape(-1).astype(np.float32)).to(device)
            if f.objective is Objective.DIRECTION and f.direction is not None
            else None
            for f in prepared.features
        ]

    def model_input(self, batch: torch.Tensor) -> torch.Tensor:
        if tuple(batch.shape[-2:]) != self.native:
            batch = F.interpolate(batch, size=self.native, mode="bilinear", align_corners=False)
        return normalize(batch, self.normalization)

    def run(
        self, batch: torch.Tensor, copies: int, captured: dict[str, torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """Objective [copies] and per-patch values [copies, H*W] (None for logits) per feature."""
        captured.clear()
        try:
            logits: torch.Tensor | None = self.prepared.loaded.adapter.forward(
                self.model_input(batch)
            )
        except ForwardStopped:
            logits = None
        objectives: list[torch.Tensor] = []
        patches: list[torch.Tensor | None] = []
        for k, (feature, site) in enumerate(
            zip(self.prepared.features, self.prepared.sites, strict=True)
        ):
            rows = slice(k * copies, (k + 1) * copies)
            if site is None:
                assert logits is not None
                objectives.append(logits[rows, feature.class_index].float())
                patches.append(None)
                continue
            tokens = captured[site.name][rows].float()
            prefix = site.num_prefix_tokens
            direction = self.directions[k]
            values = tokens @ direction if direction is not None else tokens[..., feature.channel]
            patch_values = values[:, prefix:]
            if feature.objective is Objective.TOKEN:
                objectives.append(values[:, feature.token_index])
            elif feature.objective is Objective.CLS:
                objectives.append(values[:, 0])
            else:
                objectives.append(patch_values.mean(dim=1))
            patches.append(patch_values)
        return objectives, patches


def step_loss(
    forward: FeatureForward,
    pixels: torch.Tensor,
    draw: AugmentationDraw,
    step: int,
    captured: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of one step (summed over features) and each feature's objective averaged
    over its copies: minus that mean plus the TV weight times the copies' mean TV."""
    params = forward.prepared.params
    count, copies = pixels.shape[0], params.copies
    # The channel offset decays linearly with the steps left: 0.5 at step 0.
    offset_scale = 0.5 * (params.steps - step) / params.steps
    batch = augment(pixels, draw, copies, offset_scale)
    objectives, _ = forward.run(batch, copies, captured)
    tv = total_variation(batch).view(count, copies).mean(dim=1)
    means = torch.stack([o.mean() for o in objectives])
    return (-means + params.tv_weight * tv).sum(), means


def make_optimizer(
    params: EffectiveParams, tensor: torch.Tensor
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    """The optimizer over the image parameters and its schedule (None: constant rate)."""
    kinds = {Optimizer.ADAM: torch.optim.Adam, Optimizer.ADAMAX: torch.optim.Adamax}
    optimizer = kinds[params.optimizer](
        [tensor], lr=params.learning_rate, betas=ADAM_BETAS, eps=ADAM_EPS
    )
    if params.schedule is Schedule.CONSTANT:
        return optimizer, None
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=params.steps)


def optimize_features(
    prepared: PreparedOptimization,
    cancel: CancelToken,
    on_step: Callable[[], object] = lambda: None,
) -> Iterator[Progress | OptimizationResult]:
    """Runs the optimization; yields Progress every progress_every steps, then the result.

    The cancel token is checked before every step and inside every forward; on_step is
    called after each step (a metrics counter).
    """
    loaded, params = prepared.loaded, prepared.params
    adapter = loaded.adapter
    device = loaded.device
    count, copies, size = len(prepared.features), params.copies, params.image_size
    generator = torch.Generator().manual_seed(params.seed)
    image = image_parameters(params.parameterization, count, size, generator, device)
    optimizer, schedule = make_optimizer(params, image.tensor)
    forward = FeatureForward(prepared)
    with capture_sites(
        adapter, forward.sites, count * copies, cancel, forward.stop_after
    ) as captured:
        for step in range(params.steps):
            cancel.raise_if_cancelled()
            draw = draw_augmentation(generator, count * copies, params.jitter)
            loss, means = step_loss(forward, image.pixels(), draw, step, captured)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()
            image.constrain()
            on_step()
            done = step + 1
            if params.progress_every and (
                done % params.progress_every == 0 or done == params.steps
            ):
                require_converging(loss, "parameters.learning_rate", done)
                yield Progress(
                    done,
                    float(loss.detach()),
                    means.detach().cpu().tolist(),
                    to_uint8(image.pixels()) if params.preview else None,
                )
    require_converging(loss, "parameters.learning_rate", params.steps)
    cancel.raise_if_cancelled()
    yield _result(prepared, forward, image.pixels(), cancel)


def _result(
    prepared: PreparedOptimization,
    forward: FeatureForward,
    pixels: torch.Tensor,
    cancel: CancelToken,
) -> OptimizationResult:
    """Objective and maps read from the images as delivered (8-bit), so they can be reproduced."""
    with torch.no_grad():
        final = (pixels.clamp(0, 1) * 255).round() / 255
    adapter, count = prepared.loaded.adapter, len(prepared.features)
    with (
        torch.no_grad(),
        capture_sites(adapter, forward.sites, count, cancel, forward.stop_after) as captured,
    ):
        objectives, patches = forward.run(final, 1, captured)
    images = to_uint8(final)
    results = []
    for k, feature in enumerate(prepared.features):
        site = prepared.sites[k]
        patch = patches[k]
        patch_map = (
            patch[0].reshape(site.grid).cpu().numpy().astype(np.float32)
            if site is not None and patch is not None
            else None
        )
        results.append(OptimizedFeature(feature, images[k], float(objectives[k][0]), patch_map))
    params = prepared.params
    return OptimizationResult(provenance_of(prepared.loaded, params.seed), params, results)
