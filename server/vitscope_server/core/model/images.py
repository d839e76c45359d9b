"""Caller images -> one preprocessed batch on the model's device."""

from __future__ import annotations

import io
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from vitscope_server.core.model.adapters import ModelAdapter
from vitscope_server.core.runtime.errors import InvalidArgument, Reason, ResourceExhausted
from vitscope_server.core.runtime.intra_op import host_thread
from vitscope_server.core.runtime.stages import Stage, StageTimes

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")


@dataclass(frozen=True)
class ImageInput:
    """Exactly one source is set: encoded bytes, uint8 pixels, or a preprocessed float tensor."""

    encoded: bytes | None = None
    pixels: np.ndarray | None = None
    preprocessed: np.ndarray | None = None


def _undecodable(field: str, exc: Exception) -> InvalidArgument:
    return InvalidArgument(
        field,
        f"cannot decode image ({str(exc)[:200]}); allowed formats: {ALLOWED_FORMATS}",
        reason=Reason.IMAGE_UNDECODABLE,
    )


def _too_large(field: str, message: str) -> ResourceExhausted:
    return ResourceExhausted(f"{field}: {message}", reason=Reason.IMAGE_TOO_LARGE, field=field)


def open_header(data: bytes, field: str) -> Image.Image:
    """The image with only its header read (size, mode, format); no pixel is decoded yet."""
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise _too_large(field, f"image too large to decode ({exc})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise _undecodable(field, exc) from None
    if image.format not in ALLOWED_FORMATS:
        raise InvalidArgument(
            field, f"format {image.format} not allowed; allowed: {ALLOWED_FORMATS}"
        )
    return image


def check_size(adapter: ModelAdapter, width: int, height: int, field: str, max_pixels: int) -> None:
    """Both the image and what the model's resize makes of it stay within max_pixels."""
    if width * height > max_pixels:
        raise _too_large(
            field,
            f"{width}x{height} pixels exceeds the limit of {max_pixels} pixels (max_image_pixels)",
        )
    if width == 0 or height == 0:
        raise InvalidArgument(field, f"the image is {width}x{height}, empty")
    resized = adapter.preprocess_peak_pixels(width, height)
    if resized > max_pixels:
        raise _too_large(
            field,
            f"the model's resize would turn this {width}x{height} image into {resized} pixels, "
            f"over the limit of {max_pixels} (max_image_pixels); send an image with a less "
            "extreme aspect ratio",
        )


def _decode(adapter: ModelAdapter, data: bytes, field: str, max_pixels: int) -> Image.Image:
    """Reads the header first: the limits are checked before any pixel is decoded."""
    image = open_header(data, field)
    check_size(adapter, image.width, image.height, field, max_pixels)
    try:
        image.load()
        return image.convert("RGB")
    except Image.DecompressionBombError as exc:
        raise _too_large(field, f"image too large to decode ({exc})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise _undecodable(field, exc) from None


def _from_pixels(
    adapter: ModelAdapter, pixels: np.ndarray, field: str, max_pixels: int
) -> Image.Image:
    if pixels.dtype != np.uint8:
        raise InvalidArgument(field, f"pixels must be uint8, got {pixels.dtype}")
    if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] not in (1, 3)):
        raise InvalidArgument(
            field, f"pixels shape {list(pixels.shape)}; allowed: [H, W], [H, W, 1], [H, W, 3]"
        )
    check_size(adapter, pixels.shape[1], pixels.shape[0], field, max_pixels)
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


def _input_tensor(
    adapter: ModelAdapter, image: ImageInput, field: str, max_pixels: int, stages: StageTimes
) -> torch.Tensor:
    """One image through decoding and the model's transform."""
    if image.preprocessed is not None:
        with stages.timing(Stage.PREPROCESS):
            return _from_preprocessed(image.preprocessed, f"{field}.preprocessed", adapter)
    with stages.timing(Stage.DECODE):
        if image.pixels is not None:
            picture = _from_pixels(adapter, image.pixels, f"{field}.pixels", max_pixels)
        elif image.encoded is not None:
            picture = _decode(adapter, image.encoded, f"{field}.encoded", max_pixels)
        else:
            raise InvalidArgument(
                field,
                "no source set; set encoded, pixels or preprocessed",
                reason=Reason.FIELD_REQUIRED,
            )
    with stages.timing(Stage.PREPROCESS):
        return adapter.preprocess(picture)


# Pillow and the transforms release the GIL for most of their work, so the images of one
# request decode side by side; each decoding thread runs torch with one intra-op thread.
_DECODERS = ThreadPoolExecutor(
    max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="decode", initializer=host_thread
)


def _input_tensors(
    adapter: ModelAdapter,
    images: Sequence[ImageInput],
    names: Sequence[str],
    max_pixels: int,
    stages: StageTimes,
) -> list[torch.Tensor]:
    """Every image's tensor in order; several decode in parallel, and the first failing image
    in order is the error. The stages get the wall time, shared out by each stage's work."""
    if len(images) == 1:
        return [_input_tensor(adapter, images[0], names[0], max_pixels, stages)]
    started = time.perf_counter()
    work = [StageTimes() for _ in images]
    futures = [
        _DECODERS.submit(_input_tensor, adapter, image, name, max_pixels, times)
        for image, name, times in zip(images, names, work, strict=True)
    ]
    tensors = [future.result() for future in futures]
    wall = time.perf_counter() - started
    total = StageTimes()
    for times in work:
        total.update(times)
    busy = sum(total.seconds.values()) or 1.0
    for stage, seconds in total.seconds.items():
        stages.add(stage, wall * seconds / busy)
    return tensors


def prepare_batch(
    adapter: ModelAdapter,
    images: list[ImageInput],
    max_batch: int,
    max_pixels: int,
    fields: Sequence[str] | None = None,
    stages: StageTimes | None = None,
) -> torch.Tensor:
    """Applies the model's own transform to each image and stacks them. Errors name image i
    as fields[i] (by default images[i]), so callers feeding parts of a larger whole can name
    the file or the position in that whole. `stages` gets the decode and preprocess times."""
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
    tensors = _input_tensors(adapter, images, names, max_pixels, stages or StageTimes())
    return torch.stack(tensors)
