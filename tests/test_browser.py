"""The app in a real browser: Streamlit on a free localhost port, driven by headless Chromium (playwright).

Runs a transport on the test zoo, opens every page, checks its key text and that a plotly chart
rendered, and saves a screenshot of each page, in normal and in presentation mode, into
``$SCREENSHOT_DIR`` (default: a temp dir).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (install the chromium package to run the browser test)")
    from transport import zoo

    given = os.environ.get("TRANSPORT_TEST_ZOO_DIR")
    zoo_dir = Path(given) if given and zoo.is_built(given) else Path(request.getfixturevalue("tiny_zoo"))
    port = _free_port()
    env = {**os.environ, "TRANSPORT_ZOO_DIR": str(zoo_dir),
           "TRANSPORT_CACHE_DIR": str(tmp_path_factory.mktemp("browser-cache")),
           "TRANSPORT_APP_DIR": str(tmp_path_factory.mktemp("browser-app")), "OMP_NUM_THREADS": "2"}
    log = tmp_path_factory.mktemp("browser-log") / "streamlit.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(ROOT / "app" / "main.py"), "--server.headless", "true",
             "--server.address", "127.0.0.1", "--server.port", str(port), "--browser.gatherUsageStats", "false",
             "--server.fileWatcherType", "none"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
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


@pytest.fixture(scope="module")
def shots_dir() -> Path:
    d = Path(os.environ.get("SCREENSHOT_DIR") or tempfile.mkdtemp(prefix="app-screenshots-"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _idle(page, timeout: float = 180_000) -> None:
    """Wait until Streamlit's script run is over (the app root reports its script state)."""
    page.wait_for_timeout(300)
    page.wait_for_function(
        "() => { const a = document.querySelector('[data-testid=\"stApp\"]');"
        " return a && a.getAttribute('data-test-script-state') === 'notRunning'; }", timeout=timeout)


def _shot(page, path: Path) -> None:
    """A screenshot of the whole page: the viewport grows to the main area's scroll height first."""
    h = page.evaluate("() => { const m = document.querySelector('[data-testid=\"stMain\"]');"
                      " return m ? m.scrollHeight : document.body.scrollHeight; }")
    size = page.viewport_size
    page.set_viewport_size({"width": size["width"], "height": max(size["height"], min(int(h) + 40, 8000))})
    page.wait_for_timeout(800)  # let plotly re-layout to the new size
    page.screenshot(path=str(path), full_page=True)
    page.set_viewport_size(size)


def _plotly(page, at_least: int = 1) -> int:
    page.wait_for_function(f"() => [...document.querySelectorAll('.js-plotly-plot')].filter("
                           f"g => g.querySelector('.main-svg')).length >= {at_least}", timeout=60_000)
    return page.locator(".js-plotly-plot").count()


def _no_error(page) -> None:
    errors = page.locator('[data-testid="stAlertContentError"]')
    assert errors.count() == 0, errors.first.inner_text()
    assert page.locator('[data-testid="stException"]').count() == 0


def _open(page, title: str) -> None:
    page.locator('[data-testid="stSidebarNav"] a', has_text=title).first.click()
    _idle(page)


def _run(page, label: str, timeout: float = 300_000) -> None:
    """Click a Run button; the transfer runs in the background and the button is disabled until it is done."""
    page.get_by_role("button", name=label, exact=True).click()
    try:  # the page redraws with the button disabled while the job runs (a very short job may be missed)
        page.wait_for_function(
            "(label) => { const b = [...document.querySelectorAll('button')].find(b => b.innerText.trim() === label);"
            " return (b && b.disabled) || document.querySelector('[data-testid=\"stProgress\"]'); }", arg=label,
            timeout=30_000)
    except Exception:  # noqa: BLE001 - playwright's TimeoutError: the job was over before the first redraw
        pass
    page.wait_for_function(
        "(label) => { const b = [...document.querySelectorAll('button')].find(b => b.innerText.trim() === label);"
        " return b && !b.disabled && !document.querySelector('[data-testid=\"stProgress\"]'); }", arg=label,
        timeout=timeout)
    _idle(page)


