"""Live training for one browser session, on a background thread or on a worker.

The progress a page shows lives in a `ProgressBook`, filled by the one set of callbacks in
`LiveTraining`, wherever the Trainer runs: in this process (`TrainingRunner`, a thread) or on
a Ray worker (explorer/offpage/ray_training.py, whose page-side proxy mirrors the worker's book).
Neither calls st.*; the page polls `snapshot()`. A server-wide `TrainingSlots` caps how many
trainings run at once (cores, not the GIL, are the limit); the rest wait in a queue that shows
each user their place and when they should start.
"""

import copy
import heapq
import statistics
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from core import experiments
from core.checkpoint import Checkpoint, checkpoint_bytes
from core.lens import patterns, run_with_cache
from core.trainer import Trainer
from explorer.offpage.polling import QUEUED_POLL_S, ROOM_POLLS_PER_S, poll_seconds

MAX_SNAPSHOTS = 60  # attention snapshots kept per run; older ones are thinned out
RECENT_STEPS = 20  # steps whose median time predicts the next ones
# Induction appears when a head's score reaches this: many times what even attention over half a
# block gives the one key induction asks for, and what the shipped Shakespeare checkpoints (which
# never learnt to copy) reach; the induction recipe's heads jump past it in a phase change, with
# the in-context gap, and level off above it; for contexts under 32 characters even attention
# comes within a factor of three of it (benchmarks/README.md).
INDUCTION_AT = 0.1
TRAINING_THREAD = "gpt-explorer-training"  # the name of a training's thread on the server


class TrainingSlots:
    """A first-come, first-served queue in front of `capacity` concurrent trainings."""

    def __init__(self, capacity: int):
        self.capacity = max(1, int(capacity))
        self._cond = threading.Condition()
        self._running: list[object] = []  # in the order they started
        self._waiting: list[object] = []

    def resize(self, capacity: int) -> None:
        """A cluster that grows (or shrinks) changes how many run at once; the queue stays."""
        with self._cond:
            self.capacity = max(1, int(capacity))
            self._cond.notify_all()

    def position(self, ticket) -> int:
        """0 while running, 1 for the next in line, ...; -1 if neither."""
        with self._cond:
            if ticket in self._running:
                return 0
            return self._waiting.index(ticket) + 1 if ticket in self._waiting else -1

    def try_acquire(self, ticket) -> bool:
        """A slot now, if one is free and nobody is waiting for it; False (and not queued) otherwise."""
        with self._cond:
            if self._waiting or len(self._running) >= self.capacity:
                return False
            self._running.append(ticket)
            return True

    def acquire(self, ticket, cancelled: threading.Event) -> bool:
        """Wait for a slot; False if cancelled while waiting (whoever sets `cancelled` calls
        `wake`: a room's queue is dozens of threads, which wake only when something changed)."""
        with self._cond:
            self._waiting.append(ticket)
            while not (len(self._running) < self.capacity and self._waiting[0] is ticket):
                if cancelled.is_set():
                    self._waiting.remove(ticket)
                    self._cond.notify_all()
                    return False
                self._cond.wait()
            self._waiting.pop(0)
            self._running.append(ticket)
            self._cond.notify_all()
            return True

    def release(self, ticket) -> None:
        with self._cond:
            if ticket in self._running:
                self._running.remove(ticket)
            self._cond.notify_all()

    def wake(self) -> None:
        """The waiting look again whether they were cancelled."""
        with self._cond:
            self._cond.notify_all()

    @property
    def running(self) -> int:
        with self._cond:
            return len(self._running)

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._waiting)

    def poll_seconds(self, queued: bool = False, polls_per_s: float = ROOM_POLLS_PER_S) -> float:
        """How often the page of a running training looks at it (once a second, alone), or of
        a queued one, whose place and start time change slowly (every QUEUED_POLL_S)."""
        if queued:
            return poll_seconds(self.waiting, QUEUED_POLL_S, polls_per_s)
        return poll_seconds(self.running, 1.0, polls_per_s)

    def forecast(self, seconds_left: Callable[[object], float | None]) -> tuple[dict[object, float], float] | None:
        """When each waiting ticket should start, and when the last training should end (seconds
        from now), if the slots keep serving the queue in order and each ticket takes
        seconds_left(ticket). A ticket whose time is unknown counts as the median of the known
        ones; None when none is known."""
        with self._cond:
            running, waiting, capacity = list(self._running), list(self._waiting), self.capacity
        times = {t: seconds_left(t) for t in running + waiting}
        known = [s for s in times.values() if s is not None]
        if not known:
            return None
        typical = statistics.median(known)
        free_at = sorted(times[t] if times[t] is not None else typical for t in running)[:capacity]
        free_at += [0.0] * (capacity - len(free_at))
        heapq.heapify(free_at)
        starts = {}
        for t in waiting:
            starts[t] = heapq.heappop(free_at)
            heapq.heappush(free_at, starts[t] + (times[t] if times[t] is not None else typical))
        return starts, max(free_at)


