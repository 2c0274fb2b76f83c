"""Generates on a Ray worker: a server whose trainings are on Ray writes its sessions' samples in
a process of their own too. In the server's process the sampling engine takes turns at one
interpreter's lock with every page's script run, at each of its torch calls: in a room the
turns, not the sums, set how long a sample takes (benchmarks/README.md, the room).

One `SamplingHost` actor holds a sampling engine (core.engine) for each of the last few models
asked for: every Generate on one model is still written in one batch. A model's weights are put
in Ray's object store once, as checkpoint bytes (safetensors and JSON: loading them runs no
code). The page's side, `RemoteEngine`, takes Engine.submit's arguments and returns at once; its
requests fetch what the worker has written when the page looks at them, at most every PULL_S. A
worker that dies fails its requests with a message, and the next Generate starts a new one.
Nothing here calls st.*.
"""

import itertools
import os
import threading
import time
from collections import OrderedDict

import numpy as np
import ray
import torch
from ray.exceptions import RayTaskError

from core import GPT, CharTokenizer, GPTConfig
from core.checkpoint import Checkpoint, checkpoint_bytes, load_checkpoint_bytes
from core.engine import Engine, Request, stream
from explorer.offpage import ray_training
from explorer.offpage.ray_training import why_stopped
from explorer.offpage.sample_job import SAMPLE_THREAD

MODELS = 8  # engines a host keeps: the one asked for least recently goes first
PULL_S = 0.1  # a request asks its worker for news at most this often
FORGET_S = 600.0  # a request done this long ago that no page fetched is dropped


class SamplingHost:
    """The worker: engines by model key, and the requests they write by request id. A threaded
    actor, so news and stops are answered while the engines' threads write: its dictionaries
    are read and changed under its lock (calls run on several of Ray's threads at once)."""

    def __init__(self):
        torch.set_num_threads(1)  # as the server's own engine: a room's trainings have the other cores
        ray_training.keep_to_the_last_core()
        self.engines: OrderedDict[str, Engine] = OrderedDict()
        self.requests: dict[int, Request] = {}
        self.loads: dict[str, int] = {}
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self._warm_up()

    @staticmethod
    def _warm_up() -> None:
        """A tiny model loaded from its bytes and a few characters from it, before the host is
        asked for any (it starts at the server's first page view): torch's first calls are made
        here, not in the room's first Generate (the first model checked on the meta device
        imports torch._dynamo)."""
        model = GPT(GPTConfig(vocab_size=2, block_size=4, n_layer=1, n_head=1, n_embd=4))
        ckpt = load_checkpoint_bytes(*checkpoint_bytes(model, CharTokenizer("ab")))
        for _ in stream(ckpt.model, [0], 3):
            pass

    def pid(self) -> int:
        return os.getpid()

    def load_counts(self) -> dict[str, int]:
        """How often each model was loaded (again after it was dropped for others)."""
        with self._lock:
            return dict(self.loads)

    def submit(self, key: str, checkpoint: list, request_id: int, prompt_ids: list[int], length: int,
               settings: dict) -> None:
        """Queue the request on the model's engine, loaded first from `checkpoint` (a list holding
        the reference to its bytes, so Ray hands the reference over, not the bytes) if it is not here."""
        request = self._engine(key, checkpoint[0]).submit(prompt_ids, length, **settings)
        unread = time.monotonic() - FORGET_S  # done long ago, never fetched: its page was closed
        with self._lock:
            self.requests[request_id] = request
            for old in [i for i, r in self.requests.items() if r.done and r.finished < unread]:
                del self.requests[old]

    def _engine(self, key: str, checkpoint) -> Engine:
        """The model's engine; a room's first Generates on a new model load it once, together."""
        with self._lock:
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:
            with self._lock:
                if key in self.engines:
                    self.engines.move_to_end(key)
                    return self.engines[key]
            model = load_checkpoint_bytes(*ray.get(checkpoint)).model
            with self._lock:
                engine = self.engines[key] = Engine(model, thread_name=SAMPLE_THREAD)
                self.loads[key] = self.loads.get(key, 0) + 1
                idle = [k for k, e in self.engines.items() if not e.running and k != key]
                for k in idle[:max(0, len(self.engines) - MODELS)]:
                    del self.engines[k]
                return engine

    def since(self, request_id: int, n: int) -> tuple[list[int], np.ndarray, bool, str | None]:
        """What the request wrote from character n on, whether it is done, and its error. Once
        a done request's last characters are sent, it is forgotten."""
        with self._lock:
            request = self.requests[request_id]
            done = request.done  # read first: once done, the lists below are whole
            if done:
                del self.requests[request_id]
        new = request.new_ids[n:]
        probs = request.probs[n:n + len(new)]
        return new, np.stack(probs) if probs else np.zeros((0, 0), np.float32), done, request.error

    def stop(self, request_id: int) -> None:
        with self._lock:
            request = self.requests.get(request_id)
        if request is not None:
            request.stop()


