"""The built-in digits model: its committed weights reach the card's accuracy through the RPC."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from vitscope import Client
from vitscope_server.builtin import DIGITS_NAME, DIGITS_RANDOM_NAME, DIGITS_WEIGHTS
from vitscope_server.train_classifier import digits_split

BATCH = 64


def _png(digit: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(digit).save(buffer, format="PNG")
    return buffer.getvalue()


def _accuracy(client: Client, model: str) -> float:
    _, _, images, labels = digits_split()
    correct = 0
    for start in range(0, len(images), BATCH):
        batch = [_png(d) for d in images[start : start + BATCH]]
        result = client.activations(batch, [], model=model, top_predictions=1)
        predicted = [int(top[0].class_name) for top in result.predictions]
        correct += int((np.asarray(predicted) == labels[start : start + BATCH]).sum())
    return correct / len(images)


@pytest.fixture(scope="module")
def card_accuracy() -> float:
    metrics = json.loads(DIGITS_WEIGHTS.with_suffix(".json").read_text())
    return float(metrics["test_accuracy"])


def test_served_by_default_with_its_anatomy(client: Client) -> None:
    described = client.describe(DIGITS_NAME)
    assert described.class_names == [str(d) for d in range(10)]
    assert described.input_size == (3, 28, 28) and described.grid == (7, 7)
    assert described.mean == pytest.approx((0.1307,) * 3) and described.std == pytest.approx(
        (0.3081,) * 3
    )
    assert described.num_blocks >= 4 and described.num_prefix_tokens == 1
    assert described.info.weights_identity.startswith("sha256:")


def test_committed_weights_reach_the_card_accuracy_through_the_rpc(
    client: Client, card_accuracy: float
) -> None:
    accuracy = _accuracy(client, DIGITS_NAME)
    assert accuracy >= 0.97
    assert accuracy == pytest.approx(card_accuracy, abs=0.001)


def test_random_twin_is_at_chance(client: Client) -> None:
    assert _accuracy(client, DIGITS_RANDOM_NAME) < 0.3
