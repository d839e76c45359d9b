"""What an explanation is for: the model's class scores, and each image's target class.

timm classifiers score with their logits. open_clip towers score with the scaled cosine of
their image embedding against unit text embeddings of a label set (class_space.py), and a
free-text prompt is embedded as it is and scored as one more class after the label set.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from vitscope_server.core.model.adapters.capabilities import Missing, TextClassifier, require
from vitscope_server.core.model.class_space import ClassSpace, LabelSet, class_space_of
from vitscope_server.core.model.loading import LoadedModel
from vitscope_server.core.runtime.cancel import CancelToken
from vitscope_server.core.runtime.errors import (
    InvalidArgument,
    quote,
    quote_all,
)


@dataclass(frozen=True)
class Prompt:
    """A free-text target for an open_clip tower."""

    text: str


Target = int | str | Prompt | None


@dataclass(frozen=True)
class TargetSpace:
    """The classes scores are over. `class_space` projects tokens (class-embedding maps);
    None when the model's tokens cannot be projected, with the reason."""

    names: list[str]  # the label set, then the prompts
    label_count: int
    text: torch.Tensor | None  # open_clip: unit class embeddings [C, E]
    logit_scale: float
    class_space: ClassSpace | None
    class_space_missing: str

    @property
    def cosine(self) -> bool:
        return self.text is not None

    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        """[B] the model's own prediction: the top class of the label set (prompts excluded)."""
        return logits[:, : self.label_count].argmax(dim=-1)

    def logits(self, output: torch.Tensor) -> torch.Tensor:
        """The model's forward output -> [B, C] scores whose softmax is the class probability."""
        if self.text is None:
            return output
        return self.logit_scale * F.normalize(output, dim=-1) @ self.text.T


def check_targets(loaded: LoadedModel, targets: tuple[Target, ...], batch: int) -> None:
    """Shape and kind of the targets, before any compute (names are resolved later)."""
    if targets and len(targets) != batch:
        raise InvalidArgument(
            "targets", f"give none or one per image; got {len(targets)} for {batch} images"
        )
    for i, target in enumerate(targets):
        if not isinstance(target, Prompt):
            continue
        if loaded.adapter.family != "open_clip":
            raise InvalidArgument(
                f"targets[{i}].prompt",
                f"free-text prompts are for open_clip towers; model {loaded.spec.name} is a "
                "classifier, give a class index or name",
            )
        if not target.text.strip():
            raise InvalidArgument(f"targets[{i}].prompt", "the prompt is blank")


def _prompt_embeddings(loaded: LoadedModel, prompts: list[str]) -> torch.Tensor:
    head = require(loaded.adapter.class_head(), "prompt targets")
    assert isinstance(head, TextClassifier)
    encoder = head.encode_class_names
    with torch.no_grad():
        embeddings: torch.Tensor = encoder(prompts, ["{}"])
    return embeddings


def target_space(
    loaded: LoadedModel,
    labels: LabelSet | None,
    prompts: list[str],
    cancel: CancelToken,
) -> TargetSpace | None:
    """The scores' classes (prompts appended); None for a model with no classes at all."""
    adapter = loaded.adapter
    head = adapter.class_head()
    missing = head.cause if isinstance(head, Missing) else ""
    if adapter.family != "open_clip":
        if labels is not None:
            raise InvalidArgument(
                "labels",
                f"model {loaded.spec.name} has its own classifier; a label set is only for "
                "open_clip towers",
            )
        if not adapter.has_classifier:
            return None
        space = class_space_of(loaded, None, cancel, "class_embedding") if not missing else None
        names = list(adapter.class_names)
        return TargetSpace(names, len(names), None, 1.0, space, missing)
    space = class_space_of(loaded, labels, cancel, "Explain")
    label_count = space.num_classes
    if prompts:
        extra = _prompt_embeddings(loaded, prompts).to(space.weight)
        space = replace(
            space, names=[*space.names, *prompts], weight=torch.cat([space.weight, extra])
        )
    return TargetSpace(space.names, label_count, space.weight, space.logit_scale, space, "")


def resolve_targets(
    space: TargetSpace, targets: tuple[Target, ...], predicted: torch.Tensor
) -> tuple[torch.Tensor, list[bool]]:
    """[B] class indices (the prediction where unset) and whether each equals the prediction."""
    resolved = predicted.clone()
    label_count = space.label_count
    for i, target in enumerate(targets):
        if target is None:
            continue
        if isinstance(target, Prompt):
            resolved[i] = space.names.index(target.text, label_count)
        elif isinstance(target, str):
            if target not in space.names[:label_count]:
                shown = quote_all(space.names[:label_count])
                raise InvalidArgument(
                    f"targets[{i}].class_ref.name",
                    f"unknown class name {quote(target)}; the {label_count} classes begin {shown}",
                )
            resolved[i] = space.names.index(target)
        elif not 0 <= target < label_count:
            raise InvalidArgument(
                f"targets[{i}].class_ref.index",
                f"class index {target} out of range; allowed 0..{label_count - 1}",
            )
        else:
            resolved[i] = target
    return resolved, [int(r) == int(p) for r, p in zip(resolved, predicted, strict=True)]
