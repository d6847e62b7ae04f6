"""Open a report in headless Chromium and check it as a person would see it.

``inspect_report(html, screenshot=...)`` returns a dict: ``console_errors`` (list of str),
``images`` (count), ``broken_images`` (sources of <img> that did not decode), ``toc_links``
(count) and ``dead_links`` (TOC hrefs without a target section), and saves a full-page PNG.

From a shell: ``python -m digitlens.report.browser runs/NAME/report.html [out.png]`` writes the
screenshot (default: ``report.png`` beside the report) and prints the checks.
Needs Playwright for Python (``pip install -e .[test]``) and Debian's ``chromium``.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from digitlens.errors import DigitlensError

CHROMIUM_ARGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run")


def find_chromium() -> str | None:
    """Path of a Chromium binary (``/usr/bin/chromium`` or on PATH), or ``None``."""
    for candidate in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def inspect_report(html_path: str | Path, *, screenshot: str | Path | None = None, width: int = 1366,
                   height: int = 900, executable: str | None = None) -> dict:
    """Load ``html_path`` offline in headless Chromium, run the checks, save a full-page screenshot."""
    html_path = Path(html_path).resolve()
    if not html_path.is_file():
        raise DigitlensError(f"{html_path}: report not found")
    executable = executable or find_chromium()
    if executable is None:
        raise DigitlensError("chromium: not found (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise DigitlensError("playwright: not installed (pip install -e '.[test]')") from None

    result: dict = {"console_errors": [], "requests": []}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=list(CHROMIUM_ARGS))
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.on("console", lambda msg: result["console_errors"].append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda exc: result["console_errors"].append(str(exc)))
            # Anything fetched besides the file itself (a font, a script, a stray image) breaks the
            # "self-contained, opens offline" promise.
            page.on("request", lambda req: result["requests"].append(req.url)
                    if not req.url.startswith(("file://", "data:")) else None)
            page.goto(html_path.as_uri(), wait_until="load")
            result.update(page.evaluate("""() => {
                const imgs = Array.from(document.images);
                const broken = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt || i.src.slice(0, 60));
                const links = Array.from(document.querySelectorAll('nav.toc a[href^="#"]'));
                const dead = links.map(a => a.getAttribute('href'))
                    .filter(h => { const el = document.getElementById(h.slice(1));
                                   return !el || el.tagName !== 'SECTION' || el.getBoundingClientRect().height === 0; });
                return {images: imgs.length, broken_images: broken, toc_links: links.length, dead_links: dead,
                        sections: Array.from(document.querySelectorAll('main > section')).map(s => s.id),
                        page_height: document.documentElement.scrollHeight};
            }"""))
            # Clicking a TOC link must scroll its section to the top of the window.
            result["toc_landings"] = {}
            for href in [h for h in page.eval_on_selector_all('nav.toc a', "els => els.map(e => e.getAttribute('href'))")]:
                page.click(f'nav.toc a[href="{href}"]')
                page.wait_for_timeout(50)
                result["toc_landings"][href] = page.evaluate(
                    "h => ({hash: location.hash, top: Math.round(document.getElementById(h.slice(1)).getBoundingClientRect().top)})",
                    href)
            if screenshot is not None:
                page.evaluate("window.scrollTo(0, 0)")
                Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(screenshot), full_page=True)
                result["screenshot"] = str(screenshot)
        finally:
            browser.close()
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__)
        return 2
    html_path = Path(argv[0])
    shot = Path(argv[1]) if len(argv) > 1 else html_path.with_name("report.png")
    res = inspect_report(html_path, screenshot=shot)
    for key in ("images", "broken_images", "toc_links", "dead_links", "console_errors", "requests", "sections", "screenshot"):
        print(f"{key}: {res.get(key)}")
    return 0 if not (res["broken_images"] or res["dead_links"] or res["console_errors"] or res["requests"]) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
