"""Writes the client's demo digits: the first held-out test digit of each class, as PNG.

Run `make samples` (`python tools/export_samples.py`) after changing the split.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from vitscope_server.builtin.digits_data import digits_split

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "client" / "vitscope" / "samples"


def export(out: Path) -> list[Path]:
    _, _, test_images, test_labels = digits_split()
    written = []
    for digit in range(10):
        index = int((test_labels == digit).nonzero()[0][0])
        path = out / f"{digit}-{index:04d}.png"
        Image.fromarray(test_images[index]).save(path)
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    for path in export(parser.parse_args().out):
        print(path.name)


if __name__ == "__main__":
    main()
