"""The web explorer's pages in headless Chromium against the same RPCs called directly.

Run as `HF_HUB_OFFLINE=1 .venv/bin/python bench/explorer.py [--reps N] [--steps S]` (or
`make bench-explorer`). One real server serves the built-in models with the explorer on a
free port. For each page (server, model, unit, image) and each round, the page is loaded in
Debian's chromium (Playwright) and timed from navigation start to its first render (the
heading drawn) and to complete (every section's job finished and drawn); the baseline is the
same RPCs the page makes, through vitscope.Client on the gRPC port, issued concurrently as
the page issues them. Each round uses another unit and another sample image, so that neither
side reads the explorer's cache, and the sides alternate which goes first. The last line
printed is one JSON object: `ratio_page_vs_rpc` (the pages that compute, unit and image: their
total complete seconds over their RPCs' total, medians per page), each page's seconds and
ratios, and `browser_floor_s`, what chromium takes to show a static page of the explorer (the
login form) here. The server and model pages only read (a few milliseconds of RPCs), so their
ratios measure the browser, not the explorer; they are reported but not in the headline ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from explorer_browser import chromium, wait_settled

from vitscope import Client
from vitscope import interventions as iv
from vitscope_server.settings import ServerSettings
from vitscope_server.transport.app import create_server

MODEL = "vitscope-digits"
SITE = "blocks.0.mlp.hidden"
SAMPLES = sorted(
    (Path(__file__).resolve().parents[1] / "client" / "vitscope" / "samples").glob("*.png")
)


# The image page's first ablation: the center patch of the 7 x 7 grid after block 0.
CENTER: dict[str, Any] = {"tokens": "positions", "positions": [(3, 3)]}


def ablate(client: Client, images: list[Path], edit: Any, top_k: int) -> Any:
    """The explorer's ablation sections' request: the plain forward and the edited one."""
    return client.intervene(
        images,
        [iv.variant([]), iv.variant([edit])],
        model=MODEL,
        metric="target_probability",
        top_k=top_k,
    )


def rpc_calls(client: Client, page: str, round_: int, steps: int) -> list[Callable[[], Any]]:
    """The RPCs a page makes for round `round_` (its unit's channel, its sample image)."""
    channel, image = round_, SAMPLES[round_ % len(SAMPLES)]
    if page == "server":
        return [client.server_info, client.list_models, client.health]
    if page == "model":
        return [lambda: client.describe(MODEL), lambda: client.list_inverters(MODEL)]
    if page == "unit":
        return [
            lambda: client.describe(MODEL),
            lambda: client.optimize_features(
                [(SITE, channel)], model=MODEL, steps=steps, progress_every=max(steps // 16, 1)
            ),
            lambda: client.project_memories(0, model=MODEL, kinds=["mlp"], top_k=5),
            lambda: client.activations(
                SAMPLES, [SITE], model=MODEL, reduction="patch_map", channels=[channel]
            ),
            lambda: client.top_activating_images(
                SITE, [channel], images=SAMPLES, model=MODEL, top_k=5
            ),
            lambda: ablate(client, SAMPLES, iv.edit(SITE, "zero", channels=[channel]), 1),
        ]
    depths = list(range(7))
    return [
        lambda: client.activations(
            [image], ["final"], model=MODEL, reduction="mean", top_predictions=5
        ),
        lambda: client.project([image], model=MODEL),
        lambda: client.explain([image], ["rollout", "relevancy"], model=MODEL, faithfulness=True),
        lambda: client.invert([image], depths, model=MODEL),
        lambda: client.describe(MODEL),
        lambda: ablate(client, [image], iv.edit("blocks.0.out", "zero", **CENTER), 5),
    ]


def page_path(page: str, round_: int, steps: int) -> str:
    image = "s-" + SAMPLES[round_ % len(SAMPLES)].stem
    return {
        "server": "/",
        "model": f"/models/{MODEL}",
        "unit": f"/models/{MODEL}/units/{SITE}/{round_}?visualize=1&steps={steps}",
        "image": f"/models/{MODEL}/images/{image}",
    }[page]


def time_rpcs(calls: list[Callable[[], Any]]) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor(len(calls)) as pool:
        for future in [pool.submit(call) for call in calls]:
            future.result()
    return time.perf_counter() - started


def time_page(browser_page: Any, url: str) -> tuple[float, float]:
    """Seconds from navigation start to the first heading and to every section finished."""
    browser_page.goto(url, wait_until="commit")
    browser_page.wait_for_selector("main h1", timeout=600_000)
    first = browser_page.evaluate("performance.now()") / 1000
    wait_settled(browser_page)
    errors = browser_page.eval_on_selector_all(
        "section .error", "(e) => e.map((x) => x.textContent)"
    )
    assert not errors, errors
    return first, browser_page.evaluate("performance.now()") / 1000


COMPUTING_PAGES = ("unit", "image")


def browser_floor(browser_page: Any, base: str) -> float:
    """Seconds for chromium to load and draw the explorer's static login page."""
    browser_page.goto(base + "/login")
    return float(browser_page.evaluate("performance.now()")) / 1000


def summarize(results: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    pages: dict[str, dict[str, float]] = {}
    for page, times in results.items():
        medians = {key: statistics.median(values) for key, values in times.items()}
        pages[page] = {
            "first_render_s": round(medians["first"], 4),
            "complete_s": round(medians["complete"], 4),
            "rpc_s": round(medians["rpc"], 4),
            "ratio": round(medians["complete"] / medians["rpc"], 3),
        }
    page_total = sum(pages[p]["complete_s"] for p in COMPUTING_PAGES)
    rpc_total = sum(pages[p]["rpc_s"] for p in COMPUTING_PAGES)
    return {"ratio_page_vs_rpc": round(page_total / rpc_total, 3), "pages": pages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=32, help="the unit's optimization steps")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    running = create_server(
        ServerSettings(
            host="127.0.0.1", port=0, metrics_port=-1, ui_port=0, torch_threads=args.threads
        )
    )
    assert running.registry.wait_until_settled(timeout=300)
    base = f"http://127.0.0.1:{running.ui_port}"
    pages = ["server", "model", "unit", "image"]
    results: dict[str, dict[str, list[float]]] = {
        p: {"first": [], "complete": [], "rpc": []} for p in pages
    }
    try:
        with Client(f"127.0.0.1:{running.port}", timeout=600) as client, chromium() as browser:
            tab = browser.new_page()
            floors = [browser_floor(tab, base) for _ in range(args.reps + 1)][1:]
            for round_ in range(args.reps + 1):  # round 0 warms up both sides
                for page in pages:
                    calls = rpc_calls(client, page, round_ + 100 * (round_ == 0), args.steps)
                    url = base + page_path(page, round_ + 100 * (round_ == 0), args.steps)
                    if round_ % 2:
                        rpc = time_rpcs(calls)
                        first, complete = time_page(tab, url)
                    else:
                        first, complete = time_page(tab, url)
                        rpc = time_rpcs(calls)
                    if round_:
                        for key, value in zip(
                            ("first", "complete", "rpc"), (first, complete, rpc), strict=True
                        ):
                            results[page][key].append(value)
                    print(
                        f"round {round_} {page:6s} first {first:7.3f} s  complete {complete:7.3f} s  rpc {rpc:7.3f} s",
                        flush=True,
                    )
    finally:
        running.stop(0)
    summary = {"reps": args.reps, "steps": args.steps, **summarize(results)}
    summary["browser_floor_s"] = round(statistics.median(floors), 4)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