@dataclass
class Progress:
    """What the page shows; copied out under the book's lock."""
    status: str = "idle"  # idle, queued, running, finished, stopped, failed
    message: str = ""
    steps: list[dict] = field(default_factory=list)  # per-step rows: iter, loss, lr, ms_per_iter, tokens_per_s
    evals: list[dict] = field(default_factory=list)  # iter, train_loss, val_loss
    samples: list[tuple[int, str]] = field(default_factory=list)  # (iter, text)
    snapshots: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (iter, pattern (L, H, T, T) float16)
    # At each snapshot: iter, induction and previous_token ((L, H) float32 head scores), icl_gap (nats)
    head_scores: list[dict] = field(default_factory=list)
    iters: int = 0
    max_iters: int = 0
    tokens_per_s: float = 0.0

    def induction_step(self, threshold: float = INDUCTION_AT) -> int | None:
        """The first recorded step where some head's induction score reached threshold; None if none has."""
        return next((row["iter"] for row in self.head_scores if row["induction"].max() >= threshold), None)


# Rows of steps, evals and samples already read; the step of the last snapshot and of the last head scores
Cursor = tuple[int, int, int, int, int]


class ProgressBook:
    """One training's progress behind a lock (held for microseconds). Lists are only ever
    appended to or replaced, so a shallow copy is a consistent snapshot."""

    def __init__(self, progress: Progress):
        self._lock = threading.Lock()
        self._progress = progress

    def snapshot(self) -> Progress:
        with self._lock:
            return copy.copy(self._progress)

    def set(self, **changes) -> None:
        with self._lock:
            for k, v in changes.items():
                setattr(self._progress, k, v)

    def add_steps(self, rows: list[dict]) -> None:
        with self._lock:
            p = self._progress
            p.steps = p.steps + rows
            p.iters = rows[-1]["iter"]
            p.tokens_per_s = float(np.median([r["tokens_per_s"] for r in rows]))

    def add(self, name: str, item) -> None:
        with self._lock:
            items = getattr(self._progress, name) + [item]
            if name == "snapshots" and len(items) > MAX_SNAPSHOTS:
                items = items[::2]  # keep the story from first to last at half the resolution
            setattr(self._progress, name, items)

    def since(self, cursor: Cursor) -> tuple[Progress, Cursor]:
        """What was added after cursor (and the scalars as they are now), with the new cursor:
        what a page on another machine needs to catch up, and no more."""
        with self._lock:
            p = self._progress
            n_steps, n_evals, n_samples, last_snapshot, last_scores = cursor
            new = replace(p, steps=p.steps[n_steps:], evals=p.evals[n_evals:], samples=p.samples[n_samples:],
                          snapshots=[s for s in p.snapshots if s[0] > last_snapshot],
                          head_scores=[r for r in p.head_scores if r["iter"] > last_scores])
            last = p.snapshots[-1][0] if p.snapshots else last_snapshot
            scored = p.head_scores[-1]["iter"] if p.head_scores else last_scores
            return new, (len(p.steps), len(p.evals), len(p.samples), max(last, last_snapshot), max(scored, last_scores))

    def merge(self, new: Progress) -> None:
        """Append what `since` returned elsewhere, and take its scalars."""
        if new.steps:
            self.add_steps(new.steps)
        for item in new.evals:
            self.add("evals", item)
        for item in new.samples:
            self.add("samples", item)
        for item in new.snapshots:
            self.add("snapshots", item)
        for item in new.head_scores:
            self.add("head_scores", item)
        self.set(status=new.status, message=new.message, iters=new.iters, max_iters=new.max_iters,
                 tokens_per_s=new.tokens_per_s)


