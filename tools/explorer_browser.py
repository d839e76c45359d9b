"""Headless Chromium for the web explorer: how to launch Debian's chromium through
Playwright, the explorer's pages, and screenshots of each (`make demo` runs this).

Usage: python tools/explorer_browser.py --url http://localhost:8080 --out demo-out/explorer
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

from playwright.sync_api import Browser, Page, sync_playwright

# Playwright cannot download its own browser here: it drives the distribution's.
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SETTLED = ("done", "failed", "cancelled")
# The built-in model's SAE, and one of its latents that fires often on the samples.
SAE, SAE_SITE, SAE_LATENT = "resid3-topk", "blocks.3.out", 406


@contextmanager
def chromium() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def pages(model: str, site: str = "blocks.0.mlp.hidden", channel: int = 3) -> dict[str, str]:
    """Each page of the explorer by name: its path for the model, one unit, one sample, the
    built-in SAE and one of its latents."""
    base = f"/models/{quote(model, safe='')}"
    return {
        "server": "/",
        "model": base,
        "unit": f"{base}/units/{quote(site, safe='')}/{channel}?visualize=1&steps=32",
        "image": f"{base}/images/s-3-0300?source=s-8-0800",
        "sae": f"{base}/saes/{SAE}",
        "latent": f"{base}/units/{quote(f'{SAE_SITE}@sae:{SAE}', safe='')}/{SAE_LATENT}"
        "?visualize=1&steps=32",
    }


def wait_settled(page: Page, timeout_ms: float = 600_000) -> None:
    """Waits until the page has rendered and every job section has finished."""
    page.wait_for_function(
        """(settled) => !document.querySelector('main > p.muted') &&
            [...document.querySelectorAll('section[data-state]')]
              .every((s) => settled.includes(s.dataset.state) || s.querySelector('button.start:not([disabled])'))""",
        arg=list(SETTLED),
        timeout=timeout_ms,
    )


def screenshots(url: str, out: Path, model: str) -> dict[str, str]:
    """A full-page PNG of every page into `out`; returns page name -> file name."""
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        for name, path in pages(model).items():
            page.goto(url.rstrip("/") + path)
            wait_settled(page)
            file = out / f"explorer-{name}.png"
            page.screenshot(path=str(file), full_page=True)
            written[name] = file.name
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://localhost:8080")
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    parser.add_argument("--model", default="vitscope-digits")
    args = parser.parse_args()
    print(json.dumps(screenshots(args.url, args.out, args.model)))


if __name__ == "__main__":
    main()
