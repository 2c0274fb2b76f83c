"""A server restart mid-workshop, for real: `streamlit run explorer/app.py` serves a room with a
training running, is killed, starts again, and chromium finds the board back with its names and
the training marked interrupted. Leaves screenshots of the Board and the Teacher's page in
test-artifacts/ (and in docs/screenshots/ for the README when GPT_EXPLORER_UPDATE_SCREENSHOTS=1)."""

import os
import shutil
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch
from test_browser import ARTIFACTS, CHROMIUM, IDLE, ROOT, SCREENSHOTS, SHIPPED, UPDATE_ENV, _wait_healthy, free_port, launch, wait_drawn

from core.data import Corpus
from core.trainer import TrainConfig, Trainer
from explorer.glue.room_glue import TOKEN_ENV
from explorer.glue.sidebar import PRETRAINED_ENV
from explorer.offpage.classroom import ROOM_DIR_ENV, Room
from helpers import tiny_config

SECRET = "workshop-token"
ROOM_NAMES = ("Ada <i>L</i>", "Grace", "Alan", "Katherine", "Linus")

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium: apt-get install chromium")


@contextmanager
def served(env: dict, log_path):
    """`streamlit run` on a free port until the block ends; then killed, as a crash would."""
    port = free_port()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "explorer/app.py", "--server.headless", "true",
                                 "--server.port", str(port)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait(timeout=10)


def fill_room(room: Room, text: str) -> dict[str, tuple[int, str]]:
    """Five participants' small Shakespeare trainings, evaluated and saved as the app does."""
    out, corpus = {}, Corpus(text, 32)
    for k, name in enumerate(ROOM_NAMES):
        me, seat = room.join(name)
        cfg = tiny_config(vocab_size=corpus.tokenizer.vocab_size, block_size=32, n_embd=16 + 8 * k)
        trainer = Trainer(cfg, TrainConfig(batch_size=8, max_iters=200, eval_interval=20, eval_iters=2, threads=1,
                                           learning_rate=3e-3), corpus)
        training = room.add_training(me.id, "layernorm run 1", "1-minute demo", f"layernorm 2×2×{cfg.n_embd}, context 32",
                                     200)
        trainer.train(on_eval=lambda _, t=trainer, i=training: room.save_eval(i, t))
        start = torch.zeros((1, 1), dtype=torch.long)
        sample = corpus.tokenizer.decode(trainer.model.generate(start, 80, generator=torch.Generator().manual_seed(0))[0].tolist())
        room.update_progress(training, "finished", 200, 200, 30_000.0 + 1000 * k, sample)
        out[name] = training, seat
    return out


def test_the_board_survives_a_server_restart(shakespeare, tmp_path):
    from playwright.sync_api import sync_playwright

    room_path, log_path = tmp_path / "room", tmp_path / "server.log"
    env = {**os.environ, PRETRAINED_ENV: str(SHIPPED), ROOM_DIR_ENV: str(room_path), TOKEN_ENV: SECRET}  # cpu-best first
    room = Room(room_path)
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1500})
        try:
            with served(env, log_path) as url:
                open_page(page, f"{url}/board")  # the server has started and looked for cut-off trainings
                assert page.locator("text=No training in the room yet").count() == 1
                trainings = fill_room(room, shakespeare)
                running, seat = trainings["Grace"]
                room.update_progress(running, "running", 120, 200, 31_000.0, "")  # mid-training when the server dies
                page.wait_for_selector(".legendtext", timeout=30_000)  # the empty board, left open, draws the room
                assert page.locator(".legendtext", has_text="Grace").count() == 1
                open_page(page, f"{url}/board?seat={seat}")
                page.wait_for_selector(".legendtext", timeout=60_000)
                assert page.locator(".legendtext", has_text="Grace").count() == 1
                assert "interrupted" not in page.inner_text("body")
            with served(env, log_path) as url:
                open_page(page, f"{url}/board?seat={seat}")
                page.wait_for_selector("text=interrupted by a server restart", timeout=60_000)
                page.wait_for_selector(".legendtext", timeout=60_000)
                legend = page.locator(".legendtext").all_text_contents()  # SVG text: no innerText
                assert any("Ada <i>L</i>" in t for t in legend)  # the name as typed, not as HTML
                assert room.training(running).status == "interrupted" and room.training(running).saved_step == 200
                assert page.locator('[data-testid="stException"]').count() == 0
                page.screenshot(path=ARTIFACTS / "board.png")
                open_page(page, f"{url}/teacher")
                page.get_by_label("Teacher's token").fill(SECRET)
                page.get_by_role("button", name="Unlock").click()
                page.wait_for_selector("text=Push to every screen", timeout=60_000)
                page.wait_for_selector(IDLE, timeout=60_000)
                assert page.locator('[data-testid="stException"]').count() == 0
                page.screenshot(path=ARTIFACTS / "teacher.png")
        finally:
            browser.close()
    log = log_path.read_text(errors="replace")
    assert "Traceback" not in log, log
    if os.environ.get(UPDATE_ENV) == "1":
        for name in ("board.png", "teacher.png"):
            shutil.copy(ARTIFACTS / name, SCREENSHOTS)


def open_page(page, url: str) -> None:
    page.goto(url)
    page.wait_for_selector("h1", timeout=60_000)
    page.wait_for_selector(IDLE, timeout=60_000)
    wait_drawn(page)