class LiveTraining:
    """Runs Trainer.train and reports it into a book: steps, evaluations, samples, attention
    snapshots and head scores. The only such bookkeeping; every backend runs its trainings through it."""

    def __init__(self, trainer: Trainer, book: ProgressBook, probe_ids: list[int] | None = None,
                 sample_every: int = 200, snapshot_every: int = 50, sample_chars: int = 200, chunk: int = 10,
                 reporter: Callable[[Trainer], None] | None = None):
        self.trainer, self.book = trainer, book
        self.reporter = reporter  # called with the Trainer after each evaluation (the room saves and measures there)
        self.probe = torch.tensor([probe_ids[: trainer.config.block_size]]) if probe_ids else None
        self.sample_every, self.snapshot_every = sample_every, snapshot_every
        self.sample_chars, self.chunk = sample_chars, chunk
        self._val_x: torch.Tensor | None = None  # the validation windows the previous-token scores read

    def run(self) -> None:
        """Train until the end or a stop; the book says how it ended. Never raises: a failure is
        shown to its session and the server carries on."""
        trainer = self.trainer
        try:
            if trainer.record.iters == 0:
                self._look()  # the untrained model's sample and heads, for the story from the start
            trainer.train(on_step=self._on_step, on_eval=self._on_eval, chunk=self.chunk,
                          pause_every=(self.sample_every, self.snapshot_every if self.probe is not None else 0))
            finished = trainer.record.iters >= trainer.train_config.max_iters
            status = "failed" if trainer.diverged else "finished" if finished else "stopped"
            self.book.set(status=status, message=trainer.stop_reason)
        except Exception as e:
            self.book.set(status="failed", message=f"training failed: {type(e).__name__}: {e}")

    def _on_step(self, rows: list[dict]) -> None:
        if not rows:  # a stop before this chunk's first step: this step was looked at already
            return
        self.book.add_steps(rows)
        if not self.trainer.diverged:  # NaN weights: nothing to sample or look at
            self._look()

    def _on_eval(self, losses: dict[str, float]) -> None:
        self.book.add("evals", dict(iter=self.trainer.record.iters, train_loss=losses["train"], val_loss=losses["val"]))
        if self.reporter is not None and not self.trainer.diverged:
            self.reporter(self.trainer)

    def _look(self) -> None:
        """Sample and snapshot attention when their intervals come round, and at the last step."""
        it = self.trainer.record.iters
        last = it >= self.trainer.train_config.max_iters
        if self.sample_every and (it % self.sample_every == 0 or last):
            self.book.add("samples", (it, self._sample()))
        if self.probe is not None and self.snapshot_every and (it % self.snapshot_every == 0 or last):
            self.book.add("snapshots", (it, self._attention()))
            if self.trainer.config.attention:  # the bigram model has no heads to score
                self.book.add("head_scores", self._head_scores(it))

    def _sample(self) -> str:
        model, tok = self.trainer.model, self.trainer.corpus.tokenizer
        model.eval()
        start = torch.tensor([[tok.stoi.get("\n", 0)]], device=self.trainer.device)
        out = model.generate(start, self.sample_chars, generator=torch.Generator().manual_seed(0))
        model.train()
        return tok.decode(out[0, 1:].tolist())

    def _attention(self) -> np.ndarray:
        if not self.trainer.config.attention:
            return np.zeros((0,), dtype=np.float16)
        _, cache = run_with_cache(self.trainer.model, self.probe.to(self.trainer.device))
        return patterns(cache).cpu().numpy().astype(np.float16)  # (L, H, T, T)

    def _head_scores(self, it: int) -> dict:
        """Each head's induction and previous-token score, and the in-context gap: two forward
        passes on the induction probe and one on a batch of validation windows."""
        model = self.trainer.model
        if self._val_x is None:
            self._val_x = experiments.val_windows(self.trainer.corpus, self.trainer.config.block_size)[0]
        types = experiments.head_types(model, self._val_x.to(self.trainer.device))
        return dict(iter=it, induction=types["induction"].cpu().numpy().astype(np.float32),
                    previous_token=types["previous_token"].cpu().numpy().astype(np.float32),
                    icl_gap=experiments.icl_gap(model).gap)


