"""The images the pages look at: the client package's built-in samples and uploads, kept in
memory by content digest so that an image's page has a stable URL while the server runs."""

from __future__ import annotations

import hashlib
import io
import threading
from collections import OrderedDict
from dataclasses import dataclass
from importlib import resources

from PIL import Image

from vitscope_server.core.runtime import errors

SAMPLE_PREFIX = "s-"
UPLOAD_PREFIX = "u-"
UPLOADS_BYTES = 64 << 20


@dataclass(frozen=True)
class StoredImage:
    id: str
    data: bytes

    @property
    def media_type(self) -> str:
        """The type its first bytes say, so that a browser shows it; uploads are unchecked."""
        if self.data.startswith(b"\x89PNG"):
            return "image/png"
        if self.data.startswith(b"\xff\xd8"):
            return "image/jpeg"
        if self.data[:4] == b"RIFF" and self.data[8:12] == b"WEBP":
            return "image/webp"
        return "application/octet-stream"

    def picture(self) -> Image.Image:
        return Image.open(io.BytesIO(self.data)).convert("RGB")


def _samples() -> dict[str, StoredImage]:
    folder = resources.files("vitscope") / "samples"
    found = {}
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".png"):
            sample_id = SAMPLE_PREFIX + entry.name.removesuffix(".png")
            found[sample_id] = StoredImage(sample_id, entry.read_bytes())
    return found


class ImageStore:
    """Samples, and uploads up to `capacity` bytes (the oldest are forgotten first). An upload
    is kept as sent: decoding and its limits are the RPCs' to check."""

    def __init__(self, max_upload_bytes: int, capacity: int = UPLOADS_BYTES) -> None:
        self.samples = _samples()
        self._max_upload = max_upload_bytes
        self._capacity = capacity
        self._uploads: OrderedDict[str, StoredImage] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, data: bytes) -> StoredImage:
        if not data:
            raise errors.InvalidArgument(
                "image", "the upload is empty", reason=errors.Reason.FIELD_REQUIRED
            )
        if len(data) > self._max_upload:
            raise errors.ResourceExhausted(
                f"image: {len(data)} bytes; an upload may have at most {self._max_upload} "
                "(max_message_bytes)",
                reason=errors.Reason.IMAGE_TOO_LARGE,
                field="image",
            )
        image = StoredImage(UPLOAD_PREFIX + hashlib.sha256(data).hexdigest()[:16], data)
        with self._lock:
            self._uploads[image.id] = image
            self._uploads.move_to_end(image.id)
            while sum(len(i.data) for i in self._uploads.values()) > self._capacity:
                self._uploads.popitem(last=False)
        return image

    def get(self, image_id: str) -> StoredImage:
        with self._lock:
            found = self.samples.get(image_id) or self._uploads.get(image_id)
        if found is None:
            raise errors.NotFound(
                errors.Reason.DATA_NOT_FOUND,
                image_id,
                f"image {errors.quote(image_id)}: not a sample and not uploaded since the "
                "server started",
                field="image",
            )
        return found
