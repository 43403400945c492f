"""The try-it page of `fedaug serve` in a real headless browser (Debian's chromium driven by playwright): pick a
history item, ask, and see recommendations with titles and explanations rendered; the history goes with its events
and times; a phone-wide window does not overflow; a refused request reads as a friendly message."""

from __future__ import annotations

import shutil
import time
import urllib.request

import numpy as np
import pytest

from fedaug.common.data.loaders import load
from fedaug.common.priors.text_prior import TextPrior
from fedaug.common.recommend.bundle import write_bundle
from tests.support import fedaug, free_port, write_amazon_set

playwright = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright (.[test])")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium)")


def test_the_page_shows_recommendations_with_titles_and_explanations(tmp_path):
    data = load(write_amazon_set(tmp_path))
    vectors = np.zeros((data.n_items + 1, 2), np.float32)
    for internal, text in enumerate(data.catalog.texts[1:], start=1):
        vectors[internal] = [1, 0.05 * internal] if text.startswith("red") else [0.05 * internal, 1]
    vectors[1:] /= np.linalg.norm(vectors[1:], axis=1, keepdims=True)
    write_bundle(tmp_path / "model", TextPrior(vectors, decay=0.5), data.catalog)
    port = free_port()
    server = fedaug("serve", "--model", str(tmp_path / "model"), "--port", str(port), "--device", "cpu")
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, server.stdout.read()
                time.sleep(0.3)
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 900, "height": 700})
            page.goto(f"http://127.0.0.1:{port}/")
            page.fill("#find", "red nail")
            page.click("#picks button >> nth=0")  # pick "red nail polish" into the history
            assert page.input_value("#history").split() == [str(data.catalog.raw_ids[1])]
            assert page.get_attribute("#history", "placeholder") == "e.g. 1 2"  # this catalog's ids, not Beauty's
            page.fill("#k", "3")
            with page.expect_request("**/v1/recommend") as asked:
                page.click("#go")
            sent = asked.value.post_data_json
            assert sent["events"] == ["view"] and len(sent["timestamps"]) == 1 and sent["timestamps"][0][:2] == "20"
            page.wait_for_selector("ol#results li.rec")
            rows = page.locator("ol#results li.rec")
            assert rows.count() == 3
            first = rows.nth(0).inner_text()
            assert first.startswith("red") and "because red nail polish" in first
            assert "(-" not in page.inner_text("ol#results")  # only the reasons that raised a score
            shot = page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
            # A phone: nothing wider than the window; a refused history reads as a friendly message.
            phone = browser.new_page(viewport={"width": 390, "height": 800})
            phone.goto(f"http://127.0.0.1:{port}/")
            phone.fill("#history", "1 nope")
            phone.click("#go")
            phone.wait_for_function("document.getElementById('error').textContent.length > 0")
            error = phone.inner_text("#error")
            assert error.startswith("Some of these items are not in this shop's catalog"), error
            assert "history:" not in error and "'nope'" not in error
            widest = phone.evaluate("Math.max(...[...document.querySelectorAll('body *')]"
                                    ".map(e => e.getBoundingClientRect().right))")
            assert widest <= 390 and phone.evaluate("document.documentElement.scrollWidth") <= 390, widest
            browser.close()
        from PIL import Image

        image = np.asarray(Image.open(tmp_path / "page.png").convert("L"), dtype=np.float32)
        assert len(shot) > 5000 and image.std() > 10  # something rendered, not a blank page
        # the results' rows are drawn: the lower half of the page holds dark (text) pixels
        assert (image[image.shape[0] // 3 :] < 100).mean() > 0.001
    finally:
        server.terminate()
        output, _ = server.communicate(timeout=30)
    # the access log: one line per request
    assert '"GET /healthz HTTP/1.1" 200' in output and '"POST /v1/recommend HTTP/1.1" 422' in output, output
