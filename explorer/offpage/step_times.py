"""What a training of each shape costs on this server, measured once per shape on a background
thread, so that no script run waits for the measurement (a large shape's steps take seconds);
and from those costs, how long a training takes and how many steps fit in a given time.
Shared by every session; never calls st.*."""

import math
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, replace

from core.trainer import time_step, timing_trainer
from explorer.offpage.recipes import Settings, probe_ids, watch
from explorer.offpage.training_run import LiveTraining, Progress, ProgressBook


@dataclass(frozen=True)
class Costs:
    """Milliseconds of each part of a live training (LiveTraining) of one shape on this server."""
    step_ms: float  # one optimizer step (core.trainer.time_step)
    eval_ms: float  # one loss estimate of eval_iters batches of each split
    look_ms: float  # one sample with an attention snapshot and the head scores

    @property
    def known(self) -> bool:
        return not math.isnan(self.step_ms)


FAILED = Costs(math.nan, math.nan, math.nan)  # a shape this server cannot time (or train)


def measure(settings: Settings, vocab_size: int) -> Costs:
    """The costs of a live training of these settings, on random characters: a few steps, then
    one step of a live run (the step, its evaluation and its look at the end) less the step and
    a separately timed evaluation."""
    config, train_config = settings.model_config(vocab_size), settings.train_config()
    step_ms = time_step(config, train_config)
    trainer = timing_trainer(config, train_config, max_iters=2)
    trainer.run(1)  # warm: the live run's step costs what the later ones do
    book = ProgressBook(Progress())
    live = LiveTraining(trainer, book, probe_ids(trainer.corpus, config.block_size), **watch(settings.eval_interval))
    t0 = time.perf_counter()
    live.run()
    whole_ms = 1000 * (time.perf_counter() - t0)
    if book.snapshot().status != "finished":
        raise RuntimeError(book.snapshot().message)
    t0 = time.perf_counter()
    trainer.estimate_loss()
    eval_ms = 1000 * (time.perf_counter() - t0)
    return Costs(step_ms, eval_ms, max(0.0, whole_ms - step_ms - eval_ms))


def run_seconds(costs: Costs, settings: Settings) -> float:
    """A live training's wall time: its steps, an evaluation at the start, every eval_interval
    and at the end, and a look at the start, at every sample and at the end. (The attention
    snapshots between samples, a tenth of a look each, are left out.)"""
    steps = settings.max_iters
    evals = 1 + math.ceil(steps / settings.eval_interval)
    looks = 1 + math.ceil(steps / watch(settings.eval_interval)["sample_every"])
    return (steps * costs.step_ms + evals * costs.eval_ms + looks * costs.look_ms) / 1000


def fit_steps(costs: Costs, settings: Settings, seconds: float, most: int) -> int:
    """The most steps, a multiple of 10 from 10 to `most`, whose live training (run_seconds)
    takes at most `seconds`."""
    sample_every = watch(settings.eval_interval)["sample_every"]
    per_step = costs.step_ms + costs.eval_ms / settings.eval_interval + costs.look_ms / sample_every
    steps = int((1000 * seconds - costs.eval_ms - costs.look_ms) / per_step) // 10 * 10
    steps = max(10, min(most // 10 * 10, steps))
    while steps > 10 and run_seconds(costs, replace(settings, max_iters=steps)) > seconds:  # the ceils' rounding up
        steps -= 10
    return steps


class StepTimes:
    """The costs of each shape, measured one shape at a time on one background thread (measurements
    side by side would slow each other, and the trainings). Of the requests waiting, only the
    newest is measured, the form as it is now: the older ones, for forms changed since, are
    forgotten, and measured if asked for again."""

    def __init__(self):
        self._costs: dict[Hashable, Costs | None] = {}
        self._queue: list[tuple[Hashable, Callable[[], Costs]]] = []
        self._worker: threading.Thread | None = None
        self._lock = threading.Lock()

    def get(self, key: Hashable, measure: Callable[[], Costs]) -> Costs | None:
        """The measured costs for key; None until they are measured (a call asks for them, if not
        yet asked). FAILED if the measurement failed: the shape cannot be timed (or trained) here."""
        with self._lock:
            if key in self._costs:
                return self._costs[key]
            self._costs[key] = None
            self._queue.append((key, measure))
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="gpt-explorer-step-timer", daemon=True)
                self._worker.start()
        return None

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._worker = None
                    return
                key, measure = self._queue.pop()
                for stale, _ in self._queue:
                    del self._costs[stale]
                self._queue.clear()
            try:
                value = measure()
            except Exception:  # a shape this server cannot train: the Start button's checks say why
                value = FAILED
            with self._lock:
                self._costs[key] = value
