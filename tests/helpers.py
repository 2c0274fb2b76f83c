"""Tiny models for fast tests (every preset at a shape that runs in milliseconds), reading
the app's Plotly figures back out of AppTest, and several browser sessions in AppTest."""

import base64
import gc
import json
import sys
import threading
import time
from contextlib import contextmanager

import numpy as np
import torch
from streamlit.runtime.caching import cache_resource_api
from streamlit.testing.v1 import AppTest

from core import GPT, GPTConfig


def tiny_config(preset: str = "layernorm", vocab_size: int = 20, **overrides) -> GPTConfig:
    sizes = dict(n_layer=2, n_head=2, n_embd=16, block_size=12, vocab_size=vocab_size)
    if preset in ("one_head", "multi_head", "ffn", "bigram"):
        sizes["n_layer"] = 1
    if preset == "one_head":
        sizes["n_head"] = 1
    return GPTConfig.from_preset(preset, **{**sizes, **overrides})


def tiny_model(preset: str = "layernorm", seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny_config(preset, **overrides)).eval()


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.02) -> bool:
    """Poll predicate until it is true or the timeout passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def race(writers, readers, timeout: float = 60) -> list[Exception]:
    """Each writer once and each reader over and over until every writer is done, each on a
    thread of its own, the interpreter switching between threads as often as it can (a race
    shows within a few hundred tries); returns what they raised."""
    errors: list[Exception] = []

    def guarded(work, again):
        try:
            work()
            while again():
                work()
        except Exception as e:
            errors.append(e)

    def writers_busy() -> bool:
        return any(thread.is_alive() for thread in writing)

    writing = [threading.Thread(target=guarded, args=(w, lambda: False)) for w in writers]
    reading = [threading.Thread(target=guarded, args=(r, writers_busy)) for r in readers]
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for thread in writing + reading:
            thread.start()
        for thread in writing + reading:
            thread.join(timeout)
    finally:
        sys.setswitchinterval(switch)
    return errors


def threads_down_to(n: int, timeout: float) -> bool:
    """Wait until at most n threads run. A closed session's runner goes with a garbage collection,
    and the room's watcher thread ends within a second of the last runner it follows. The
    collections come a quarter of a second apart: back to back they hold the GIL that those
    threads need to end."""
    return wait_for(lambda: gc.collect() is not None and threading.active_count() <= n, timeout, interval=0.25)


@contextmanager
def as_session(session_id: str):
    """Make session-scoped caches (each session's threads) see this session id: AppTest gives
    every instance the same one."""
    original = cache_resource_api.get_session_id_or_throw
    cache_resource_api.get_session_id_or_throw = lambda: session_id
    try:
        yield
    finally:
        cache_resource_api.get_session_id_or_throw = original


def figure(at, i: int = 0) -> dict:
    """Plotly chart i of the page as a dict, with its base64 typed arrays decoded to numpy."""
    return _decode(json.loads(at.get("plotly_chart")[i].proto.spec))


def _decode(obj):
    if isinstance(obj, dict) and "bdata" in obj:
        data = np.frombuffer(base64.b64decode(obj["bdata"]), dtype=np.dtype(obj["dtype"]))
        shape = [int(n) for n in str(obj.get("shape", len(data))).split(",")]
        return data.reshape(shape)
    if isinstance(obj, dict):
        return {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    return obj


def rerun_until(at: AppTest, condition, session: str = "test session id", timeout: float = 60) -> bool:
    """AppTest never fires run_every: rerun (which reruns fragments inline) until condition(at)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with as_session(session):
            at.run()
        assert not at.exception, [e.value for e in at.exception]
        if condition(at):
            return True
        time.sleep(0.2)
    return False
