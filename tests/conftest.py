"""Shared fixtures: tiny seeded models, and Tiny Shakespeare from a local copy (never the internet)."""

import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import streamlit as st
import torch

from core.data import DATA_ENV
from explorer.glue.sidebar import PRETRAINED_ENV
from explorer.offpage.classroom import ROOM_DIR_ENV
from helpers import threads_down_to, wait_for

ROOT = Path(__file__).resolve().parent.parent
SHARED_COPY = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
TINY_TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 4


def pytest_configure(config):
    # Tests and CI read the shared copy; point the data code at it unless the caller chose a file.
    if not os.environ.get(DATA_ENV) and SHARED_COPY.is_file():
        os.environ[DATA_ENV] = str(SHARED_COPY)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    # Trainings started by tests join a throw-away room, never the repository's runs/room/.
    os.environ.setdefault(ROOM_DIR_ENV, tempfile.mkdtemp(prefix="gpt-explorer-room-"))


@pytest.fixture(scope="session")
def shakespeare() -> str:
    path = os.environ.get(DATA_ENV)
    if not path or not Path(path).is_file():
        pytest.skip(f"Tiny Shakespeare not found: set {DATA_ENV} to a copy of input.txt")
    return Path(path).read_text(encoding="utf-8")


@pytest.fixture
def tiny_text() -> str:
    return TINY_TEXT


# The explorer app's tests: one small model trained by the project's own command line.

@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, shakespeare) -> Path:
    """NAME.json of a 2-layer model trained for 100 steps, alone in its folder (the app lists
    that folder when $GPT_EXPLORER_PRETRAINED points at it)."""
    out = tmp_path_factory.mktemp("pretrained") / "tiny"
    subprocess.run([sys.executable, "-m", "core.train", "--preset", "layernorm", "--n-layer", "2",
                    "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--max-iters", "100",
                    "--eval-interval", "50", "--eval-iters", "2", "--batch-size", "8", "--threads", "1",
                    "--no-state", "--out", str(out)], cwd=ROOT, check=True, capture_output=True, timeout=300)
    return out.with_suffix(".json")


@pytest.fixture
def pretrained(tiny_checkpoint, monkeypatch) -> Path:
    """The app lists the tiny trained model (and only it). AppTest gives every app the same
    session id: clearing the session caches before and after keeps tests from seeing each
    other's background threads (and stops them)."""
    monkeypatch.setenv(PRETRAINED_ENV, str(tiny_checkpoint.parent))
    st.cache_resource.clear()
    yield tiny_checkpoint
    st.cache_resource.clear()


@pytest.fixture
def app_server(tiny_checkpoint, monkeypatch):
    """The app's server as a test of sessions needs it: the tiny model listed, no runners and no
    queue; afterwards, no training thread left behind."""
    monkeypatch.setenv(PRETRAINED_ENV, str(tiny_checkpoint.parent))
    before = threading.active_count()
    st.cache_resource.clear()
    yield
    st.cache_resource.clear()  # releases every session's threads: they are asked to stop
    # The server's step timer is not a session's: it ends once the measurement under way is done
    # (a few steps, an evaluation and a sample of the last shape asked for: slow on a busy machine).
    assert wait_for(lambda: "gpt-explorer-step-timer" not in {t.name for t in threading.enumerate()}, timeout=120)
    assert threads_down_to(before, timeout=30), threading.enumerate()
