"""The web explorer in a real browser (Playwright driving Debian's headless chromium) against a
real server: every page loads without console errors, shows what the RPCs return for the same
request, its controls work, and bad input shows the RPC's reason and field."""

from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support.browser import CHROMIUM, chromium, pages, wait_settled
from support.servers import start

from vitscope import Client
from vitscope import interventions as iv
from vitscope.errors import VitscopeError
from vitscope_server.transport.app import RunningServer

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium")

MODEL = "vitscope-digits"
SITE = "blocks.0.mlp.hidden"
CHANNEL = 3
SAMPLES = Path(__file__).resolve().parents[2] / "client" / "vitscope" / "samples"
SAMPLE = "s-3-0300"
MAX_PIXELS = 10_000
TIMEOUT_MS = 300_000


@pytest.fixture(scope="module")
def images_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An allowed image root holding a folder of the sample digits."""
    root = tmp_path_factory.mktemp("images")
    (root / "digits").mkdir()
    for sample in SAMPLES.glob("*.png"):
        (root / "digits" / sample.name).write_bytes(sample.read_bytes())
    return root


@pytest.fixture(scope="module")
def explorer(
    tmp_path_factory: pytest.TempPathFactory, images_root: Path
) -> Iterator[RunningServer]:
    running = start(
        tmp_path_factory.mktemp("explorer"),
        models=[],
        default_model=MODEL,
        ui_port=0,
        max_image_pixels=MAX_PIXELS,
        image_roots=[images_root],
    )
    yield running
    running.stop(0)


@pytest.fixture(scope="module")
def rpc(explorer: RunningServer) -> Iterator[Client]:
    with Client(f"127.0.0.1:{explorer.port}", timeout=300) as c:
        yield c


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with chromium() as b:
        yield b


class Visit:
    """A page of the explorer with the console errors it logged."""

    def __init__(self, browser: object, server: RunningServer) -> None:
        self.base = f"http://127.0.0.1:{server.ui_port}"
        self.page = browser.new_page()  # type: ignore[attr-defined]
        self.errors: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def go(self, path: str) -> Visit:
        self.page.goto(self.base + path)
        wait_settled(self.page, TIMEOUT_MS)
        return self

    def values(self, selector: str) -> list[float]:
        return [
            float(v)
            for v in self.page.eval_on_selector_all(
                selector, "(cells) => cells.map((c) => c.dataset.value)"
            )
        ]

    def texts(self, selector: str) -> list[str]:
        return [t.strip() for t in self.page.locator(selector).all_inner_texts()]

    def error(self, section: str) -> dict[str, str]:
        box = self.page.locator(f"#{section} .error")
        box.wait_for(timeout=TIMEOUT_MS)
        return {k: box.get_attribute(f"data-{k}") or "" for k in ("code", "reason", "field")}


@pytest.fixture
def visit(browser: object, explorer: RunningServer) -> Iterator[Visit]:
    v = Visit(browser, explorer)
    yield v
    v.page.close()


def _png(data_url: str) -> np.ndarray:
    raw = base64.b64decode(data_url.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))


def test_server_page_shows_models_versions_health_and_limits(visit: Visit, rpc: Client) -> None:
    visit.go(pages(MODEL)["server"])
    info = rpc.server_info()
    assert visit.page.locator("#health").get_attribute("data-health") == rpc.health() == "SERVING"
    shown = [t.removesuffix(" (default)") for t in visit.texts("#models tbody tr td:first-child")]
    assert shown == [m.name for m in rpc.list_models()]
    assert visit.values("#limits td.num") == list(vars(info.limits).values())
    assert info.server_version in visit.page.locator("#versions").inner_text()
    assert visit.errors == []


def test_model_page_shows_the_anatomy_and_inverters(visit: Visit, rpc: Client) -> None:
    visit.go(pages(MODEL)["model"])
    described = rpc.describe(MODEL)
    anatomy = visit.values("#anatomy td.num")
    assert anatomy == [described.block_count, described.embed_dim, described.prefix_token_count]
    assert visit.texts("#sites tbody tr td:first-child") == list(described.sites)
    stores = visit.texts("#inverters tbody tr td:first-child")
    assert stores == [i.store for i in rpc.list_inverters(MODEL)]
    assert visit.errors == []


def test_unit_page_equals_the_rpcs(visit: Visit, rpc: Client) -> None:
    visit.go(f"/models/{MODEL}/units/{SITE}/{CHANNEL}")
    samples = sorted(SAMPLES.glob("*.png"))
    memories = rpc.project_memories(0, model=MODEL, kinds=["mlp"], top_k=5).memories["mlp"]
    assert visit.values("#class-effects td.num") == pytest.approx(
        memories.top_class_scores[CHANNEL].tolist(), rel=1e-6
    )
    shown = visit.page.eval_on_selector_all(
        "#class-effects span[data-index]", "(s) => s.map((x) => +x.dataset.index)"
    )
    assert shown == memories.top_classes[CHANNEL].tolist()
    values = rpc.activations(
        samples, [SITE], model=MODEL, reduction="patch_map", channels=[CHANNEL]
    )[SITE]
    count, mean, low, high = visit.values("#histogram td.num")
    assert (count, low, high) == (
        values.size,
        pytest.approx(values.min()),
        pytest.approx(values.max()),
    )
    assert mean == pytest.approx(float(values.astype(np.float64).mean()), rel=1e-6)
    top = rpc.top_activating_images(SITE, [CHANNEL], images=samples, model=MODEL, top_k=5)
    tiles = visit.page.locator("#top-images .top-image")
    assert [
        int(i) for i in [tiles.nth(n).get_attribute("data-index") for n in range(tiles.count())]
    ] == [t.index for t in top.channels[CHANNEL]]
    scores = [
        float(tiles.nth(n).get_attribute("data-score") or "nan") for n in range(tiles.count())
    ]
    assert scores == pytest.approx([t.score for t in top.channels[CHANNEL]], rel=1e-6)
    zeroed = iv.edit(SITE, "zero", channels=[CHANNEL])
    base, ablated = _base_and_ablated(rpc, samples, zeroed, top_k=1).variants
    shown = np.array(visit.values("#ablation td.num")).reshape(len(samples), 3)
    assert shown[:, 0] == pytest.approx(base.metric.tolist(), rel=1e-6)  # type: ignore[union-attr]
    assert shown[:, 1] == pytest.approx(ablated.metric.tolist(), rel=1e-6)  # type: ignore[union-attr]
    # Independently: without edits, the target's probability is the plain prediction's.
    plain = rpc.activations(samples, ["final"], model=MODEL, reduction="mean", top_predictions=1)
    assert shown[:, 0] == pytest.approx([p[0].probability for p in plain.predictions], rel=1e-5)
    assert visit.errors == []


def _base_and_ablated(
    rpc: Client, images: list[Path], edit: object, top_k: int = 5
) -> iv.Intervention:
    """The explorer's ablation request through the RPC: no edit, then the edit."""
    return rpc.intervene(
        images,
        [iv.variant([]), iv.variant([edit])],  # type: ignore[list-item]
        model=MODEL,
        metric="target_probability",
        top_k=top_k,
    )


