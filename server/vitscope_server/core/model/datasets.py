"""Image datasets the batch jobs read, and how an Indexed Job splits them into shards.

A dataset is an image folder (its files sorted by relative path) or a built-in digits split;
the scan and the activation extraction read it the same way, so a name means one item list.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vitscope_server.core.model.image_folders import list_images, read_image
from vitscope_server.core.model.images import ImageInput
from vitscope_server.core.runtime.errors import InvalidArgument, NotFound, Reason

# The built-in digits' 1,000 held-out test images, and their 4,000 training images.
BUILTIN_DIGITS = "builtin-digits"
BUILTIN_DIGITS_TRAIN = "builtin-digits-train"


@dataclass(frozen=True)
class Shard:
    index: int
    count: int


def parse_shard(text: str) -> Shard:
    """'I/N' with 0 <= I < N (a Kubernetes Indexed Job's completion index over its completions)."""
    index, _, count = text.partition("/")
    try:
        shard = Shard(int(index), int(count))
    except ValueError:
        raise InvalidArgument("--shard", f"{text!r} is not I/N") from None
    if not 0 <= shard.index < shard.count:
        raise InvalidArgument("--shard", f"{text!r} needs 0 <= I < N")
    return shard


def shard_range(total: int, shard: Shard) -> range:
    """The shard's contiguous slice of the sorted item list."""
    return range(shard.index * total // shard.count, (shard.index + 1) * total // shard.count)


def _digits(train: bool) -> tuple[list[str], Callable[[int], ImageInput]]:
    from vitscope_server.builtin.digits_data import digits_split

    train_images, train_labels, test_images, test_labels = digits_split()
    images, labels = (train_images, train_labels) if train else (test_images, test_labels)
    names = [f"{int(label)}-{i:04d}" for i, label in enumerate(labels)]
    return names, lambda i: ImageInput(pixels=images[i])


def dataset(data: str) -> tuple[list[str], Callable[[int], ImageInput]]:
    """Item names in order and a loader by index: a built-in digits split, or the images
    under a folder sorted by relative path."""
    if data in (BUILTIN_DIGITS, BUILTIN_DIGITS_TRAIN):
        return _digits(data == BUILTIN_DIGITS_TRAIN)
    folder = Path(data)
    if not folder.is_dir():
        raise NotFound(
            Reason.DATA_NOT_FOUND,
            data,
            f"--data: {data!r} is neither a folder nor {BUILTIN_DIGITS!r} or "
            f"{BUILTIN_DIGITS_TRAIN!r}",
            field="--data",
        )
    files = list_images(folder)
    return [name for name, _ in files], lambda i: read_image(*files[i])


def dataset_labels(data: str) -> list[int] | None:
    """The class of each item of a built-in digits split; None for folders (no labels)."""
    if data not in (BUILTIN_DIGITS, BUILTIN_DIGITS_TRAIN):
        return None
    from vitscope_server.builtin.digits_data import digits_split

    _, train_labels, _, test_labels = digits_split()
    labels = train_labels if data == BUILTIN_DIGITS_TRAIN else test_labels
    return [int(label) for label in labels]


def item_list_digest(names: list[str]) -> str:
    """sha256 of the item names in order: two datasets with one digest list the same items."""
    return "sha256:" + hashlib.sha256("\n".join(names).encode()).hexdigest()
