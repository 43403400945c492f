"""The try-it page of `fedaug serve` in a real headless browser (Debian's chromium driven by playwright): pick a
history item, ask, and see recommendations with titles and explanations rendered."""

from __future__ import annotations

import shutil
import socket
import time
import urllib.request

import numpy as np
import pytest

from common.bundle import write_bundle
from common.loaders import load
from common.text_prior import TextPrior
from tests.support import fedaug, write_amazon_set

playwright = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright (.[test])")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium)")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_page_shows_recommendations_with_titles_and_explanations(tmp_path):
    data = load(write_amazon_set(tmp_path))
    vectors = np.zeros((data.n_items + 1, 2), np.float32)
    for internal, text in enumerate(data.catalog.texts[1:], start=1):
        vectors[internal] = [1, 0.05 * internal] if text.startswith("red") else [0.05 * internal, 1]
    vectors[1:] /= np.linalg.norm(vectors[1:], axis=1, keepdims=True)
    write_bundle(tmp_path / "model", TextPrior(vectors, decay=0.5), data.catalog)
    port = _port()
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
            page.fill("#k", "3")
            page.click("#go")
            page.wait_for_selector("ol#results li.rec")
            rows = page.locator("ol#results li.rec")
            assert rows.count() == 3
            first = rows.nth(0).inner_text()
            assert first.startswith("red") and "because red nail polish" in first
            shot = page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
            browser.close()
        from PIL import Image

        image = np.asarray(Image.open(tmp_path / "page.png").convert("L"), dtype=np.float32)
        assert len(shot) > 5000 and image.std() > 10  # something rendered, not a blank page
        # the results' rows are drawn: the lower half of the page holds dark (text) pixels
        assert (image[image.shape[0] // 3 :] < 100).mean() > 0.001
    finally:
        server.terminate()
        server.wait(30)
