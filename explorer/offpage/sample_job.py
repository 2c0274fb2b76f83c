"""Sampling on a background thread: the text streams in while the page stays usable, and a
click elsewhere no longer throws the sample away (a script run is stopped by any click).

The job never calls st.*; the Sample view polls `result()` while `alive`.
"""

import threading
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Sample:
    model: str  # the picker's label of the model that wrote it
    prompt_ids: list[int]
    new_ids: list[int]
    probs: np.ndarray  # (n, vocab): the distribution each new character was drawn from


class SampleJob:
    """One Generate: `length` characters from `model` after `prompt_ids`, with `settings`
    (temperature, top_k, top_p, generator) passed to model.generate_stream."""

    def __init__(self, model: torch.nn.Module, label: str, prompt_ids: list[int], length: int, settings: dict):
        self.label, self.prompt_ids, self.length = label, list(prompt_ids), length
        self.error: str | None = None
        self._new: list[int] = []
        self._probs: list[np.ndarray] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(model, settings), name="gpt-explorer-sample",
                                        daemon=True)
        self._thread.start()

    def _run(self, model: torch.nn.Module, settings: dict) -> None:
        try:
            for token, p in model.generate_stream(torch.tensor([self.prompt_ids]), self.length, **settings):
                with self._lock:
                    self._new.append(int(token))
                    self._probs.append(p[0].numpy())
                if self._stop.is_set():
                    return
        except Exception as e:  # shown in this session; the server and the other sessions carry on
            self.error = f"Sampling failed: {type(e).__name__}: {e}"

    def stop(self) -> None:
        """Ask the thread to stop after its current character. Safe from any thread."""
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def result(self) -> Sample:
        """What it has written so far (all of it once it is no longer alive)."""
        with self._lock:
            new, probs = list(self._new), list(self._probs)
        vocab = probs[0].shape[0] if probs else 0
        return Sample(self.label, self.prompt_ids, new, np.stack(probs) if probs else np.zeros((0, vocab)))
