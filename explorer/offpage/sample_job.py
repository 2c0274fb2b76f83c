"""One Generate of the Sample view: a request written by the model's shared sampling engine
(core.engine) on its background thread, so the text streams in while the page stays usable and
a click elsewhere does not throw the sample away (a script run is stopped by any click).

The job never calls st.*; the Sample view polls `result()` while `alive`.
"""

from dataclasses import dataclass

import numpy as np

from core.engine import Engine


@dataclass
class Sample:
    model: str  # the picker's label of the model that wrote it
    prompt_ids: list[int]
    new_ids: list[int]
    probs: np.ndarray  # (n, vocab): the distribution each new character was drawn from


class SampleJob:
    """`length` characters after `prompt_ids` from `engine`'s model, with `settings` (temperature,
    top_k, top_p, seed, window) as Engine.submit takes them."""

    def __init__(self, engine: Engine, label: str, prompt_ids: list[int], length: int, settings: dict):
        self.label, self.prompt_ids, self.length = label, list(prompt_ids), length
        self._request = engine.submit(self.prompt_ids, length, **settings)
        self._vocab = engine.model.config.vocab_size

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
        return not self._request.done

    def result(self) -> Sample:
        """What it has written so far (all of it once it is no longer alive)."""
        new = list(self._request.new_ids)
        probs = self._request.probs[:len(new)]  # appended first: never shorter than new_ids
        return Sample(self.label, self.prompt_ids, new, np.stack(probs) if probs else np.zeros((0, self._vocab)))
