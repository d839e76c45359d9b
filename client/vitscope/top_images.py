"""Top activating images on the client: dataclasses and their parsing (no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from google.protobuf.json_format import MessageToDict

from vitscope import tensors as wire
from vitscope.v1 import activations_pb2 as apb


@dataclass(frozen=True)
class TopImage:
    index: int
    path: str
    score: float
    patch_map: np.ndarray


@dataclass(frozen=True)
class TopImages:
    site: str
    top_k: int
    scanned_image_count: int
    channels: dict[int, list[TopImage]] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)


def parse_top_images(message: apb.TopActivatingImagesResponse) -> TopImages:
    return TopImages(
        site=message.site,
        top_k=message.top_k,
        scanned_image_count=message.scanned_image_count,
        channels={
            c.channel: [
                TopImage(t.index, t.path, t.score, wire.from_proto(t.patch_map)) for t in c.images
            ]
            for c in message.channels
        },
        provenance=MessageToDict(message.provenance, preserving_proto_field_name=True),
    )
