"""The demo end to end against a real server, on the built-in model, run as the image runs it
(only the image's packages importable)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support.image_env import run_in_image

from vitscope.figures import sample_digits
from vitscope_server.builtin import builtin_default_name
from vitscope_server.transport.app import RunningServer


# Every RPC family on one CPU: minutes on a loaded machine.
@pytest.mark.timeout(900)
def test_demo_writes_pictures_and_an_index(server: RunningServer, tmp_path: Path) -> None:
    out = tmp_path / "demo"
    argv = ["--target", f"127.0.0.1:{server.port}", "demo", "--out", str(out)]
    run_in_image("vitscope", [[*argv, "--model", builtin_default_name()]], tmp_path, timeout=850)
    page = (out / "index.html").read_text()
    pictures = sorted(out.glob("*.png"))
    assert pictures
    for picture in pictures:
        assert picture.name in page
        pixels = np.asarray(Image.open(picture))
        assert pixels.std() > 10, f"{picture.name} is nearly blank"
    assert "<figcaption>" in page


def test_sample_digits_are_labelled_test_digits() -> None:
    digits = sample_digits()
    assert [name[0] for name, _ in digits] == [str(d) for d in range(10)]
    assert all(image.size == (28, 28) for _, image in digits)
