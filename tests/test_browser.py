"""Real browsers on `streamlit run explorer/app.py` with the shipped checkpoints: every view opens in
chromium on cpu-best without an error, its charts drawn, and leaves a screenshot in test-artifacts/
(and in docs/screenshots/ for the README when GPT_EXPLORER_UPDATE_SCREENSHOTS=1); the views fit a
laptop and a phone; and the Train view's flows, as a teacher runs them."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from page_checks import CONTROLS_AND_HEATMAP, LAYOUT_PROBLEMS, UNDRAWN

from explorer.app import PAGES
from explorer.glue.sidebar import PRETRAINED_ENV

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"
SCREENSHOTS = ROOT / "docs" / "screenshots"
UPDATE_ENV = "GPT_EXPLORER_UPDATE_SCREENSHOTS"
SHIPPED = ROOT / "pretrained"  # cpu-best sorts first, so the picker opens it
MODEL = "cpu-best (pretrained)"
# Streamlit is idle when its app root says so (see the project's Streamlit notes).
IDLE = '[data-testid="stApp"][data-test-connection-state="CONNECTED"][data-test-script-state="notRunning"]'
VIEWS = [Path(file).stem for file, _, _ in PAGES]  # URL paths; the first page is the app's root
# Train last: its run would slow the other views, and when it stops it becomes the picker's model.
SHOT_ORDER = [view for view in VIEWS if view != "training"] + ["training"]
ROOM_VIEWS = ("board", "teacher")  # their README screenshots show a filled room: tests/test_room_server.py
# Streamlit scrolls inside its own container, so a screenshot of a whole view needs a tall viewport.
SHOT = {"width": 1280, "height": 1500}  # a laptop's width
LAPTOP = {"width": 1280, "height": 800}
LAPTOP_IN_A_BROWSER = {"width": 1280, "height": 700}  # what that screen leaves under a browser's bars
PHONE = {"width": 390, "height": 844}
FIRST_SAMPLE = 200  # the default recipe's second sample after the untrained one: it starts to spell

# The Train view's progress text, "step 1,234 of 1,500 · ...", has reached a step count.
STEPS_AT_LEAST = """(n) => { const m = document.body.innerText.match(/step ([\\d,]+) of/);
    return m !== null && parseInt(m[1].replace(/,/g, '')) >= n; }"""

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium: apt-get install chromium")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, shakespeare):
    """The app served by `streamlit run` on a free port, with the shipped checkpoints and one
    training slot, its log in a file; shared by this module's tests (each in sessions of its own,
    and the warm caches save each the loading), stopped at the end. Its trainings read Tiny
    Shakespeare: without a copy the tests skip, as the AppTest ones do, rather than wait on a
    download."""
    port, log_path = free_port(), tmp_path_factory.mktemp("server") / "server.log"
    env = {**os.environ, PRETRAINED_ENV: str(SHIPPED), "GPT_EXPLORER_MAX_TRAININGS": "1"}
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


def launch(p):
    """Debian's chromium, headless, with nothing that reaches outside this machine."""
    return p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=[
        "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"])


def wait_drawn(page, timeout: float = 60_000) -> None:
    """Wait until every visible chart has drawn all its traces at its size; fail naming those that have not."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(f"() => ({UNDRAWN})().length === 0", timeout=timeout)
    except PlaywrightTimeout:
        pytest.fail(f"not drawn: {page.evaluate(UNDRAWN)}")


def layout_problems(page, settle_ms: float = 5_000) -> list[str]:
    """What LAYOUT_PROBLEMS finds once the page has settled: a table or a chart laid out again at a
    new width takes a few frames, so wait for none (at once when nothing is wrong), then look."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(f"() => ({LAYOUT_PROBLEMS})().length === 0", timeout=settle_ms)
    except PlaywrightTimeout:
        pass  # the problems are real: they are returned
    return page.evaluate(LAYOUT_PROBLEMS)


def _wait_idle(page) -> None:
    page.wait_for_selector(IDLE, timeout=60_000)
    wait_drawn(page)


def _open(page, url: str, view: str) -> None:
    page.goto(f"{url}/{'' if view == VIEWS[0] else view}")
    page.wait_for_selector("h1", timeout=60_000)  # content first, then idle: idle alone races the first run
    _wait_idle(page)


def _assert_no_exception(page, view: str) -> None:
    assert page.locator('[data-testid="stException"]').count() == 0, f"{view} shows an exception"


def _assert_clean_log(log_path: Path) -> None:
    log = log_path.read_text(errors="replace")
    assert "Traceback" not in log and "Uncaught" not in log, log


