"""Folders of images on the server: which may be read, what they hold, and their bytes."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from vitscope_server.core.model.images import ImageInput
from vitscope_server.core.runtime.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Reason,
    quote,
)

# The file suffixes every folder of images is listed by (scans, and anything else that reads
# a folder through list_images): exactly the formats images.ALLOWED_FORMATS decodes.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def allowed_folder(folder: str, roots: Sequence[Path]) -> Path:
    """The folder, resolved, when it lies inside an allowed root; symlinks and '..' are resolved
    first so nothing outside the roots can be named."""
    if not roots:
        raise PermissionDenied(
            "image_folder: this server allows no image folders (the operator sets --image-roots)",
            field="image_folder",
        )
    resolved = Path(os.path.realpath(folder))
    for root in roots:
        real_root = Path(os.path.realpath(root))
        if resolved == real_root or resolved.is_relative_to(real_root):
            if not resolved.is_dir():
                raise NotFound(
                    Reason.FOLDER_NOT_FOUND,
                    folder,
                    f"image_folder: {quote(folder)} is not a folder",
                    field="image_folder",
                )
            return resolved
    raise PermissionDenied(
        f"image_folder: {quote(folder)} is outside the server's allowed image roots",
        field="image_folder",
    )


def list_images(folder: Path) -> list[tuple[str, Path]]:
    """(relative path, file) of every file under folder with one of IMAGE_SUFFIXES (any case),
    sorted by relative path (the order shards split); files whose real location leaves the
    folder (symlinks) are skipped."""
    real = Path(os.path.realpath(folder))
    found = []
    for path in folder.rglob("*"):
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        if not Path(os.path.realpath(path)).is_relative_to(real):
            continue
        found.append((path.relative_to(folder).as_posix(), path))
    return sorted(found)


def read_image(name: str, path: Path) -> ImageInput:
    """The file's bytes; a file that vanished or cannot be read is the caller's error,
    named by its path in the folder."""
    try:
        return ImageInput(encoded=path.read_bytes())
    except OSError as exc:
        raise InvalidArgument(
            "image_folder", f"file {name!r} cannot be read ({exc.strerror or exc})"
        ) from None
