"""What an Intervene request asks for, as plain values: edits grouped into variants, a
declared sweep, the metric and the outputs (docs/methods.md section 7).

An edit names a site, a selection along the site's axes and an operation. Selections name
tokens, heads (on blocks.{i}.attn.heads) and channels (the site's last axis). An SAE's
latents will be one more kind of site whose channels are the latents, so latent edits need
a site resolver and an edit space for it, not a new selection.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from vitscope_server.core.model.readout import Reduction, TensorDType
from vitscope_server.core.model.tokens import TokenMode

# A class by index or by name; None: each image's own prediction (the base's, or the source's).
ClassRef = int | str | None


class Operation(Enum):
    ZERO = "zero"
    MEAN = "mean"  # the mean over the request's reference images
    SET = "set"  # every selected element to `value`
    ADD = "add"  # alpha times a direction along the channels
    SCALE = "scale"  # times `factor`
    PATCH = "patch"  # the source images' values at the same site and selection


@dataclass(frozen=True)
class Direction:
    """A vector over a site's channels: given, or a class's row of the classifier head."""

    vector: tuple[float, ...] = ()
    class_row: ClassRef = None


@dataclass(frozen=True)
class Selection:
    token_mode: TokenMode = TokenMode.ALL
    token_indices: tuple[int, ...] = ()
    positions: tuple[tuple[int, int], ...] = ()
    heads: tuple[int, ...] = ()  # empty: every head (attn.heads sites only)
    channels: tuple[int, ...] = ()  # empty: every channel


@dataclass(frozen=True)
class Edit:
    site: str
    operation: Operation
    selection: Selection = Selection()
    value: float = 0.0
    alpha: float = 1.0
    factor: float = 1.0
    direction: Direction | None = None


@dataclass(frozen=True)
class Variant:
    edits: tuple[Edit, ...]
    label: str = ""


class SweepKind(Enum):
    # One site per block (blocks.{i}.{part}) patched from the source at one patch position.
    PATCH_POSITIONS = "patch_positions"
    # Each head of every block (blocks.{i}.attn.heads) edited on its own.
    HEADS = "heads"


@dataclass(frozen=True)
class Sweep:
    kind: SweepKind
    part: str = "out"  # PATCH_POSITIONS: out, attn.out or mlp.out
    operation: Operation = Operation.ZERO  # HEADS: zero, mean or patch
    blocks: tuple[int, ...] = ()  # empty: every block


class MetricKind(Enum):
    LOGIT_DIFFERENCE = "logit_difference"  # target's logit minus the other class's
    TARGET_PROBABILITY = "target_probability"
    KL_DIVERGENCE = "kl_divergence"  # KL(base || variant)


@dataclass(frozen=True)
class Metric:
    kind: MetricKind | None = None  # None: logit difference with a source, else KL
    target: ClassRef = None  # None: the source's prediction (the base's without a source)
    other: ClassRef = None  # None: the base's prediction


@dataclass(frozen=True)
class Outputs:
    """What each variant returns besides its metric: top predictions, chosen classes'
    logits, the whole output, and sites read after the edits."""

    top_k: int = 0
    classes: tuple[int | str, ...] = ()
    logits: bool = False
    sites: tuple[str, ...] = ()
    token_mode: TokenMode = TokenMode.UNSPECIFIED
    token_indices: tuple[int, ...] = ()
    positions: tuple[tuple[int, int], ...] = ()
    reduction: Reduction = Reduction.NONE
    channels: tuple[int, ...] = ()
    top_channels: int = 0
    output_dtype: TensorDType = TensorDType.FLOAT32

    @property
    def top_k_channels(self) -> int:
        return self.top_channels


@dataclass(frozen=True)
class InterventionQuery:
    variants: tuple[Variant, ...] = ()
    sweep: Sweep | None = None
    metric: Metric = Metric()
    outputs: Outputs = field(default_factory=Outputs)
    # Most variants in one forward; None: as many as the memory budget allows.
    variants_per_forward: int | None = None
