"""EvaluateSae: a served SAE's quality on images (METHODS §6), batch by batch.

Per batch, one clean forward reads the SAE's site (its tokens feed the streaming quality:
FVU, L0, dead and dense latents) and the clean logits; one forward with the reconstruction
spliced into the site and one with the site zero-ablated give the splicing metrics: top-1
agreement with the clean model, KL(clean ‖ spliced), and the loss recovered
`(L_zero − L_sae) / (L_zero − L_clean)`, each loss the cross-entropy of the model's own
logits against the given labels or, without labels, the clean model's top-1 class.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from vitscope_server.core.model.capture import capture_sites, read_site
from vitscope_server.core.model.images import ImageInput, prepare_batch
from vitscope_server.core.model.loading import LoadedModel
from vitscope_server.core.model.provenance import Provenance, provenance_of
from vitscope_server.core.model.sae import SaeInfo, SaeOutput, ServedSae
from vitscope_server.core.model.sites import resolve_site
from vitscope_server.core.model.splice import replaced_site
from vitscope_server.core.runtime.cancel import CancelToken
from vitscope_server.core.runtime.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Reason,
    quote,
    require_in_range,
)
from vitscope_server.core.sae.quality import QualityAccumulator, QualityReport

MAX_EVALUATION_BATCH = 256


@dataclass(frozen=True)
class EvaluationQuery:
    sae: str
    # One class per image for the losses; empty: the clean model's top-1 class.
    labels: tuple[int, ...] = ()
    batch: int = 32
    # Only the reconstruction quality: no spliced forwards (models without a classifier).
    quality_only: bool = False


@dataclass(frozen=True)
class SpliceReport:
    top1_agreement: float
    kl_clean_spliced: float
    loss_clean: float
    loss_spliced: float
    loss_zero: float
    labels: str  # "given" or "clean_top1"

    @property
    def loss_recovered(self) -> float:
        gap = self.loss_zero - self.loss_clean
        return (self.loss_zero - self.loss_spliced) / gap if gap else float("nan")


@dataclass(frozen=True)
class EvaluationProgress:
    images_done: int
    images_total: int


@dataclass(frozen=True)
class SaeEvaluation:
    provenance: Provenance
    sae: SaeInfo
    images: int
    quality: QualityReport
    splice: SpliceReport | None


class _SpliceTotals:
    """float64 sums over images of the splicing metrics."""

    def __init__(self) -> None:
        self.agree = 0
        self.kl = 0.0
        self.losses = {"clean": 0.0, "spliced": 0.0, "zero": 0.0}
        self.count = 0

    def add(
        self, clean: torch.Tensor, spliced: torch.Tensor, zero: torch.Tensor, labels: torch.Tensor
    ) -> None:
        logp = {
            name: t.double().log_softmax(dim=-1)
            for name, t in (("clean", clean), ("spliced", spliced), ("zero", zero))
        }
        self.agree += int((clean.argmax(dim=-1) == spliced.argmax(dim=-1)).sum())
        self.kl += float((logp["clean"].exp() * (logp["clean"] - logp["spliced"])).sum())
        for name, values in logp.items():
            self.losses[name] -= float(values.gather(1, labels[:, None]).sum())
        self.count += clean.shape[0]

    def report(self, labels: str) -> SpliceReport:
        n = max(self.count, 1)
        return SpliceReport(
            self.agree / n,
            self.kl / n,
            self.losses["clean"] / n,
            self.losses["spliced"] / n,
            self.losses["zero"] / n,
            labels,
        )


def served(loaded: LoadedModel, name: str) -> ServedSae:
    sae = loaded.adapter.saes.get(name)
    if sae is None:
        raise NotFound(
            Reason.SITE_NOT_FOUND,
            name,
            f"sae: model {loaded.spec.name} serves no SAE {quote(name)}; its SAEs: "
            f"{sorted(loaded.adapter.saes)}",
            field="sae",
            metadata={"model": loaded.spec.name},
        )
    return sae


def check_query(loaded: LoadedModel, query: EvaluationQuery, images: int) -> None:
    served(loaded, query.sae)
    if not 1 <= query.batch <= MAX_EVALUATION_BATCH:
        raise InvalidArgument("batch", f"must be in 1..{MAX_EVALUATION_BATCH}, got {query.batch}")
    if images == 0:
        raise InvalidArgument(
            "images", "at least one image is required", reason=Reason.FIELD_REQUIRED
        )
    if not query.quality_only and not loaded.adapter.has_classifier:
        raise FailedPrecondition(
            f"quality_only: model {loaded.spec.name} has no classifier to splice against; "
            "set quality_only",
            reason=Reason.NO_CLASSIFIER,
            subject=loaded.spec.name,
            field="quality_only",
        )
    if query.labels:
        if len(query.labels) != images:
            raise InvalidArgument(
                "labels", f"one per image: {images} images, {len(query.labels)} labels"
            )
        require_in_range("labels", query.labels, 0, len(loaded.adapter.class_names) - 1)


def _batch(
    loaded: LoadedModel,
    sae: ServedSae,
    pixels: torch.Tensor,
    labels: torch.Tensor | None,
    quality: QualityAccumulator,
    splice: _SpliceTotals | None,
    cancel: CancelToken,
) -> None:
    adapter = loaded.adapter
    site = resolve_site(adapter, sae.info.site)
    with torch.inference_mode():
        if splice is None:
            tokens = read_site(adapter, site, pixels, cancel)
        else:
            with capture_sites(adapter, [site], pixels.shape[0], cancel) as captured:
                clean = adapter.forward(pixels)
            tokens = captured[site.name]
        flat = tokens.reshape(-1, tokens.shape[-1]).float()
        codes = sae.module.encode(flat)
        quality.add(flat, codes, sae.module.decode(codes))
        if splice is None:
            return
        with replaced_site(adapter, site, lambda x: sae.module.read(x, SaeOutput.RECON)):
            spliced = adapter.forward(pixels)
        with replaced_site(adapter, site, torch.zeros_like):
            zero = adapter.forward(pixels)
        targets = clean.argmax(dim=-1) if labels is None else labels.to(clean.device)
        splice.add(clean, spliced, zero, targets)


def evaluate_sae(
    loaded: LoadedModel,
    images: Sequence[ImageInput],
    query: EvaluationQuery,
    max_pixels: int,
    cancel: CancelToken,
) -> Iterator[EvaluationProgress | SaeEvaluation]:
    """Progress after every batch, then the evaluation."""
    check_query(loaded, query, len(images))
    sae = served(loaded, query.sae)
    quality = QualityAccumulator(sae.info.d_in, sae.info.d_sae)
    splice = None if query.quality_only else _SpliceTotals()
    for start in range(0, len(images), query.batch):
        chunk = images[start : start + query.batch]
        fields = [f"images[{start + i}]" for i in range(len(chunk))]
        pixels = prepare_batch(loaded.adapter, list(chunk), len(chunk), max_pixels, fields)
        labels = torch.tensor(query.labels[start : start + len(chunk)]) if query.labels else None
        cancel.raise_if_cancelled()
        _batch(loaded, sae, pixels.to(loaded.device), labels, quality, splice, cancel)
        yield EvaluationProgress(start + len(chunk), len(images))
    report = None if splice is None else splice.report("given" if query.labels else "clean_top1")
    yield SaeEvaluation(provenance_of(loaded), sae.info, len(images), quality.report(), report)


def evaluation_json(result: SaeEvaluation) -> dict[str, object]:
    """The evaluation as JSON-ready values (the evaluate-sae command, the built-in SAE's card)."""
    quality = result.quality
    document: dict[str, object] = {
        "model": result.provenance.model,
        "weights_identity": result.provenance.weights_identity,
        "sae": result.sae.name,
        "site": result.sae.site,
        "images": result.images,
        **quality.metrics(),
        "histogram_edges": list(quality.histogram_edges),
        "histogram_counts": list(quality.histogram_counts),
    }
    splice = result.splice
    if splice is not None:
        document["splice"] = {
            "top1_agreement": splice.top1_agreement,
            "kl_clean_spliced": splice.kl_clean_spliced,
            "loss_clean": splice.loss_clean,
            "loss_spliced": splice.loss_spliced,
            "loss_zero_ablated": splice.loss_zero,
            "loss_recovered": splice.loss_recovered,
            "labels": splice.labels,
        }
    return document