class Runner:
    """What the page drives, whichever backend trains: start (or resume), stop, join, the
    progress, the place in the queue. A subclass trains in `_train` once a slot is free."""

    def __init__(self, slots: TrainingSlots, name: str, max_iters: int, step_ms: float | None):
        self.slots, self.name = slots, name
        self.step_ms = step_ms  # measured before the start (core.trainer.time_step): the queue's forecast
        self.book = ProgressBook(Progress(max_iters=max_iters))
        self.room_reporter: Callable | None = None  # set by the room: LiveTraining.reporter, wherever it trains
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start (or resume after a stop) on a new daemon thread."""
        if self.alive or self.weights_lost:
            return
        self._stop.clear()
        slot = self.slots.try_acquire(self)  # a free slot is taken now: the page that started it sees it running
        self.book.set(status="running" if slot else "queued", message="")
        self._thread = threading.Thread(target=self._main, args=(slot,), name=TRAINING_THREAD, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ask the training to stop between steps. Cheap and non-blocking: safe from any thread."""
        self._stop.set()
        self.slots.wake()
        self._request_stop()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def snapshot(self) -> Progress:
        return self.book.snapshot()

    def queue_position(self) -> int:
        return self.slots.position(self)

    def seconds_left(self) -> float | None:
        """Steps left times the recent step time (or, before any step, the measured one)."""
        p = self.snapshot()
        recent = [r["ms_per_iter"] for r in p.steps[-RECENT_STEPS:]]
        ms = statistics.median(recent) if recent else self.step_ms
        if ms is None or ms != ms:
            return None
        return max(0, p.max_iters - p.iters) * ms / 1000

    def checkpoint_files(self) -> tuple[bytes, bytes]:
        """(NAME.safetensors, NAME.json) of the model as it is now, for a download."""
        ckpt = self.checkpoint()
        return checkpoint_bytes(ckpt.model, ckpt.tokenizer, ckpt.train_config, ckpt.record)

    def _main(self, slot: bool) -> None:
        if not (slot or self.slots.acquire(self, self._stop)):
            self.book.set(status="stopped", message="left the queue")
            return
        try:
            self.book.set(status="running")  # a worker may take seconds to start: no longer in the queue
            self._train()
        finally:
            self.slots.release(self)

    # A backend provides: _train, _request_stop, checkpoint, config, train_config, record, weights_lost.


class TrainingRunner(Runner):
    """One Trainer and the thread that advances it, in the server's process."""

    def __init__(self, trainer: Trainer, slots: TrainingSlots, probe_ids: list[int] | None = None,
                 sample_every: int = 200, snapshot_every: int = 50, sample_chars: int = 200, chunk: int = 10,
                 name: str = "training", step_ms: float | None = None):
        super().__init__(slots, name, trainer.train_config.max_iters, step_ms)
        self.trainer = trainer
        self.live = LiveTraining(trainer, self.book, probe_ids, sample_every, snapshot_every, sample_chars, chunk)
        self._training = False

    @property
    def config(self):
        return self.trainer.config

    @property
    def train_config(self):
        return self.trainer.train_config

    @property
    def record(self):
        return self.trainer.record

    @property
    def weights_lost(self) -> bool:
        """Nothing to resume or publish: the loss diverged (NaN weights)."""
        return self.trainer.diverged

    def model_copy(self) -> torch.nn.Module:
        """A copy of the model for other views; the training thread keeps the original."""
        with self.trainer.lock:  # not while a step is half applied
            model = copy.deepcopy(self.trainer.model).cpu()
        return model.eval()

    def checkpoint(self) -> Checkpoint:
        """The model as it is now, with its vocabulary and record, for other views and downloads."""
        t = self.trainer
        return Checkpoint(self.model_copy(), t.corpus.tokenizer, t.train_config, copy.copy(t.record), self.name)

    def _train(self) -> None:
        self.live.reporter = self.room_reporter
        self._training = True
        try:
            if self._stop.is_set():  # a stop that came before the slot did
                self.trainer.request_stop()
            self.live.run()
        finally:
            self._training = False

    def _request_stop(self) -> None:
        if self._training:  # a stop while queued is the queue's: it must not stop the next Resume at once
            self.trainer.request_stop()
