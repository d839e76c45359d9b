"""Headless Chromium for the explorer's tests (the launch lives in tools/explorer_browser.py,
which the benchmark and the demo use too)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

from explorer_browser import CHROMIUM, chromium, pages, wait_settled

__all__ = ["CHROMIUM", "chromium", "pages", "wait_settled"]
