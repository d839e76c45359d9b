"""A model's class space: scores of normed token representations against its classes.

timm: the classifier's weight and bias. open_clip: the image projection, then cosine
similarity with unit text embeddings of caller-chosen class names, cached per
(model, label set).
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vitscope_server.core.model.adapters.capabilities import (
    ClassifierHead,
    LinearClassifier,
    TextClassifier,
    require,
)
from vitscope_server.core.model.loading import LoadedModel
from vitscope_server.core.runtime.cancel import CancelToken
from vitscope_server.core.runtime.errors import (
    InvalidArgument,
    Reason,
    quote,
    quote_all,
)

_CACHE_ENTRIES = 8
# Every name is encoded once per template before any projection: bound that work.
MAX_CLASS_NAMES = 10_000
MAX_TEMPLATES = 100


@dataclass(frozen=True)
class LabelSet:
    """Class names and prompt templates for an open_clip tower; no templates: the defaults."""

    class_names: tuple[str, ...]
    templates: tuple[str, ...] = ()


def _imagenet_templates() -> tuple[str, ...]:
    """open_clip's 80 ImageNet zero-shot templates (open_clip is imported only when needed)."""
    import open_clip

    return tuple(template("{}") for template in open_clip.OPENAI_IMAGENET_TEMPLATES)


def _imagenet_labels() -> LabelSet:
    import open_clip

    return LabelSet(tuple(open_clip.IMAGENET_CLASSNAMES), _imagenet_templates())


@dataclass(frozen=True)
class ClassSpace:
    """scores(z) = W @ (z @ proj) + bias, with z @ proj unit-normalized when cosine."""

    names: list[str]
    weight: torch.Tensor  # [C, E]
    bias: torch.Tensor | None
    projection: torch.Tensor | None  # [D, E], open_clip's visual.proj
    cosine: bool
    # Multiplies scores inside a cross-entropy (open_clip's learned temperature).
    logit_scale: float
    templates: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def scores(self, normed: torch.Tensor) -> torch.Tensor:
        """[..., D] normed tokens -> [..., C] class scores, one matrix product."""
        embedded = normed @ self.projection if self.projection is not None else normed
        if self.cosine:
            embedded = F.normalize(embedded, dim=-1)
        return F.linear(embedded, self.weight, self.bias)

    def output_scores(self, output: torch.Tensor) -> torch.Tensor:
        """The model's own class scores from its forward output: its logits, or the cosine of
        its embedding with the class embeddings (open_clip)."""
        return output if self.projection is None else F.normalize(output, dim=-1) @ self.weight.T

    def token_weight(self) -> torch.Tensor:
        """[C, D]: the class matrix over normed tokens (head.weight, or text @ proj^T)."""
        return self.weight @ self.projection.T if self.projection is not None else self.weight

    def resolve(self, ref: int | str | None, field: str) -> int | None:
        """A class index from an index or a name; None stays None (the prediction)."""
        if ref is None:
            return None
        if isinstance(ref, str):
            if ref not in self.names:
                raise InvalidArgument(
                    field,
                    f"unknown class name {quote(ref)}; the classes are {quote_all(self.names, 10)}",
                )
            return self.names.index(ref)
        if not 0 <= ref < self.num_classes:
            raise InvalidArgument(
                field, f"class index {ref} out of range; allowed 0..{self.num_classes - 1}"
            )
        return ref


