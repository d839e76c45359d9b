"""Caller images -> one preprocessed batch on the model's device."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from vitscope_server.core.adapters import ModelAdapter
from vitscope_server.core.errors import InvalidArgument, Reason, ResourceExhausted

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")


@dataclass(frozen=True)
class ImageInput:
    """Exactly one source is set: encoded bytes, uint8 pixels, or a preprocessed float tensor."""

    encoded: bytes | None = None
    pixels: np.ndarray | None = None
    preprocessed: np.ndarray | None = None


def _decode(data: bytes, field: str, max_pixels: int) -> Image.Image:
    """Reads the header first: the pixel limit is checked before any pixel is decoded."""
    try:
        image = Image.open(io.BytesIO(data))
        if image.format not in ALLOWED_FORMATS:
            raise InvalidArgument(
                field, f"format {image.format} not allowed; allowed: {ALLOWED_FORMATS}"
            )
        if image.width * image.height > max_pixels:
            raise ResourceExhausted(
                f"{field}: {image.width}x{image.height} pixels exceeds the limit of {max_pixels} pixels",
                reason=Reason.IMAGE_TOO_LARGE,
                field=field,
            )
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InvalidArgument(
            field,
            f"cannot decode image ({exc}); allowed formats: {ALLOWED_FORMATS}",
            reason=Reason.IMAGE_UNDECODABLE,
        ) from None
    except Image.DecompressionBombError as exc:
        raise ResourceExhausted(
            f"{field}: image too large to decode ({exc})",
            reason=Reason.IMAGE_TOO_LARGE,
            field=field,
        ) from None
    return image.convert("RGB")


def _from_pixels(pixels: np.ndarray, field: str, max_pixels: int) -> Image.Image:
    if pixels.dtype != np.uint8:
        raise InvalidArgument(field, f"pixels must be uint8, got {pixels.dtype}")
    if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] not in (1, 3)):
        raise InvalidArgument(
            field, f"pixels shape {list(pixels.shape)}; allowed: [H, W], [H, W, 1], [H, W, 3]"
        )
    if pixels.shape[0] * pixels.shape[1] > max_pixels:
        raise ResourceExhausted(
            f"{field}: {pixels.shape[0]}x{pixels.shape[1]} pixels exceeds {max_pixels}",
            reason=Reason.IMAGE_TOO_LARGE,
            field=field,
        )
    if pixels.shape[0] == 0 or pixels.shape[1] == 0:
        raise InvalidArgument(field, f"pixels shape {list(pixels.shape)} is empty")
    squeezed = pixels[..., 0] if pixels.ndim == 3 and pixels.shape[2] == 1 else pixels
    return Image.fromarray(np.ascontiguousarray(squeezed)).convert("RGB")


def _from_preprocessed(array: np.ndarray, field: str, adapter: ModelAdapter) -> torch.Tensor:
    expected = list(adapter.data_config.input_size)
    if array.dtype not in (np.float32, np.float16):
        raise InvalidArgument(
            field, f"preprocessed tensor must be float32 or float16, got {array.dtype}"
        )
    if list(array.shape) != expected:
        raise InvalidArgument(
            field, f"preprocessed shape {list(array.shape)}; model expects {expected}"
        )
    if not np.isfinite(array).all():
        raise InvalidArgument(field, "preprocessed tensor contains NaN or infinity")
    return torch.from_numpy(np.array(array, dtype=np.float32))


def prepare_batch(
    adapter: ModelAdapter,
    images: list[ImageInput],
    max_batch: int,
    max_pixels: int,
    fields: Sequence[str] | None = None,
) -> torch.Tensor:
    """Applies the model's own transform to each image and stacks them. Errors name image i
    as fields[i] (by default images[i]), so callers feeding parts of a larger whole can name
    the file or the position in that whole."""
    if not images:
        raise InvalidArgument(
            "images", "at least one image is required", reason=Reason.FIELD_REQUIRED
        )
    if len(images) > max_batch:
        raise ResourceExhausted(
            f"images: {len(images)} images exceeds the limit of {max_batch} per request",
            reason=Reason.BATCH_TOO_LARGE,
            field="images",
        )
    names = fields if fields is not None else [f"images[{i}]" for i in range(len(images))]
    tensors = []
    for image, field in zip(images, names, strict=True):
        if image.preprocessed is not None:
            tensors.append(_from_preprocessed(image.preprocessed, f"{field}.preprocessed", adapter))
        elif image.pixels is not None:
            tensors.append(
                adapter.preprocess(_from_pixels(image.pixels, f"{field}.pixels", max_pixels))
            )
        elif image.encoded is not None:
            tensors.append(
                adapter.preprocess(_decode(image.encoded, f"{field}.encoded", max_pixels))
            )
        else:
            raise InvalidArgument(
                field,
                "no source set; set encoded, pixels or preprocessed",
                reason=Reason.FIELD_REQUIRED,
            )
    return torch.stack(tensors)
