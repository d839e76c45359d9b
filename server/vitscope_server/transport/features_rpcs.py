"""OptimizeFeatures and TopActivatingImages: convert, call the core, convert back."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc

from vitscope.v1 import features_pb2 as fpb
from vitscope_server.core.activations import ActivationLimits
from vitscope_server.core.budget import MemoryBudget, backward_bytes, forward_bytes, images_bytes
from vitscope_server.core.errors import InvalidArgument, Reason
from vitscope_server.core.features import optimize_features, prepare_optimization
from vitscope_server.core.registry import ModelRegistry
from vitscope_server.core.slots import ComputeSlots
from vitscope_server.core.top_images import (
    ScanItem,
    TopImageScan,
    allowed_folder,
    file_items,
    list_images,
)
from vitscope_server.transport import convert, convert_features
from vitscope_server.transport.cancellation import cancel_token
from vitscope_server.transport.compute import computing
from vitscope_server.transport.metrics import Metrics
from vitscope_server.transport.progress import Progress

# Room in a response for what is not counted up front: provenance, names, framing.
RESPONSE_HEADROOM_BYTES = 16 << 10


class FeatureRpcs:
    """Mixed into the Inspector servicer, which provides these attributes."""

    _registry: ModelRegistry
    _slots: ComputeSlots
    _metrics: Metrics
    _limits: ActivationLimits
    _image_roots: Sequence[Path]
    _max_message_bytes: int
    _budget: MemoryBudget

    def _response_budget(self) -> int:
        """The bytes one unary response may carry: under the max message size and the
        server's result limit."""
        return min(self._max_message_bytes - RESPONSE_HEADROOM_BYTES, self._limits.max_result_bytes)

    def OptimizeFeatures(
        self, request: fpb.OptimizeFeaturesRequest, context: grpc.ServicerContext
    ) -> Iterator[fpb.OptimizeFeaturesResponse | Progress]:
        loaded = self._registry.get(request.model)
        prepared = prepare_optimization(
            loaded,
            convert_features.feature_specs(request),
            convert_features.optimization_params(request),
            self._limits.max_batch,
            self._limits.max_pixels,
            self._response_budget(),
        )
        cancel = cancel_token(context)
        labels = ("OptimizeFeatures", loaded.spec.name)
        steps = self._metrics.optimization_steps.labels(*labels)
        params = prepared.params
        batch = len(prepared.features) * params.copies
        need = backward_bytes(loaded.adapter, batch, params.image_size**2)
        with (
            self._budget.reserve(need, cancel),
            computing(self._slots, self._metrics, cancel, *labels) as slot,
        ):
            events = optimize_features(prepared, cancel, steps.inc)
            for event in slot.steps(events):
                response = convert_features.optimization_response(event)
                yield Progress(response) if response.HasField("progress") else response

    def TopActivatingImages(
        self, requests: Iterator[fpb.TopActivatingImagesRequest], context: grpc.ServicerContext
    ) -> fpb.TopActivatingImagesResponse:
        first = next(requests, None)
        if first is None:
            raise InvalidArgument(
                "requests",
                "the request stream is empty; the first message names the site",
                reason=Reason.FIELD_REQUIRED,
            )
        loaded = self._registry.get(first.model)
        scan = TopImageScan(loaded, convert_features.scan_query(first))
        if not first.image_folder:
            scan.require_result_within(self._response_budget())
        cancel = cancel_token(context)
        labels = ("TopActivatingImages", loaded.spec.name)

        def score(items: list[ScanItem]) -> None:
            images = [item.image for item in items]
            adapter = loaded.adapter
            fields = [item.field for item in items]
            need = images_bytes(adapter, images, self._limits.max_pixels, fields) + forward_bytes(
                adapter, len(items), 1
            )
            with self._budget.reserve(need, cancel):
                pixels = scan.prepare(items, self._limits.max_pixels)
                with computing(self._slots, self._metrics, cancel, *labels) as slot:
                    slot.run(lambda: scan.add(pixels, items, cancel))

        batch = self._limits.max_batch
        if first.image_folder:
            if first.images:
                raise InvalidArgument(
                    "requests[0].images", "not allowed together with image_folder"
                )
            files = list_images(allowed_folder(first.image_folder, self._image_roots))
            longest = max((len(name.encode()) for name, _ in files), default=0)
            scan.require_result_within(self._response_budget(), longest)
            for start in range(0, len(files), batch):
                score(file_items(files[start : start + batch], start))
        index = 0
        for number, request in enumerate(itertools.chain([first], requests)):
            if request.images and first.image_folder:
                raise InvalidArgument(
                    f"requests[{number}].images", "not allowed together with image_folder"
                )
            images = convert.image_inputs(list(request.images))
            for start in range(0, len(images), batch):
                part = images[start : start + batch]
                score([ScanItem(index + i, "", image) for i, image in enumerate(part)])
                index += len(part)
        if scan.scanned == 0:
            raise InvalidArgument(
                "images",
                "no images were streamed and no image_folder was named",
                reason=Reason.FIELD_REQUIRED,
            )
        return convert_features.top_images_response(scan.result())
