"""The explorer on a text zoo pair in a real browser (headless Chromium): the sidebar offers the text zoo's
pairs, the Prompt page shows every version's prediction for a typed text, and every page works on a
language-model pair. Screenshots of each page go to ``$SCREENSHOT_DIR`` (default: a temp dir)."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from test_browser import ARGS, CHROMIUM, ROOT, _free_port, _idle, _no_error, _open, _pick_pair, _plotly, _run, _shot

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def text_server(tiny_text_zoo, tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (install the chromium package to run the browser test)")
    port = _free_port()
    env = {**os.environ, "TRANSPORT_TEXT_ZOO_DIR": str(tiny_text_zoo),
           "TRANSPORT_ZOO_DIR": str(tmp_path_factory.mktemp("no-vision-zoo")),
           "TRANSPORT_CACHE_DIR": str(tmp_path_factory.mktemp("browser-text-cache")),
           "TRANSPORT_APP_DIR": str(tmp_path_factory.mktemp("browser-text-app")), "OMP_NUM_THREADS": "2"}
    log = tmp_path_factory.mktemp("browser-text-log") / "streamlit.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(ROOT / "app" / "main.py"), "--server.headless", "true",
             "--server.address", "127.0.0.1", "--server.port", str(port), "--browser.gatherUsageStats", "false",
             "--server.fileWatcherType", "none"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.read().strip() == b"ok":
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"streamlit did not start: {log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_text_pair_pages_in_a_real_browser(text_server):
    from playwright.sync_api import sync_playwright

    from transport.zoo import text_store

    shots = Path(os.environ.get("SCREENSHOT_DIR") or tempfile.mkdtemp(prefix="app-text-screenshots-"))
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(text_server, wait_until="networkidle")
            page.get_by_text("Transport a task vector").wait_for(timeout=90_000)
            _idle(page)
            # no vision zoo here: the text zoo's pairs are the first choice, every title readable
            page.get_by_text("text zoo pair").first.wait_for(timeout=30_000)
            for pair in text_store.pairs():
                assert page.get_by_text(pair.title).first.is_visible(), pair.title
            page.locator('[data-testid="stSidebar"] [data-testid="stExpander"]', has_text="Evaluation").click()
            grid = page.get_by_label("alpha grid LO:HI:N (empty: 0 to 2 in steps of 0.1)")
            grid.fill("0:2:5")
            grid.press("Enter")
            _idle(page)
            assert page.get_by_text("What to expect on the text pair control").first.is_visible()

            _run(page, "Run transport")
            page.get_by_text("Accuracy", exact=True).wait_for(timeout=240_000)
            _idle(page)
            _no_error(page)
            assert _plotly(page, 1) >= 1
            _shot(page, shots / "text-01-transport.png")

            _open(page, "Prompt")
            page.get_by_text("Predicted label: p(label word | prompt)").first.wait_for(timeout=120_000)
            _no_error(page)
            box = page.get_by_role("textbox", name="Prompt")
            box.fill("for key, value in items.items():\nLabel:")
            box.press("Control+Enter")
            _idle(page)
            _no_error(page)
            assert _plotly(page, 4) >= 4
            page.get_by_text("Where each version's next-token prediction differs").first.wait_for(timeout=60_000)
            _shot(page, shots / "text-02-prompt.png")

            for i, (title, button, text) in enumerate((
                    ("TransFusion", "Run transfusion", "head assignment"),
                    ("GradFix", "Run gradfix", "Sign agreement per layer and block")), start=3):
                _open(page, title)
                _run(page, button)
                _no_error(page)
                page.get_by_text(text).first.wait_for(timeout=240_000)
                assert _plotly(page, 1) >= 1
                if title == "TransFusion":  # grouped-query attention: the query heads inside each matched group
                    page.get_by_text("Query heads inside the matched key/value groups").first.wait_for(timeout=60_000)
                _shot(page, shots / f"text-0{i}-{title.lower()}.png")

            _pick_pair(page, "Deeper release grown from A")
            _open(page, "Theseus")
            _run(page, "Run theseus")
            _no_error(page)
            page.get_by_text("Procrustes residual per activation space").first.wait_for(timeout=240_000)
            # a text's point is its prompt's last token, not an image's class token
            page.get_by_text("one text's activation at the last token of its prompt").first.wait_for(timeout=60_000)
            _shot(page, shots / "text-05-theseus.png")

            for i, title in enumerate(("Compare", "Debug a transfer"), start=6):
                _open(page, title)
                _idle(page)
                _no_error(page)
                _shot(page, shots / f"text-0{i}-{title.split()[0].lower()}.png")
        finally:
            browser.close()