def _shown_ablation(visit: Visit, rpc: Client, edit: object) -> None:
    """The image page's ablation section equals Intervene's answer for the same edit."""
    base, ablated = _base_and_ablated(rpc, [SAMPLES / "3-0300.png"], edit).variants
    before, after, change = visit.values("#ablation table.target td.num")
    assert (before, after) == (
        pytest.approx(float(base.metric[0]), rel=1e-6),  # type: ignore[index]
        pytest.approx(float(ablated.metric[0]), rel=1e-6),  # type: ignore[index]
    )
    assert change == pytest.approx(after - before, abs=1e-9)
    for cls, outcome in (("base", base), ("ablated", ablated)):
        ranked = outcome.predictions[0]
        assert visit.values(f"#ablation .{cls} td.num") == pytest.approx(
            [p["probability"] for p in ranked], rel=1e-6
        )
        shown = visit.page.eval_on_selector_all(
            f"#ablation .{cls} span[data-index]", "(s) => s.map((x) => +x.dataset.index)"
        )
        assert shown == [p["class_index"] for p in ranked]


def _click_and_wait(visit: Visit, selector: str, what: str) -> None:
    visit.page.click(selector)
    visit.page.wait_for_function(
        """(what) => { const s = document.querySelector('#ablation');
            return s.dataset.state === 'done' && s.querySelector('.body p').textContent.includes(what); }""",
        arg=what,
        timeout=TIMEOUT_MS,
    )