def test_every_view_on_cpu_best_draws_and_fits_a_laptop_and_a_phone(server):
    """Each view on cpu-best at a laptop's width, then resized to a phone's (as a page loaded there:
    the sidebar folds away, the charts redraw): no error, every chart drawn, and nothing that scrolls
    sideways, cuts off a title or puts it under the toolbar, leaves square cells mostly blank,
    truncates a button or cuts off code. Attention shows layer 0, head 0 (the previous-character head,
    tests/test_pretrained.py), and it and its controls fit a laptop's screen; Sample writes; Train is
    caught mid-training. A screenshot of each at the laptop's width, and of the phone's first screen
    in test-artifacts/phone/."""
    from playwright.sync_api import sync_playwright

    url, log_path = server
    (ARTIFACTS / "phone").mkdir(parents=True, exist_ok=True)
    problems = {}
    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport=SHOT)
        try:
            for view in SHOT_ORDER:
                page.set_viewport_size(SHOT)
                _open(page, url, view)
                if view == "attention":
                    assert page.get_by_test_id("stSidebar").get_by_role("combobox", name="Model").input_value() == MODEL
                    assert page.locator(".gtitle").first.text_content().startswith("Layer 0, head 0: softmax")
                if view == "sampling":
                    _button(page, "Generate").click()
                    page.wait_for_selector('[data-testid="stPlotlyChart"]', timeout=60_000)  # the text, written
                    _wait_idle(page)
                if view == "training":
                    _button(page, "Start").click()
                    _text(page, f"A sample at step {FIRST_SAMPLE}", timeout=180_000)
                    wait_drawn(page)
                _assert_no_exception(page, view)
                problems[view] = layout_problems(page)
                if view not in ROOM_VIEWS:
                    page.screenshot(path=ARTIFACTS / f"{view}.png")
                if view == "attention":
                    problems["attention on a laptop's screen"] = _heatmap_and_controls_fit(page)
                page.set_viewport_size(PHONE)
                wait_drawn(page)
                problems[f"{view} on a phone"] = layout_problems(page)
                page.screenshot(path=ARTIFACTS / "phone" / f"{view}.png")
                if view == "training":
                    _button(page, "Stop").click()  # frees the training slot for the next test at once
                    _text(page, "Stopped")
        finally:
            browser.close()
    _assert_clean_log(log_path)
    _assert_none(problems)
    if os.environ.get(UPDATE_ENV) == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        for view in SHOT_ORDER:
            if view not in ROOM_VIEWS:
                shutil.copy(ARTIFACTS / f"{view}.png", SCREENSHOTS)


def _heatmap_and_controls_fit(page) -> list[str]:
    """At 1280x800, and at what that laptop's browser leaves of it, the Layer and Head selects and
    the heatmap below them are on the screen at once."""
    problems = []
    for screen in (LAPTOP, LAPTOP_IN_A_BROWSER):
        page.set_viewport_size(screen)
        wait_drawn(page)  # a chart of square cells follows the screen's height
        top, bottom, height = page.evaluate(CONTROLS_AND_HEATMAP)
        if bottom > height:
            problems.append(f"at {screen['width']}x{screen['height']} the controls start at {top:.0f} px and the "
                            f"heatmap ends at {bottom:.0f} px, below the screen")
    return problems


def _assert_none(problems: dict[str, list[str]]) -> None:
    """Every problem, one a line (pytest would shorten a dict)."""
    found = [f"{where}: {problem}" for where, listed in problems.items() for problem in listed]
    assert not found, "\n".join(found)


# The Train view's flows, as a teacher runs them: AppTest reruns fragments inline, a browser runs
# them as the app does (a click inside the polling fragment reruns only the fragment).
STEP_NOW = """() => { const m = document.body.innerText.match(/step ([\\d,]+) of/);
    return m === null ? -1 : parseInt(m[1].replace(/,/g, '')); }"""


def _button(page, name: str):
    """A button of the page itself (Streamlit's header has a Stop button of its own)."""
    return page.get_by_test_id("stMainBlockContainer").get_by_role("button", name=name, exact=True)


def _open_bigram_form(page, url: str, steps: int) -> None:
    """The Train view with the bigram recipe (a lookup table: steps take microseconds) for `steps` steps."""
    _open(page, url, "training")
    page.locator('[data-testid="stSelectbox"]').filter(has_text="Recipe").click()
    page.get_by_role("option", name="Bigram in seconds").click()
    _text(page, "The lecture's first model")  # its caption, then idle: the form holds the recipe (idle alone races)
    _wait_idle(page)
    page.get_by_label("Steps").fill(str(steps))
    page.get_by_label("Steps").press("Enter")
    _text(page, f"for {steps:,} steps")  # the estimate: the server has the number
    _wait_idle(page)


def _text(page, pattern: str, timeout: float = 60_000) -> None:
    page.wait_for_function("(p) => new RegExp(p).test(document.body.innerText)", arg=pattern, timeout=timeout)


def test_start_stop_resume_to_the_end_reset_and_start_again_in_a_real_browser(server):
    """On a laptop's screen, where the finished run's download buttons must show their labels whole."""
    from playwright.sync_api import sync_playwright

    url, log_path = server
    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport=LAPTOP)
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
            _button(page, "Download weights (.safetensors)").wait_for(timeout=30_000)
            assert not layout_problems(page)
            _button(page, "Reset").click()
            _button(page, "Start").wait_for(timeout=30_000)  # the form is back at once
            _button(page, "Start").click()
            page.wait_for_function(STEPS_AT_LEAST, arg=1, timeout=60_000)
            _button(page, "Stop").click()
            _text(page, "Stopped")
            _assert_no_exception(page, "Train")
        finally:
            browser.close()
    _assert_clean_log(log_path)


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
                _open_bigram_form(page, url, 1000)
            for page in pages:
                _button(page, "Start").click()
            deadline = time.monotonic() + 60
            while not any("in the queue" in page.inner_text("body") for page in pages):
                assert time.monotonic() < deadline, "nobody was told their place in the queue"
                time.sleep(0.2)
            for page in pages:
                _text(page, "Finished", timeout=240_000)
                _assert_no_exception(page, "Train")
        finally:
            browser.close()
    _assert_clean_log(log_path)
