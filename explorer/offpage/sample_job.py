"""One Generate of the Sample view: a request written by the model's shared sampling engine
(core.engine) on its background thread, so the text streams in while the page stays usable and
a click elsewhere does not throw the sample away (a script run is stopped by any click).

The job never calls st.*; the Sample view polls `result()` while `alive`.
"""

import threading
import time
import weakref
from dataclasses import dataclass

import numpy as np

from core.engine import Engine
from explorer.offpage.polling import poll_seconds

SAMPLE_THREAD = "gpt-explorer-sample"  # the name of a model's sampling engine thread, in the server or on its worker
POLL_S = 0.5  # how often the page shows the characters written so far, where it writes alone


@dataclass
class Sample:
    model: str  # the picker's label of the model that wrote it
    prompt_ids: list[int]
    new_ids: list[int]
    probs: np.ndarray  # (n, vocab): the distribution each new character was drawn from


class SampleJob:
    """`length` characters after `prompt_ids` from `engine`'s model, with `settings` (temperature,
    top_k, top_p, seed, window) as Engine.submit takes them."""

    _all: "weakref.WeakSet[SampleJob]" = weakref.WeakSet()  # the server's, every session's
    _all_lock = threading.Lock()  # a WeakSet's iteration is Python code: another session's add may come mid-way

    def __init__(self, engine: Engine, label: str, prompt_ids: list[int], length: int, settings: dict):
        self.label, self.prompt_ids, self.length = label, list(prompt_ids), length
        self._request = engine.submit(self.prompt_ids, length, **settings)
        self._vocab = engine.model.config.vocab_size
        self._started, self._seen_done = time.monotonic(), False
        with SampleJob._all_lock:
            SampleJob._all.add(self)

    @classmethod
    def poll_seconds(cls) -> float:
        """How often a writing job's page shows its text: more seldom while the room samples at
        once. Counts the jobs not seen done by their pages (asking each would cost a call to a
        sampling worker) in the last minute (a page closed while it wrote never looks again)."""
        now = time.monotonic()
        with cls._all_lock:
            jobs = list(cls._all)
        writing = sum(not job._seen_done and now - job._started < 60 for job in jobs)
        return poll_seconds(writing, POLL_S)

    @property
    def error(self) -> str | None:
        error = self._request.error
        return f"Sampling failed: {error}" if error else None

    def stop(self) -> None:
        """End this sample after the engine's current step (the others go on). Safe from any thread."""
        self._request.stop()

    def join(self, timeout: float | None = None) -> None:
        self._request.wait(timeout)

    @property
    def alive(self) -> bool:
        self._seen_done = self._request.done
        return not self._seen_done

    def result(self) -> Sample:
        """What it has written so far (all of it once it is no longer alive)."""
        new = list(self._request.new_ids)
        probs = self._request.probs[:len(new)]  # appended first: never shorter than new_ids
        return Sample(self.label, self.prompt_ids, new, np.stack(probs) if probs else np.zeros((0, self._vocab)))
