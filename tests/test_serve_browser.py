"""``digitlens serve``'s page as a person uses it, in headless Chromium (Debian's ``chromium``
driven by Playwright, as test_browser.py does for the report): draw a stroke with the mouse, see
every model's prediction and maps, undo and clear, browse a confusion-matrix cell, open an image
in the drawing pad, upload a file; no console errors, no request outside the app."""

from __future__ import annotations

import base64

import pytest
from serve_runs import small_runs

from digitlens.report.browser import CHROMIUM_ARGS, find_chromium

pytestmark = pytest.mark.browser

if find_chromium() is None:
    pytest.skip("chromium not installed (apt-get install chromium); .ci/run installs it", allow_module_level=True)
pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install -e '.[test]')")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """A served app, a page on it and the lists of console errors and outside requests."""
    import httpx
    from playwright.sync_api import sync_playwright

    from digitlens.serve import create_app
    from digitlens.serve.app import background_server

    runs = small_runs(tmp_path_factory)
    seen = {"errors": [], "outside": []}
    with background_server(create_app(runs), timeout=30) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=find_chromium(), args=list(CHROMIUM_ARGS))
        try:
            page = browser.new_page(viewport={"width": 1366, "height": 900})
            page.set_default_timeout(TIMEOUT_MS)
            page.on("console", lambda msg: seen["errors"].append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda exc: seen["errors"].append(str(exc)))
            page.on("request", lambda req: seen["outside"].append(req.url)
                    if not req.url.startswith((url + "/", "data:", "blob:")) else None)
            page.goto(url + "/", wait_until="load")
            page.wait_for_selector("#confusion button")
            with httpx.Client(base_url=url, timeout=30) as api:
                yield page, api, seen
        finally:
            browser.close()


def stroke(page, points):
    box = page.locator("#pad").bounding_box()
    page.mouse.move(box["x"] + points[0][0], box["y"] + points[0][1])
    page.mouse.down()
    for x, y in points[1:]:
        page.mouse.move(box["x"] + x, box["y"] + y, steps=10)
    page.mouse.up()


def shown_predictions(page) -> list[int]:
    return [int(t) for t in page.locator(".model-card .prediction").all_inner_texts()]


def settle(page):
    """Wait until no prediction is in flight or scheduled (the debounce is 120 ms)."""
    page.wait_for_timeout(400)
    page.wait_for_function("() => !state.inFlight && !state.again")


def api_predictions(page, api) -> list[int]:
    """What the API answers for the pad's current PNG: the oracle for what the page shows."""
    png = base64.b64decode(page.evaluate("() => pad.toDataURL('image/png')").split(",", 1)[1])
    answer = api.post("/api/predict", content=png, headers={"Content-Type": "image/png"}).json()
    return [m["prediction"] for m in answer["models"]]


@pytest.mark.slow
def test_draw_see_undo_clear(session):
    page, api, seen = session
    box = page.locator("#pad").bounding_box()
    page.mouse.move(box["x"] + 140, box["y"] + 40)
    page.mouse.down()
    page.mouse.move(box["x"] + 140, box["y"] + 120, steps=10)
    page.wait_for_selector(".model-card .heatmap")  # predicted while the button is still down
    page.mouse.move(box["x"] + 142, box["y"] + 240, steps=10)  # a vertical stroke: a 1
    page.mouse.up()
    settle(page)
    assert page.locator(".model-card").count() == 2
    assert shown_predictions(page) == api_predictions(page, api)
    # the CNN's maps: the default three, each drawn with colour over the grey input
    cnn = page.locator('.model-card[data-model="cnn"]')
    assert cnn.locator("figcaption").all_inner_texts()[1:] == ["saliency", "integrated gradients", "Grad-CAM"]
    coloured = page.evaluate("""() => Array.from(document.querySelectorAll('.model-card .heatmap')).map(c => {
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0;
        for (let i = 0; i < d.length; i += 4) if (Math.abs(d[i] - d[i + 2]) > 40) n++; return n; })""")
    vit = page.locator('.model-card[data-model="vit"]')  # Grad-CAM is checked for the CNN: the ViT's is on its patch embedding
    assert vit.locator("figcaption").all_inner_texts()[1:] == ["saliency", "integrated gradients", "Grad-CAM",
                                                               "attention rollout"]
    assert len(coloured) == 7 and min(coloured) > 0
    assert page.locator("#steps figure").count() == 5  # greyscale, polarity, crop, 20x20 fit, centred
    first = page.locator("#steps img").first.evaluate("img => img.complete && img.naturalWidth > 0")
    assert first

    stroke(page, [(100, 60), (180, 60)])  # a bar across the top: now a 7 or a T
    settle(page)
    with_bar = api_predictions(page, api)
    assert shown_predictions(page) == with_bar
    page.click("#undo")
    settle(page)
    assert shown_predictions(page) == api_predictions(page, api)  # the stroke is gone again

    page.click("#clear")
    page.wait_for_function("() => document.querySelectorAll('.model-card').length === 0")
    assert page.evaluate("""() => { const d = pad.getContext('2d').getImageData(0, 0, 280, 280).data;
        for (let i = 0; i < d.length; i += 4) if (d[i] > 0) return false; return true; }""")
    assert seen["errors"] == [] and seen["outside"] == []


