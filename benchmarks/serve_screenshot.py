"""The README's screenshot of ``digitlens serve`` (docs/serve.png), taken from a real run.

Serves RUN [RUN ...] on a free 127.0.0.1 port, opens the page in headless Chromium (Playwright,
Debian's ``chromium``), draws a 7 with mouse strokes, waits for every model's prediction and
maps, clicks the confusion-matrix cell of the first run with the most mistakes, and saves a
full-page PNG. Prints the predictions shown, console errors and any request outside the app
(both must be empty).

    python benchmarks/serve_screenshot.py runs/demo-mnist/cnn runs/demo-mnist/vit --out docs/serve.png
"""

from __future__ import annotations

import argparse
import sys

STROKES = ([(75, 62), (205, 58), (185, 105), (158, 165), (138, 238)],  # a 7: the bar and the stem
           [(118, 150), (190, 148)])                                      # and a crossbar


def main(argv=None) -> int:
    from playwright.sync_api import sync_playwright

    from digitlens.report.browser import CHROMIUM_ARGS, find_chromium
    from digitlens.serve import create_app
    from digitlens.serve.app import background_server

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--out", default="docs/serve.png")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)
    errors, outside = [], []
    with background_server(create_app(args.runs, data_dir=args.data_dir)) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=find_chromium(), args=list(CHROMIUM_ARGS))
        try:
            page = browser.new_page(viewport={"width": 1366, "height": 900})
            page.set_default_timeout(60_000)
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: outside.append(r.url) if not r.url.startswith((url + "/", "data:", "blob:")) else None)
            page.goto(url + "/")
            page.wait_for_selector("#confusion button")
            box = page.locator("#pad").bounding_box()
            for points in STROKES:
                page.mouse.move(box["x"] + points[0][0], box["y"] + points[0][1])
                page.mouse.down()
                for x, y in points[1:]:
                    page.mouse.move(box["x"] + x, box["y"] + y, steps=12)
                page.mouse.up()
            page.wait_for_selector(".model-card .heatmap")
            page.wait_for_timeout(1000)
            page.wait_for_function("() => !state.inFlight && !state.again")
            cells = page.eval_on_selector_all("#confusion button", "bs => bs.map(b => [b.dataset.true, b.dataset.pred, +b.textContent])")
            true, pred, _ = max((c for c in cells if c[0] != c[1]), key=lambda c: c[2])
            page.click(f'#confusion button[data-true="{true}"][data-pred="{pred}"]')
            page.wait_for_selector("#gallery .thumb")
            page.wait_for_timeout(500)
            page.screenshot(path=args.out, full_page=True)
            print("predictions:", page.locator(".model-card h3").all_inner_texts())
        finally:
            browser.close()
    print(f"wrote {args.out}; console errors: {errors}; requests outside the app: {outside}")
    return 1 if errors or outside else 0


if __name__ == "__main__":
    sys.exit(main())