_lock = threading.Lock()
_host = None
_under = None  # the Ray instance _host was started in (ray_training.prepare's event for it)
_request_ids = itertools.count()


def host():
    """The sampling worker, started with the server's first Generate (Ray with it, if need be)."""
    global _host, _under
    with _lock:
        instance = ray_training.prepare()
        if _host is None or _under is not instance:  # never started, or in a Ray shut down since
            ray_training.start_ray()
            _host, _under = ray.remote(SamplingHost).options(num_cpus=0, max_concurrency=8).remote(), instance
        return _host


def warm() -> None:
    """Start the worker in the background (a server on Ray, at its first page view): the
    room's first Generate finds it up. A failure waits for the Generate that needs it to tell.
    Cheap once it is up: every page view asks."""
    if _host is not None and _under is ray_training.prepare():
        return

    def start():
        try:
            host()
        except Exception:
            pass

    threading.Thread(target=start, name="gpt-explorer-sampling-host", daemon=True).start()


def _lost(dead) -> None:
    """That worker is gone: the next Generate starts another."""
    global _host
    with _lock:
        if _host is dead:
            _host = None


class RemoteEngine:
    """Engine.submit for a checkpoint's model, written on the sampling worker. A submit sends
    the request and returns: the worker loads the model first if need be, and the page's script
    run waits for neither."""

    def __init__(self, ckpt: Checkpoint, key: str):
        self.ckpt, self.key = ckpt, key
        self._sent = None  # (worker, reference to the checkpoint's bytes in Ray's object store)
        self._sent_lock = threading.Lock()  # a room's Generates on a new model put it there once

    @property
    def model(self):
        return self.ckpt.model

    def submit(self, prompt_ids: list[int], length: int, **settings) -> "RemoteRequest":
        """Raises ValueError for bad settings, as Engine.submit does (checked here, before
        anything is sent)."""
        local = Request(self.model.config, prompt_ids, length, **settings)
        if local.done:
            return local
        worker = host()
        request_id = next(_request_ids)
        queued = worker.submit.remote(self.key, [self._checkpoint(worker)], request_id, list(local.prompt_ids),
                                      length, settings)
        return RemoteRequest(worker, request_id, queued)

    def _checkpoint(self, worker):
        """The reference to the model's bytes (put once for each worker: a new one may be in a new Ray)."""
        with self._sent_lock:
            if self._sent is None or self._sent[0] is not worker:
                self._sent = worker, ray.put(checkpoint_bytes(self.ckpt.model, self.ckpt.tokenizer))
            return self._sent[1]


class RemoteRequest:
    """The parts of core.engine.Request a Sample job reads, mirrored from the worker."""

    def __init__(self, worker, request_id: int, queued=None):
        self._worker, self._id = worker, request_id
        self._queued = queued  # the worker's answer to submit, until it has come
        self.new_ids: list[int] = []
        self.probs: list[np.ndarray] = []
        self.error: str | None = None
        self._done = False
        self._pulled = 0.0
        self._pull_lock = threading.Lock()

    @classmethod
    def failed(cls, error: str) -> "RemoteRequest":
        request = cls(None, -1)
        request.error, request._done = error, True
        return request

    @property
    def done(self) -> bool:
        self._pull()
        return self._done

    def stop(self) -> None:
        if not self._done:
            try:
                _ask(self._worker.stop, self._id)
            except Exception:
                pass  # a dead worker has stopped it already: the next look says so

    def wait(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.done:
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(PULL_S)
        return True

    def _pull(self) -> None:
        with self._pull_lock:
            if self._done or time.monotonic() - self._pulled < PULL_S:
                return
            self._pulled = time.monotonic()
            try:
                if not self._is_queued():
                    return
                new, probs, done, error = _ask(self._worker.since, self._id, len(self.new_ids))
            except RayTaskError as e:  # the worker is up, submit failed there (since never raises)
                self.error, self._done = f"the sampling worker could not write it: {e.cause}", True
                return
            except Exception as e:
                _lost(self._worker)
                self.error, self._done = f"the sampling worker stopped ({why_stopped(e)}): Generate again", True
                return
            self.probs.extend(probs)  # before new_ids, as the engine appends: never the shorter
            self.new_ids.extend(new)
            self.error, self._done = error, done

    def _is_queued(self) -> bool:
        """Whether the worker has the request (it may be loading the model); raises what submit raised."""
        if self._queued is not None:
            if not ray.is_initialized():
                raise RuntimeError("Ray is no longer running")
            if not ray.wait([self._queued], timeout=0)[0]:
                return False
            ray.get(self._queued)
            self._queued = None
        return True


def _ask(method, *args):
    """A worker's answer. Raises RayError for a dead worker, RuntimeError where Ray was shut down
    since (a call would start a new instance of its own), and a call on a handle of an earlier
    instance raises a plain Exception."""
    if not ray.is_initialized():
        raise RuntimeError("Ray is no longer running")
    return ray.get(method.remote(*args))