@pytest.mark.slow
def test_confusion_cell_lists_images_and_opens_one(session):
    page, api, seen = session
    page.select_option("#run-select", "vit")  # the untrained ViT: mistakes in many cells
    cells = page.eval_on_selector_all("#confusion button",
                                      "bs => bs.map(b => [+b.dataset.true, +b.dataset.pred, +b.textContent])")
    assert len(cells) == 100
    true, pred, count = max((c for c in cells if c[0] != c[1]), key=lambda c: c[2])
    page.click(f'#confusion button[data-true="{true}"][data-pred="{pred}"]')
    page.wait_for_selector("#gallery .thumb")
    expected = api.get(f"/api/runs/vit/cell?true={true}&pred={pred}&limit=60").json()
    assert page.locator("#gallery .thumb").count() == min(count, 60) == len(expected["items"])
    assert f"true {true}, predicted {pred}: {count} images" in page.inner_text("#gallery-title")
    captions = page.locator("#gallery .thumb div").all_inner_texts()
    assert captions[0].startswith(f"#{expected['items'][0]['index']} ")

    page.locator("#gallery .thumb").first.click()  # into the drawing pad, predicted at once
    page.wait_for_selector(".model-card .heatmap")
    settle(page)
    assert shown_predictions(page) == api_predictions(page, api)

    page.click("#disagree")
    page.wait_for_function("() => document.getElementById('gallery-title').textContent.includes('disagree')")
    total = api.get("/api/disagreements?a=cnn&b=vit").json()["total"]
    assert page.locator("#gallery .thumb").count() == min(total, 60)
    assert seen["errors"] == [] and seen["outside"] == []


@pytest.mark.slow
def test_upload_an_image_file(session, tmp_path):
    from PIL import Image, ImageDraw

    page, api, seen = session
    image = Image.new("RGB", (300, 240), "white")
    ImageDraw.Draw(image).line([(150, 30), (150, 210)], fill="black", width=16)  # a photo-like 1
    image.save(tmp_path / "one.png")
    page.click("#clear")
    page.set_input_files("#upload", str(tmp_path / "one.png"))
    page.wait_for_selector(".model-card .heatmap")
    settle(page)
    answer = api.post("/api/predict", content=(tmp_path / "one.png").read_bytes(), headers={"Content-Type": "image/png"}).json()
    assert shown_predictions(page) == [m["prediction"] for m in answer["models"]]
    assert "inverted" in page.inner_text("#steps")  # dark ink on white paper was inverted

    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    page.set_input_files("#upload", str(bad))
    page.wait_for_function("() => document.getElementById('message').textContent.includes('not a readable image')")
    # a 415 answer is the app's, not an error of the page; Chromium logs failed fetches though
    seen["errors"][:] = [e for e in seen["errors"] if "415" not in e]
    assert seen["errors"] == [] and seen["outside"] == []
