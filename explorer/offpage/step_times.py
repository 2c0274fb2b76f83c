"""How long a training step of each shape takes on this server, measured once per shape on a
background thread, so that no script run waits for the measurement (a large shape's steps take
seconds). Shared by every session; never calls st.*."""

import math
import threading
from collections.abc import Callable, Hashable


class StepTimes:
    def __init__(self):
        self._ms: dict[Hashable, float | None] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable, measure: Callable[[], float]) -> float | None:
        """The measured milliseconds for key; None while the measurement runs (the first call
        starts it). NaN if it failed: the shape cannot be timed (or trained) here."""
        with self._lock:
            if key in self._ms:
                return self._ms[key]
            self._ms[key] = None  # being measured
        threading.Thread(target=self._measure, args=(key, measure), name="gpt-explorer-step-timer", daemon=True).start()
        return None

    def _measure(self, key: Hashable, measure: Callable[[], float]) -> None:
        try:
            value = measure()
        except Exception:  # a shape this server cannot train: the Start button's checks say why
            value = math.nan
        with self._lock:
            self._ms[key] = value
