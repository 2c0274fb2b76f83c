"""One real browser: every view of `streamlit run explorer/app.py` opens in chromium without an
error, and leaves a screenshot in test-artifacts/ (and in docs/screenshots/ for the README when
GPT_EXPLORER_UPDATE_SCREENSHOTS=1)."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from explorer.app import PAGES
from explorer.glue.sidebar import PRETRAINED_ENV

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"
SCREENSHOTS = ROOT / "docs" / "screenshots"
UPDATE_ENV = "GPT_EXPLORER_UPDATE_SCREENSHOTS"
# Streamlit is idle when its app root says so (see the project's Streamlit notes).
IDLE = '[data-testid="stApp"][data-test-connection-state="CONNECTED"][data-test-script-state="notRunning"]'
# Every visible Plotly chart has drawn its SVG (charts in hidden tabs draw when shown).
CHARTS_DRAWN = """() => [...document.querySelectorAll('[data-testid="stPlotlyChart"]')]
    .filter(e => e.offsetParent !== null).every(e => e.querySelector('.main-svg'))"""

# The Train view's progress text, "step 1,234 of 1,500 · ...", has reached a step count.
STEPS_AT_LEAST = """(n) => { const m = document.body.innerText.match(/step ([\\d,]+) of/);
    return m !== null && parseInt(m[1].replace(/,/g, '')) >= n; }"""

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium: apt-get install chromium")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tiny_checkpoint, tmp_path):
    """The app served by `streamlit run` on a free port, its log in a file; stopped at the end."""
    port, log_path = free_port(), tmp_path / "server.log"
    env = {**os.environ, PRETRAINED_ENV: str(tiny_checkpoint.parent), "GPT_EXPLORER_MAX_TRAININGS": "1"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "explorer/app.py", "--server.headless",
                                 "true", "--server.port", str(port)], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc)
        yield url, log_path
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError("streamlit did not answer its health check")


def test_every_view_in_a_real_browser(server):
    from playwright.sync_api import sync_playwright

    url, log_path = server
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = launch(p)
        # Streamlit scrolls inside its own container, so a full-page shot needs a tall viewport.
        page = browser.new_page(viewport={"width": 1400, "height": 1500})
        try:
            for i, (file, title, _) in enumerate(PAGES):
                name = Path(file).stem
                page.goto(f"{url}/{name if i else ''}")  # the first page is the app's root
                page.wait_for_selector("h1")  # content first, then idle: idle alone races the first run
                _wait_idle(page)
                if name == "train":
                    _train_until_the_curve_grows(page)
                if name == "sample":
                    page.get_by_role("button", name="Generate").click()
                    page.wait_for_selector('[data-testid="stPlotlyChart"]', timeout=60_000)
                    _wait_idle(page)
                assert page.locator('[data-testid="stException"]').count() == 0, f"{title} shows an exception"
                page.screenshot(path=ARTIFACTS / f"{name}.png")
        finally:
            browser.close()
    log = log_path.read_text(errors="replace")
    assert "Traceback" not in log and "Uncaught" not in log, log
    if os.environ.get(UPDATE_ENV) == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        for file, _, _ in PAGES:
            shutil.copy(ARTIFACTS / f"{Path(file).stem}.png", SCREENSHOTS)


def _train_until_the_curve_grows(page) -> None:
    """Start the default recipe and wait for 100 steps: the loss chart has drawn and grown."""
    page.get_by_role("button", name="Start", exact=True).click()
    page.wait_for_function(STEPS_AT_LEAST, arg=100, timeout=120_000)
    page.wait_for_function(CHARTS_DRAWN, timeout=60_000)


def _wait_idle(page) -> None:
    page.wait_for_selector(IDLE, timeout=60_000)
    page.wait_for_function(CHARTS_DRAWN, timeout=60_000)


# The Train view's flows, as a teacher runs them: AppTest reruns fragments inline, a browser runs
# them as the app does (a click inside the polling fragment reruns only the fragment).
STEP_NOW = """() => { const m = document.body.innerText.match(/step ([\\d,]+) of/);
    return m === null ? -1 : parseInt(m[1].replace(/,/g, '')); }"""


def launch(p):
    """Debian's chromium, headless, with nothing that reaches outside this machine."""
    return p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=[
        "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"])


def _button(page, name: str):
    """A button of the page itself (Streamlit's header has a Stop button of its own)."""
    return page.get_by_test_id("stMainBlockContainer").get_by_role("button", name=name, exact=True)


def _open_bigram_form(page, url: str, steps: int) -> None:
    """The Train view with the bigram recipe (a lookup table: steps take microseconds) for `steps` steps."""
    page.goto(f"{url}/training")
    page.wait_for_selector("h1")
    _wait_idle(page)
    page.locator('[data-testid="stSelectbox"]').filter(has_text="Recipe").click()
    page.get_by_role("option", name="Bigram in seconds").click()
    _wait_idle(page)
    page.get_by_label("Steps").fill(str(steps))
    page.get_by_label("Steps").press("Enter")
    _wait_idle(page)


def _text(page, pattern: str, timeout: float = 60_000) -> None:
    page.wait_for_function("(p) => new RegExp(p).test(document.body.innerText)", arg=pattern, timeout=timeout)


def test_start_stop_resume_to_the_end_reset_and_start_again_in_a_real_browser(server):
    from playwright.sync_api import sync_playwright

    url, log_path = server
    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1500})
        try:
            _open_bigram_form(page, url, 5000)
            _button(page, "Start").click()
            page.wait_for_function(STEPS_AT_LEAST, arg=50, timeout=60_000)
            _button(page, "Stop").click()
            _text(page, "Stopped")
            stopped = page.evaluate(STEP_NOW)
            assert 50 <= stopped < 5000
            _button(page, "Resume").click()
            page.wait_for_function(STEPS_AT_LEAST, arg=stopped + 1, timeout=60_000)  # the page follows it again
            _text(page, "Finished", timeout=180_000)
            assert page.evaluate(STEP_NOW) == 5000
            _button(page, "Reset").click()
            _button(page, "Start").wait_for(timeout=30_000)  # the form is back at once
            _button(page, "Start").click()
            page.wait_for_function(STEPS_AT_LEAST, arg=1, timeout=60_000)
            _button(page, "Stop").click()
            _text(page, "Stopped")
            assert page.locator('[data-testid="stException"]').count() == 0
        finally:
            browser.close()
    log = log_path.read_text(errors="replace")
    assert "Traceback" not in log, log


def test_a_room_of_tabs_queues_for_the_slot_and_every_training_finishes(server):
    """Three participants press Start at once on a server with one training slot: two see their
    place in the queue, and all three finish."""
    from playwright.sync_api import sync_playwright

    url, log_path = server
    with sync_playwright() as p:
        browser = launch(p)
        pages = [browser.new_context().new_page() for _ in range(3)]  # a context each: three sessions
        try:
            for page in pages:
                _open_bigram_form(page, url, 3000)
            for page in pages:
                _button(page, "Start").click()
            deadline = time.monotonic() + 60
            while not any("in the queue" in page.inner_text("body") for page in pages):
                assert time.monotonic() < deadline, "nobody was told their place in the queue"
                time.sleep(0.2)
            for page in pages:
                _text(page, "Finished", timeout=240_000)
                assert page.locator('[data-testid="stException"]').count() == 0
        finally:
            browser.close()
    log = log_path.read_text(errors="replace")
    assert "Traceback" not in log, log
