"""The report as a person sees it: opened in headless Chromium (Debian's ``chromium`` driven by
Playwright), no console errors, every image decoded, every contents link lands on its section."""

from __future__ import annotations

import pytest
from demo_cache import fast_demo

from digitlens.report.browser import find_chromium, inspect_report

pytestmark = pytest.mark.browser

if find_chromium() is None:
    pytest.skip("chromium not installed (apt-get install chromium); .ci/run installs it", allow_module_level=True)
pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install -e '.[test]')")


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    demo = fast_demo(tmp_path_factory)
    shot = tmp_path_factory.mktemp("screens") / "report.png"
    return inspect_report(demo["reports"][0], screenshot=shot), shot


@pytest.mark.slow
def test_report_opens_cleanly(checked):
    result, _ = checked
    assert result["console_errors"] == []
    assert result["requests"] == []            # self-contained: nothing fetched from anywhere
    assert result["images"] >= 20              # figures of both runs, every stage
    assert result["broken_images"] == []       # every <img> decoded (naturalWidth > 0)


@pytest.mark.slow
def test_every_toc_link_lands_on_its_section(checked):
    result, _ = checked
    assert result["toc_links"] == len(result["sections"]) >= 7
    assert result["dead_links"] == []
    for href, landing in result["toc_landings"].items():
        assert landing["hash"] == href
        assert abs(landing["top"]) <= 2 or href == f"#{result['sections'][-1]}"  # the last may not reach the top


@pytest.mark.slow
def test_screenshot_is_saved(checked):
    from PIL import Image

    _, shot = checked
    with Image.open(shot) as image:
        width, height = image.size
    assert width >= 1000 and height > 3000
