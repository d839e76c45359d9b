"""GetActivations and TopActivatingImages: convert, call the core, convert back."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import grpc

from vitscope.v1 import activations_pb2
from vitscope.v1 import activations_pb2 as apb
from vitscope_server.core.activations.estimate import scan_batch_bytes
from vitscope_server.core.activations.top_images import ScanItem, TopImageScan, file_items
from vitscope_server.core.model.image_folders import allowed_folder, list_images
from vitscope_server.core.runtime.errors import InvalidArgument, Reason
from vitscope_server.transport import convert, convert_activations
from vitscope_server.transport.cancellation import cancel_token
from vitscope_server.transport.compute import (
    computing,
    record_batched,
    timed_messages,
    unary_response_budget,
)
from vitscope_server.transport.progress import sends_after_compute
from vitscope_server.transport.state import ServicerState


class ActivationRpcs(ServicerState):
    """Mixed into the Inspector servicer."""

    # Chunks are yielded pre-serialized.
    @sends_after_compute
    def GetActivations(
        self, request: activations_pb2.GetActivationsRequest, context: grpc.ServicerContext
    ) -> Iterator[activations_pb2.GetActivationsResponse | bytes]:
        loaded = self._registry.get(request.model)
        images = convert.image_inputs(list(request.images))
        query = convert_activations.activation_query(request)
        model = loaded.spec.name
        with self._activation_service.serve(loaded, images, [query], cancel_token(context)) as (
            served
        ):
            record_batched(self._metrics, "GetActivations", model, served.info)
            try:
                messages = convert_activations.activation_responses(
                    served.results[0], self._chunk_bytes
                )
                yield from timed_messages(messages, served.stages)
            finally:
                self._metrics.record_stages("GetActivations", model, served.stages)

    def TopActivatingImages(
        self, requests: Iterator[apb.TopActivatingImagesRequest], context: grpc.ServicerContext
    ) -> apb.TopActivatingImagesResponse:
        first = next(requests, None)
        if first is None:
            raise InvalidArgument(
                "requests",
                "the request stream is empty; the first message names the site",
                reason=Reason.FIELD_REQUIRED,
            )
        loaded = self._registry.get(first.model)
        scan = TopImageScan(loaded, convert_activations.scan_query(first))
        if not first.image_folder:
            scan.require_result_within(unary_response_budget(self._max_message_bytes, self._limits))
        cancel = cancel_token(context)
        labels = ("TopActivatingImages", loaded.spec.name)

        def score(items: list[ScanItem]) -> None:
            images = [item.image for item in items]
            fields = [item.field for item in items]
            need = scan_batch_bytes(loaded.adapter, images, fields, self._limits.max_pixels)
            with self._budget.reserve(need, cancel):
                pixels = scan.prepare(items, self._limits.max_pixels)
                with computing(self._slots, self._metrics, cancel, *labels) as slot:
                    slot.run(lambda: scan.add(pixels, items, cancel))

        batch = self._limits.max_batch
        streamed: Iterator[apb.TopActivatingImagesRequest] = itertools.chain([first], requests)
        if first.image_folder:
            _require_no_images(streamed)
            files = list_images(allowed_folder(first.image_folder, self._image_roots))
            longest = max((len(name.encode()) for name, _ in files), default=0)
            scan.require_result_within(
                unary_response_budget(self._max_message_bytes, self._limits), longest
            )
            for start in range(0, len(files), batch):
                score(file_items(files[start : start + batch], start))
        index = 0
        for request in streamed:  # read to its end already when a folder was scanned
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
        return convert_activations.top_images_response(scan.result())


def _require_no_images(requests: Iterator[apb.TopActivatingImagesRequest]) -> None:
    """A folder scan takes no streamed images: the stream is read to its end, and refused at
    the first message that carries any, before the folder is scanned."""
    for number, request in enumerate(requests):
        if request.images:
            raise InvalidArgument(
                f"requests[{number}].images", "not allowed together with image_folder"
            )