def test_pages_in_a_real_browser(server, shots_dir):
    from playwright.sync_api import sync_playwright

    from app.logic import built_methods

    methods = built_methods()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(server, wait_until="networkidle")
            page.get_by_text("Transport a task vector").wait_for(timeout=60_000)
            _idle(page)
            _no_error(page)
            # a 9-point alpha grid keeps each run short on a shared CPU
            page.locator('[data-testid="stSidebar"] [data-testid="stExpander"]', has_text="Evaluation").click()
            grid = page.get_by_label("alpha grid LO:HI:N (empty: 0 to 2 in steps of 0.1)")
            grid.fill("0:2:9")
            grid.press("Enter")
            _idle(page)

            # every pair's full name is readable in the sidebar (no cut-off titles)
            from transport import zoo

            labels = _pair_labels(page)
            for p_ in zoo.pairs():
                label = labels.filter(has_text=p_.title).first
                assert label.is_visible(), p_.title
                fits = label.evaluate("e => { const t = e.querySelector('[data-testid=\"stMarkdownContainer\"]');"
                                      " const s = e.closest('[data-testid=\"stSidebar\"]').getBoundingClientRect();"
                                      " const r = t.getBoundingClientRect();"
                                      " return t.scrollWidth <= t.clientWidth + 1 && r.right <= s.right; }")
                assert fits and p_.title in label.inner_text(), p_.title
            assert page.get_by_text("What to expect on control").first.is_visible()

            # Transport: run the default method on the default zoo pair; the run goes on in the background and
            # the page shows its result by itself when it is done (no further click)
            _run(page, "Run transport")
            page.get_by_text("Accuracy", exact=True).wait_for(timeout=180_000)
            _idle(page)
            _no_error(page)
            assert page.get_by_text("zero-shot target", exact=True).first.is_visible()
            assert _plotly(page, 2) >= 2
            page.get_by_text("Accuracy vs alpha").first.wait_for()
            _shot(page, shots_dir / "01-transport.png")

            expect = {"TransFusion": ("transfusion", "Run transfusion", "head assignment"),
                      "GradFix": ("gradfix", "Run gradfix", "Sign agreement per layer and block"),
                      "Theseus": ("theseus", "Run theseus", "Procrustes residual per activation space")}
            for i, (title, (method, button, text)) in enumerate(expect.items(), start=2):
                _open(page, title)
                if method not in methods:
                    page.get_by_text("not available yet").first.wait_for(timeout=30_000)
                    assert page.locator(".js-plotly-plot").count() == 0
                else:
                    if method == "theseus":  # a cross-width pair shows what Theseus is for
                        _pick_pair(page, "Wider release grown from A")
                    _run(page, button)
                    _no_error(page)
                    page.get_by_text(text).first.wait_for(timeout=180_000)
                    assert _plotly(page, 2) >= 2
                    if method == "gradfix":  # a click on a heatmap cell drills into that weight matrix
                        _click_cell(page, "Sign agreement", "fc1", "1")
                        page.wait_for_function("() => [...document.querySelectorAll('.js-plotly-plot')].some("
                                               "g => (g.layout.title.text || '').includes('blocks.1.mlp.fc1.weight'))",
                                               timeout=60_000)
                _shot(page, shots_dir / f"0{i}-{method}.png")
                if method == "theseus" and method in methods:
                    _pick_pair(page, "Control: A with its units shuffled")

            _open(page, "Compare")
            _run(page, "Run the selected methods")
            page.get_by_text("Agreement between methods").first.wait_for(timeout=180_000)
            assert _plotly(page, 2) >= 2
            _shot(page, shots_dir / "05-compare.png")

            _open(page, "Debug a transfer")
            page.get_by_text("Which layers carry the transfer").first.wait_for(timeout=120_000)
            _no_error(page)
            assert _plotly(page, 1) >= 1
            _shot(page, shots_dir / "06-debug.png")

            # presentation mode: one toggle restyles every figure; one screenshot per page
            page.locator('[data-testid="stSidebar"]').get_by_text("Presentation mode").click()
            _idle(page)
            pages = [("Transport", "01-transport"), ("TransFusion", "02-transfusion"), ("GradFix", "03-gradfix"),
                     ("Theseus", "04-theseus"), ("Compare", "05-compare"), ("Debug a transfer", "06-debug")]
            for title, name in pages:
                if title == "Theseus" and "theseus" in methods:
                    _pick_pair(page, "Wider release grown from A")
                _open(page, title)
                _no_error(page)
                n = _plotly(page, 1)
                sizes = page.evaluate("() => [...document.querySelectorAll('.js-plotly-plot')]"
                                      ".map(g => g._fullLayout.font.size)")
                assert len(sizes) == n and min(sizes) >= 18, (title, sizes)
                _shot(page, shots_dir / f"{name}-presentation.png")
                if title == "Theseus" and "theseus" in methods:
                    _pick_pair(page, "Control: A with its units shuffled")
        finally:
            browser.close()
    assert len(list(shots_dir.glob("0*.png"))) == 12


def _click_cell(page, title: str, x: str, y: str) -> None:
    """Click the centre of category cell (x, y) of the plotly chart whose title contains ``title``."""
    xy = page.evaluate(
        """([title, x, y]) => {
            const gd = [...document.querySelectorAll('.js-plotly-plot')]
                .find(g => ((g.layout.title || {}).text || '').includes(title));
            gd.scrollIntoView();
            const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis, r = gd.getBoundingClientRect();
            return [r.left + xa._offset + xa.d2p(x), r.top + ya._offset + ya.d2p(y)];
        }""", [title, x, y])
    page.mouse.click(xy[0], xy[1])
    _idle(page)


def _pair_labels(page):
    radios = page.locator('[data-testid="stSidebar"] [data-testid="stRadio"]')
    return radios.filter(has=page.get_by_text("Pair", exact=True)).first.locator("label")


def _pick_pair(page, title: str) -> None:
    _pair_labels(page).filter(has_text=title).first.click()
    _idle(page)
