"""The built-in digits models: their committed weights reach the card's accuracy through the RPC."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitscope import Client
from vitscope_server.builtin import (
    DIGITS_GAP_NAME,
    DIGITS_GAP_RANDOM_NAME,
    DIGITS_GAP_WEIGHTS,
    DIGITS_NAME,
    DIGITS_RANDOM_NAME,
    DIGITS_WEIGHTS,
)
from vitscope_server.builtin.digits_data import digits_split

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


def test_served_by_default_with_its_anatomy(client: Client) -> None:
    described = client.describe(DIGITS_NAME)
    assert described.class_names == [str(d) for d in range(10)]
    assert described.input_size == (3, 28, 28) and described.grid == (7, 7)
    assert described.mean == pytest.approx((0.1307,) * 3) and described.std == pytest.approx(
        (0.3081,) * 3
    )
    assert described.block_count >= 4 and described.prefix_token_count == 1
    assert described.info.weights_identity.startswith("sha256:")


@pytest.mark.parametrize(
    ("model", "weights"), [(DIGITS_NAME, DIGITS_WEIGHTS), (DIGITS_GAP_NAME, DIGITS_GAP_WEIGHTS)]
)
def test_committed_weights_reach_the_card_accuracy_through_the_rpc(
    client: Client, model: str, weights: Path
) -> None:
    card_accuracy = float(json.loads(weights.with_suffix(".json").read_text())["test_accuracy"])
    accuracy = _accuracy(client, model)
    assert accuracy >= 0.97
    assert accuracy == pytest.approx(card_accuracy, abs=0.001)


def test_the_gap_twin_pools_patches_without_a_class_token(client: Client) -> None:
    described = client.describe(DIGITS_GAP_NAME)
    assert described.prefix_token_count == 0 and described.grid == (7, 7)


@pytest.mark.parametrize("model", [DIGITS_RANDOM_NAME, DIGITS_GAP_RANDOM_NAME])
def test_random_twins_are_at_chance(client: Client, model: str) -> None:
    assert _accuracy(client, model) < 0.3