class _TextEmbeddings:
    """A small LRU of unit class-name embeddings per (model, weights, names, templates)."""

    def __init__(self, entries: int) -> None:
        self._entries = entries
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[object, ...], torch.Tensor] = OrderedDict()

    def get(
        self, loaded: LoadedModel, head: TextClassifier, labels: LabelSet, cancel: CancelToken
    ) -> torch.Tensor:
        key = (loaded.spec.name, loaded.weights_identity, labels.class_names, labels.templates)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        encoder = head.encode_class_names
        # Not inference mode: importance maps differentiate through these embeddings.
        with torch.no_grad():
            chunks = []
            for start in range(0, len(labels.class_names), 16):
                cancel.raise_if_cancelled()
                names = list(labels.class_names[start : start + 16])
                chunks.append(encoder(names, list(labels.templates)))
            embeddings = torch.cat(chunks)
        with self._lock:
            self._cache[key] = embeddings
            while len(self._cache) > self._entries:
                self._cache.popitem(last=False)
        return embeddings

    def holds(self, class_names: tuple[str, ...], templates: tuple[str, ...]) -> bool:
        """Whether embeddings of these names and templates are cached (for any model)."""
        with self._lock:
            return any(key[2:] == (class_names, templates) for key in self._cache)


TEXT_EMBEDDINGS = _TextEmbeddings(_CACHE_ENTRIES)


def _checked_labels(labels: LabelSet | None) -> LabelSet:
    if labels is None:
        return _imagenet_labels()
    names = labels.class_names
    templates = labels.templates or _imagenet_templates()
    if not names:
        raise InvalidArgument(
            "labels.class_names",
            "the label set is empty; give at least one name",
            reason=Reason.FIELD_REQUIRED,
        )
    if len(names) > MAX_CLASS_NAMES:
        raise InvalidArgument(
            "labels.class_names", f"{len(names)} names; allowed at most {MAX_CLASS_NAMES}"
        )
    if len(labels.templates) > MAX_TEMPLATES:
        raise InvalidArgument(
            "labels.templates",
            f"{len(labels.templates)} templates; allowed at most {MAX_TEMPLATES}",
        )
    blank = [i for i, name in enumerate(names) if not name.strip()]
    if blank:
        raise InvalidArgument("labels.class_names", f"names at {blank[:5]} are blank")
    if len(set(names)) != len(names):
        repeated = sorted(n for n, count in Counter(names).items() if count > 1)
        raise InvalidArgument(
            "labels.class_names", f"each name may appear once; repeated {quote_all(repeated)}"
        )
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise InvalidArgument(
            "labels.templates", f"{quote_all(bad, 3)} lack '{{}}' where the class name goes"
        )
    return LabelSet(names, templates)


def projection_head(loaded: LoadedModel, method: str) -> ClassifierHead:
    """The model's classifier head, or FAILED_PRECONDITION naming the model, the method and
    the cause."""
    head: ClassifierHead = require(loaded.adapter.class_head(), method)
    return head


def _own_classifier(loaded: LoadedModel, labels: LabelSet | None, method: str) -> bool:
    """Whether the model brings its classifier (timm) rather than taking a label set."""
    head = projection_head(loaded, method)
    if isinstance(head, TextClassifier):
        return False
    if labels is not None:
        raise InvalidArgument(
            "labels",
            f"model {loaded.spec.name} has its own classifier; a label set is only "
            "for open_clip towers",
        )
    return True


def class_count(loaded: LoadedModel, labels: LabelSet | None, method: str) -> int:
    """The number of classes a request will project into, known (and the label set validated)
    before any compute: sizes and defaults are settled from it."""
    if _own_classifier(loaded, labels, method):
        return len(loaded.adapter.class_names)
    return len(_checked_labels(labels).class_names)


def class_space_of(
    loaded: LoadedModel, labels: LabelSet | None, cancel: CancelToken, method: str
) -> ClassSpace:
    """The class space requests on this model project into; validates the label set."""
    head = projection_head(loaded, method)
    if _own_classifier(loaded, labels, method):
        assert isinstance(head, LinearClassifier)
        return ClassSpace(
            list(loaded.adapter.class_names), head.weight, head.bias, None, False, 1.0
        )
    assert isinstance(head, TextClassifier)
    checked = _checked_labels(labels)
    text = TEXT_EMBEDDINGS.get(loaded, head, checked, cancel)
    return ClassSpace(
        list(checked.class_names),
        text,
        None,
        head.image_projection(),
        True,
        head.logit_scale(),
        checked.templates,
    )
