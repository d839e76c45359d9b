"""What only some models offer, as objects an adapter returns or refuses with the cause.

Every adapter serves preprocessing, the forward and the anatomy (base.py). A classifier
head for class-space methods, attention probabilities over one token sequence, and
attention outputs recomputed from their probabilities (the gradients relevancy and
importance maps take) exist on some models only: the adapter returns the capability, or
a `Missing` that says why, and the method that needs it calls `require` once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, TypeVar

import torch

from vitscope_server.core.runtime.errors import FailedPrecondition, Reason

if TYPE_CHECKING:
    from vitscope_server.core.model.adapters.base import SiteDef


@dataclass(frozen=True)
class Missing:
    """A capability the model lacks, and the cause a user can act on."""

    model: str
    cause: str
    reason: Reason = Reason.MODEL_UNSUPPORTED

    def refusal(self, method: str, field: str = "") -> FailedPrecondition:
        return FailedPrecondition(
            f"{method} does not apply to model {self.model}: {self.cause}",
            reason=self.reason,
            subject=self.model,
            field=field,
        )


Capability = TypeVar("Capability")


def require(found: Capability | Missing, method: str, field: str = "") -> Capability:
    """The capability, or FAILED_PRECONDITION naming the model, the method and the cause."""
    if isinstance(found, Missing):
        raise found.refusal(method, field)
    return found


class MemoryKind(Enum):
    """Whose value vectors are the memories: the MLP's second layer or attention's output."""

    MLP = "mlp"
    ATTENTION = "attention"


class ClassifierHead(ABC):
    """What class-space methods read (METHODS §3): the model's own norms per token, its
    class matrix, and each block's key-value memories."""

    @abstractmethod
    def normed(self, tokens: torch.Tensor, block: int, part: str) -> torch.Tensor:
        """The model's norm(s) before its classifier applied per token to `part` ("out",
        "attn.out" or "mlp.out") of `block`."""

    def memory_refusal(self, block: int, kind: MemoryKind) -> str | None:
        """Why block `block`'s memories of `kind` cannot be read (its sublayer output is not
        coefficients times value vectors), or None."""
        return None

    @abstractmethod
    def value_matrix(self, block: int, kind: MemoryKind) -> torch.Tensor:
        """[D, memories]: each column what one memory adds to the residual stream per unit of
        its coefficient (layer scale included)."""

    @abstractmethod
    def coefficient_sites(self, block: int, kind: MemoryKind) -> list[SiteDef]:
        """Sites a forward must capture for the memories' coefficients."""

    @abstractmethod
    def coefficients(
        self, block: int, kind: MemoryKind, captured: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        """[B, T, memories] from the captured coefficient sites."""

    def runs_on_token_subsets(self) -> bool:
        """Whether the prediction is read at the class token alone, so the model can run on
        any subset of patch tokens (forward_from_embedded)."""
        return False

    def forward_from_embedded(self, tokens: torch.Tensor) -> torch.Tensor:
        """The forward output from the tokens entering block 0 [B, T', D]."""
        raise NotImplementedError


class LinearClassifier(ClassifierHead):
    """A classifier of its own: scores = weight @ normed + bias."""

    @property
    @abstractmethod
    def weight(self) -> torch.Tensor:
        """[C, D]"""

    @property
    @abstractmethod
    def bias(self) -> torch.Tensor | None:
        """[C]"""


class TextClassifier(ClassifierHead):
    """A CLIP tower: normed tokens go through the image projection and are compared with
    unit text embeddings of caller-chosen class names."""

    @abstractmethod
    def image_projection(self) -> torch.Tensor:
        """[D, E]"""

    @abstractmethod
    def logit_scale(self) -> float: ...

    @abstractmethod
    def encode_class_names(self, names: list[str], templates: list[str]) -> torch.Tensor:
        """Unit text embeddings [C, E]."""


class AttentionMath(ABC):
    """Each block's attention output recomputed from its probabilities, so gradients can
    flow to them whatever kernel the model ran."""

    @abstractmethod
    def values(self, block: int, block_input: torch.Tensor) -> torch.Tensor:
        """The value vectors [B, heads, T, head_dim] the block's attention mixes."""

    @abstractmethod
    def output(self, block: int, probs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """The attention sublayer's output [B, queries, D] as added to the residual stream."""


def mixed_values(probs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Per-head attention-weighted values, heads concatenated [B, queries, heads x head_dim]."""
    mixed = probs @ values
    batch, heads, queries, head_dim = mixed.shape
    return mixed.transpose(1, 2).reshape(batch, queries, heads * head_dim)


@dataclass(frozen=True)
class AttentionProbs:
    """Every block's probabilities over one token sequence: the sites to capture."""

    sites: list[SiteDef]