def test_clicking_a_patch_or_a_head_shows_its_ablation(visit: Visit, rpc: Client) -> None:
    visit.go(f"/models/{MODEL}/images/{SAMPLE}")
    # The default: the center patch after the first block.
    rows, columns = rpc.describe(MODEL).grid
    center = (rows // 2, columns // 2)
    _shown_ablation(
        visit, rpc, iv.edit("blocks.0.out", "zero", tokens="positions", positions=[center])
    )
    visit.page.select_option("#ablation-block", "2")
    _click_and_wait(visit, "#patch-grid button[data-row='1'][data-column='2']", "patch (1, 2)")
    _shown_ablation(
        visit, rpc, iv.edit("blocks.2.out", "zero", tokens="positions", positions=[(1, 2)])
    )
    _click_and_wait(visit, "#heads button[data-block='3'][data-head='1']", "head 1 of block 3")
    _shown_ablation(visit, rpc, iv.edit("blocks.3.attn.heads", "zero", heads=[1]))
    assert visit.errors == []


def test_a_head_out_of_range_shows_the_rpc_reason_and_field(visit: Visit, rpc: Client) -> None:
    visit.go(f"/models/{MODEL}/images/{SAMPLE}")
    # The page offers only the model's heads: send one past them as a script would.
    visit.page.eval_on_selector(
        "#heads button[data-block='1'][data-head='0']", "(b) => { b.dataset.head = '99'; }"
    )
    visit.page.click("#heads button[data-block='1'][data-head='99']")
    error = _rpc_error(
        lambda: _base_and_ablated(
            rpc, [SAMPLES / "3-0300.png"], iv.edit("blocks.1.attn.heads", "zero", heads=[99])
        )
    )
    _same(visit.error("ablation"), error)
    assert (error.reason, error.metadata["field"]) == (
        "INVALID_FIELD",
        "variants[1].edits[0].selection.heads[0]",
    )
    # Neither a head nor a patch: the endpoint names the field.
    url = f"{visit.base}/api/models/{MODEL}/images/{SAMPLE}/ablation?block=1"
    request = urllib.request.Request(url, method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 400
    assert json.load(refused.value)["error"]["field"] == "head"


def _heatmaps(visit: Visit) -> np.ndarray:
    values = visit.page.eval_on_selector_all(
        "#patching rect.cell", "(cells) => cells.map((c) => c.dataset.value)"
    )
    return np.array([np.nan if v == "null" else float(v) for v in values])


def _shown_patching(visit: Visit, rpc: Client, source: Path) -> None:
    sweep = rpc.patching_sweep([SAMPLES / "3-0300.png"], [source], model=MODEL)
    assert sweep.normalized is not None
    np.testing.assert_allclose(_heatmaps(visit), sweep.normalized[0].ravel(), rtol=1e-6)
    blocks = visit.page.eval_on_selector_all(
        "#patching .tile[data-block]", "(t) => t.map((x) => +x.dataset.block)"
    )
    assert blocks == list(range(rpc.describe(MODEL).block_count))
    assert visit.values("#patching table.metrics td.num") == pytest.approx(
        [float(sweep.base_metric[0]), float(sweep.source_metric[0])],  # type: ignore[index]
        rel=1e-6,
    )


def test_a_patching_source_can_be_uploaded(visit: Visit, rpc: Client, tmp_path: Path) -> None:
    source = tmp_path / "eight.jpg"
    Image.open(SAMPLES / "8-0800.png").convert("RGB").save(source, quality=95)
    visit.go(f"/models/{MODEL}/images/{SAMPLE}")
    assert visit.page.locator("#patching").get_attribute("data-state") is None
    visit.page.set_input_files("#patching-upload", str(source))
    visit.page.wait_for_function(
        "() => document.querySelector('#patching-source').value.startsWith('u-')",
        timeout=TIMEOUT_MS,
    )
    visit.page.click("#patching button.start")
    visit.page.wait_for_selector("#patching[data-state=done]", timeout=TIMEOUT_MS)
    _shown_patching(visit, rpc, source)
    assert visit.errors == []


def test_cancelling_a_patching_sweep_stops_the_server_work(
    visit: Visit, explorer: RunningServer
) -> None:
    # Small batches: many progress messages, each a point where the sweep polls its token.
    # The sweep starts with the page (?source=): no waiting for the page to settle.
    visit.page.goto(
        f"{visit.base}/models/{MODEL}/images/{SAMPLE}?source=s-1-0100&variants_per_forward=2"
    )
    visit.page.wait_for_function(
        "() => document.querySelector('#patching progress').value > 0", timeout=TIMEOUT_MS
    )
    visit.page.click("#patching button.cancel")
    visit.page.wait_for_selector("#patching[data-state=cancelled]", timeout=TIMEOUT_MS)
    assert visit.error("patching")["reason"] == "CANCELLED"
    wait_settled(visit.page, TIMEOUT_MS)  # the page's other sections, started with it
    assert explorer._slots.free == explorer._slots.max_running
    assert visit.errors == []


def test_top_images_over_an_allowed_folder_equal_the_rpc(
    visit: Visit, rpc: Client, images_root: Path
) -> None:
    visit.go(f"/models/{MODEL}/units/{SITE}/{CHANNEL}")
    visit.page.fill("#folder", str(images_root / "digits"))
    visit.page.click("#folder-form button")
    visit.page.wait_for_url("**folder=*")
    wait_settled(visit.page, TIMEOUT_MS)
    top = rpc.top_activating_images(
        SITE, [CHANNEL], image_folder=str(images_root / "digits"), model=MODEL, top_k=5
    )
    tiles = visit.page.locator("#top-images .top-image")
    names = [tiles.nth(n).get_attribute("data-name") for n in range(tiles.count())]
    assert names == [t.path for t in top.channels[CHANNEL]]
    scores = [
        float(tiles.nth(n).get_attribute("data-score") or "nan") for n in range(tiles.count())
    ]
    assert scores == pytest.approx([t.score for t in top.channels[CHANNEL]], rel=1e-6)
    assert visit.errors == []
    # A folder outside the allowed roots: the RPC's refusal, reason and field.
    outside = str(images_root.parent)
    visit.go(f"/models/{MODEL}/units/{SITE}/{CHANNEL}?folder={outside}")
    error = _rpc_error(
        lambda: rpc.top_activating_images(SITE, [CHANNEL], image_folder=outside, model=MODEL)
    )
    _same(visit.error("top-images"), error)
    assert error.reason == "FOLDER_NOT_ALLOWED"


def test_a_visualization_starts_shows_progress_and_equals_the_rpc(
    visit: Visit, rpc: Client
) -> None:
    steps = 4
    visit.go(f"/models/{MODEL}/units/{SITE}/{CHANNEL}?steps={steps}")
    assert visit.page.locator("#visualization").get_attribute("data-state") is None
    visit.page.click("#visualization button.start")
    visit.page.wait_for_selector("#visualization[data-state=done]", timeout=TIMEOUT_MS)
    shown = _png(visit.page.locator("#optimized").get_attribute("src") or "")
    result = rpc.optimize_features([(SITE, CHANNEL)], model=MODEL, steps=steps, progress_every=1)
    expected = np.asarray(result.features[0].image.convert("RGB"))
    assert np.abs(shown.astype(int) - expected.astype(int)).max() <= 1
    assert visit.values("#visualization td.num")[0] == pytest.approx(
        result.features[0].objective, rel=1e-4
    )
    assert visit.errors == []


def test_cancelling_a_visualization_stops_the_server_work(
    visit: Visit, explorer: RunningServer
) -> None:
    visit.go(f"/models/{MODEL}/units/{SITE}/{CHANNEL + 1}?steps=4096")
    visit.page.click("#visualization button.start")
    # Progress arrives only from the running optimization, so the work is under way.
    visit.page.wait_for_function(
        "() => document.querySelector('#visualization progress').value > 0", timeout=TIMEOUT_MS
    )
    visit.page.click("#visualization button.cancel")
    visit.page.wait_for_selector("#visualization[data-state=cancelled]", timeout=TIMEOUT_MS)
    assert visit.error("visualization")["reason"] == "CANCELLED"
    # The compute slot came back: the optimization loop stopped, not just the page.
    assert explorer._slots.free == explorer._slots.max_running
    assert visit.errors == []


def test_picking_a_unit_opens_its_page(visit: Visit) -> None:
    visit.go(pages(MODEL)["model"])
    visit.page.select_option("#site", "blocks.2.out")
    visit.page.fill("#channel", "7")
    visit.page.click("#unit-picker button")
    visit.page.wait_for_url(f"**/models/{MODEL}/units/blocks.2.out/7")
    wait_settled(visit.page, TIMEOUT_MS)
    assert visit.page.locator("#histogram").get_attribute("data-state") == "done"
    assert visit.errors == []


def test_image_page_equals_the_rpcs(visit: Visit, rpc: Client) -> None:
    visit.go(pages(MODEL)["image"])
    image = SAMPLES / "3-0300.png"
    predicted = rpc.activations(
        [image], ["final"], model=MODEL, reduction="mean", top_predictions=5
    )
    assert visit.values("#predictions td.num") == pytest.approx(
        [p.probability for p in predicted.predictions[0]], rel=1e-6
    )
    projected = rpc.project([image], model=MODEL).images[0]
    identifiable = visit.values("#identifiability td.num")[0::2]
    assert identifiable == pytest.approx(
        [b.get("identifiable_patch_percent", 0.0) for b in projected.blocks], rel=1e-6
    )
    explained = rpc.explain(
        [image], ["rollout", "relevancy"], model=MODEL, faithfulness=True
    ).images[0]
    aucs = visit.values("#explanations td.num")
    expected = [
        a
        for m in explained.maps.values()
        for a in (m.faithfulness.deletion.auc, m.faithfulness.insertion.auc)
    ]  # type: ignore[union-attr]
    assert aucs == pytest.approx(expected, rel=1e-6)
    depths = rpc.list_inverters(MODEL)[0].max_depth
    inverted = rpc.invert([image], list(range(depths + 1)), model=MODEL)
    strip = visit.page.locator("#inversion .depth")
    assert strip.count() == depths + 1
    mses = [float(strip.nth(n).get_attribute("data-mse") or "nan") for n in range(depths + 1)]
    assert mses == pytest.approx([inverted[d].mse[0] for d in range(depths + 1)], rel=1e-5)  # type: ignore[index]
    _shown_patching(visit, rpc, SAMPLES / "8-0800.png")
    assert visit.errors == []


def _upload(visit: Visit, path: Path) -> None:
    visit.go(pages(MODEL)["model"])
    visit.page.set_input_files("#upload", str(path))
    visit.page.wait_for_url("**/images/u-*")
    wait_settled(visit.page, TIMEOUT_MS)


def test_an_uploaded_image_gets_its_page(visit: Visit, rpc: Client, tmp_path: Path) -> None:
    path = tmp_path / "seven.jpg"
    Image.open(SAMPLES / "7-0700.png").convert("RGB").save(path, quality=95)
    _upload(visit, path)
    predicted = rpc.activations([path], ["final"], model=MODEL, reduction="mean", top_predictions=5)
    assert visit.values("#predictions td.num") == pytest.approx(
        [p.probability for p in predicted.predictions[0]], rel=1e-6
    )
    assert visit.errors == []


def _rpc_error(call: object) -> VitscopeError:
    with pytest.raises(VitscopeError) as caught:
        call()  # type: ignore[operator]
    return caught.value


def _same(shown: dict[str, str], error: VitscopeError) -> None:
    assert shown["reason"] == error.reason
    assert shown["field"] == error.metadata.get("field", "")


def test_bad_input_shows_the_rpc_reason_and_field(
    visit: Visit, rpc: Client, tmp_path: Path, explorer: RunningServer
) -> None:
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_bytes(b"these are not pixels")
    _upload(visit, not_an_image)
    error = _rpc_error(
        lambda: rpc.activations([not_an_image], ["final"], model=MODEL, top_predictions=5)
    )
    _same(visit.error("predictions"), error)
    assert error.reason == "IMAGE_UNDECODABLE"

    large = tmp_path / "large.png"
    Image.new("RGB", (200, 200), "white").save(large)
    _upload(visit, large)
    error = _rpc_error(lambda: rpc.activations([large], ["final"], model=MODEL, top_predictions=5))
    _same(visit.error("predictions"), error)
    assert error.reason == "IMAGE_TOO_LARGE"

    visit.go(f"/models/{MODEL}/units/blocks.99.nowhere/0")
    error = _rpc_error(
        lambda: rpc.activations(
            [SAMPLES / "3-0300.png"],
            ["blocks.99.nowhere"],
            model=MODEL,
            reduction="patch_map",
            channels=[0],
        )
    )
    _same(visit.error("histogram"), error)
    assert error.reason == "SITE_NOT_FOUND"

    # The server keeps serving, through the pages and the RPCs.
    visit.go(pages(MODEL)["server"])
    assert visit.page.locator("#health").get_attribute("data-health") == "SERVING"
    assert rpc.health() == "SERVING"


def _status(url: str, headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def test_the_token_protects_pages_and_endpoints(browser: object, tmp_path: Path) -> None:
    running = start(tmp_path, models=[], default_model=MODEL, ui_port=0, auth_token="s3cret")
    try:
        base = f"http://127.0.0.1:{running.ui_port}"
        assert _status(base + "/api/server") == 401
        assert _status(base + "/openapi.json") == 401
        assert _status(base + "/api/server", {"Authorization": "Bearer s3cret"}) == 200
        page = browser.new_page()  # type: ignore[attr-defined]
        page.goto(base + f"/models/{MODEL}")
        assert "/login" in page.url
        page.fill("input[name=token]", "wrong")
        page.click("button[type=submit]")
        page.wait_for_url(lambda url: "/login" in url and "failed=1" in url)
        page.fill("input[name=token]", "s3cret")
        page.click("button[type=submit]")
        page.wait_for_url(f"**/models/{MODEL}")
        wait_settled(page, TIMEOUT_MS)
        assert page.locator("#anatomy").count() == 1
        page.close()
    finally:
        running.stop(0)


def test_the_openapi_schema_lists_the_endpoints(explorer: RunningServer) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{explorer.ui_port}/openapi.json") as r:
        schema = json.load(r)
    assert {
        "/api/server",
        "/api/models/{model}",
        "/api/models/{model}/units/{site}/{channel}/{analysis}",
        "/api/models/{model}/images/{image}/{analysis}",
        "/api/jobs/{job}",
    } <= set(schema["paths"])


SAE = "resid3-topk"
LATENT_SITE = f"blocks.3.out@sae:{SAE}"


def _sample_images() -> list[Path]:
    """The samples in the explorer's order (sorted by file name)."""
    return sorted(SAMPLES.glob("*.png"), key=lambda p: p.name)


def _latent_statistics(rpc: Client, width: int) -> dict[str, np.ndarray]:
    """Each latent's firing frequency, mean and max over the sample patches, from the RPC."""
    values = rpc.activations(
        _sample_images(),
        [LATENT_SITE],
        model=MODEL,
        reduction="patch_map",
        channels=list(range(width)),
    )[LATENT_SITE].astype(np.float64)
    per_latent = np.moveaxis(values, 1, 0).reshape(width, -1)
    return {
        "frequency": (per_latent > 0).mean(axis=1),
        "mean": per_latent.mean(axis=1),
        "max": per_latent.max(axis=1),
    }


def _shown_latents(visit: Visit) -> list[int]:
    return [
        int(v)
        for v in visit.page.eval_on_selector_all(
            "#latents tr.latent", "(rows) => rows.map((r) => r.dataset.latent)"
        )
    ]


def _expected_order(statistics: dict[str, np.ndarray], column: str) -> list[int]:
    """Largest first, ties by latent index, as the page sorts."""
    values = statistics[column]
    return sorted(range(len(values)), key=lambda i: (-values[i], i))


def test_model_page_lists_the_saes_and_links_each(visit: Visit, rpc: Client) -> None:
    visit.go(pages(MODEL)["model"])
    saes = rpc.describe(MODEL).saes
    assert SAE in saes
    assert visit.texts("#saes tbody tr td:first-child") == list(saes)
    row = visit.page.locator("#saes tbody tr").first
    sae = saes[SAE]
    cells = [c.strip() for c in row.locator("td").all_inner_texts()]
    assert cells[1] == sae["site"] and cells[3] == sae["kind"]
    shown = [
        None if v == "null" else float(v)
        for v in row.locator("td.num").evaluate_all("(cells) => cells.map((c) => c.dataset.value)")
    ]
    recorded = sae.get("metrics", {})
    expected = [sae["width"]] + [
        recorded.get(k) for k in ("fvu", "explained_variance", "l0", "dead_fraction")
    ]
    assert shown == pytest.approx(expected, rel=1e-9)
    row.locator("a").click()
    visit.page.wait_for_url(f"**/models/{MODEL}/saes/{SAE}")
    wait_settled(visit.page, TIMEOUT_MS)
    assert visit.errors == []


def test_sae_page_equals_evaluate_sae_and_the_latent_activations(visit: Visit, rpc: Client) -> None:
    visit.go(pages(MODEL)["sae"])
    evaluation = rpc.evaluate_sae(_sample_images(), SAE, model=MODEL)
    names = visit.texts("#quality .metric")
    assert names == [
        "images",
        "tokens",
        "fvu",
        "explained_variance",
        "l0",
        "dead_fraction",
        "dense_fraction",
    ]
    assert visit.values("#quality td.num") == pytest.approx(
        [getattr(evaluation, n) for n in names], rel=1e-5, abs=1e-9
    )
    assert evaluation.splice is not None
    splice = visit.texts("#splice .metric")
    assert visit.values("#splice td.num") == pytest.approx(
        [evaluation.splice[n] for n in splice], rel=1e-5, abs=1e-9
    )
    bars = visit.page.eval_on_selector_all(
        "#evaluation rect.bar", "(bars) => bars.map((b) => +b.dataset.count)"
    )
    assert bars == evaluation.histogram_counts

    width = rpc.describe(MODEL).saes[SAE]["width"]
    statistics = _latent_statistics(rpc, width)
    order = _expected_order(statistics, "frequency")
    assert _shown_latents(visit) == order[:32]
    shown = np.array(visit.values("#latents td.num")).reshape(-1, 3)
    for column, values in zip(("frequency", "mean", "max"), shown.T, strict=True):
        assert values == pytest.approx(statistics[column][order[:32]], rel=1e-6, abs=1e-9)

    visit.page.click("#latents button.sort[data-column=mean]")
    assert _shown_latents(visit) == _expected_order(statistics, "mean")[:32]
    visit.page.click("#latents button.next")
    assert _shown_latents(visit) == _expected_order(statistics, "mean")[32:64]
    assert visit.errors == []


def test_a_latent_link_opens_its_unit_page(visit: Visit, rpc: Client) -> None:
    visit.go(pages(MODEL)["sae"])
    latent = _shown_latents(visit)[0]
    visit.page.click(f"#latents tr.latent[data-latent='{latent}'] a")
    visit.page.wait_for_url(f"**/units/**/{latent}")
    wait_settled(visit.page, TIMEOUT_MS)
    values = rpc.activations(
        _sample_images(), [LATENT_SITE], model=MODEL, reduction="patch_map", channels=[latent]
    )[LATENT_SITE]
    count, mean, _, high = visit.values("#histogram td.num")
    assert (count, high) == (values.size, pytest.approx(values.max()))
    assert mean == pytest.approx(float(values.astype(np.float64).mean()), rel=1e-6)
    top = rpc.top_activating_images(
        LATENT_SITE, [latent], images=_sample_images(), model=MODEL, top_k=5
    )
    tiles = visit.page.locator("#top-images .top-image")
    assert [int(tiles.nth(n).get_attribute("data-index") or -1) for n in range(tiles.count())] == [
        t.index for t in top.channels[latent]
    ]
    assert "blocks.{i}.mlp.hidden" in visit.page.locator("#class-effects .body").inner_text()
    visit.page.click("#visualization button.start")
    wait_settled(visit.page, TIMEOUT_MS)
    assert visit.page.locator("#visualization").get_attribute("data-state") == "done"
    assert visit.page.locator("#optimized").is_visible()
    assert visit.errors == []


def test_an_unknown_sae_shows_the_rpc_reason_and_field(visit: Visit, rpc: Client) -> None:
    visit.go(f"/models/{MODEL}/saes/no-such-sae")
    error = _rpc_error(lambda: rpc.evaluate_sae(_sample_images()[:1], "no-such-sae", model=MODEL))
    assert (error.reason, error.metadata.get("field")) == ("SITE_NOT_FOUND", "sae")
    _same(visit.error("evaluation"), error)
    _same(visit.error("latents"), error)
    assert "no-such-sae" in visit.page.locator("#sae-info").inner_text()
    visit.go(pages(MODEL)["server"])
    assert visit.page.locator("#health").get_attribute("data-health") == "SERVING"
    assert rpc.health() == "SERVING"
