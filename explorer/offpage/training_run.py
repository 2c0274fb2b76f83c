"""Live training for one browser session: a Trainer on a background thread.

The runner never calls st.*: it shares progress through plain Python data behind a lock, and
the page polls `snapshot()`. A server-wide `TrainingSlots` caps how many trainings run at
once (CPU cores, not the GIL, are the limit); the rest wait in a queue that shows each user
their place.
"""

import copy
import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from core.checkpoint import Checkpoint
from core.lens import patterns, run_with_cache
from core.trainer import Trainer

MAX_SNAPSHOTS = 60  # attention snapshots kept per run; older ones are thinned out


class TrainingSlots:
    """A first-come, first-served queue in front of `capacity` concurrent trainings."""

    def __init__(self, capacity: int):
        self.capacity = max(1, int(capacity))
        self._cond = threading.Condition()
        self._running: set[object] = set()
        self._waiting: list[object] = []

    def position(self, ticket) -> int:
        """0 while running, 1 for the next in line, ...; -1 if neither."""
        with self._cond:
            if ticket in self._running:
                return 0
            return self._waiting.index(ticket) + 1 if ticket in self._waiting else -1

    def acquire(self, ticket, cancelled: threading.Event) -> bool:
        """Wait for a slot; False if cancelled while waiting."""
        with self._cond:
            self._waiting.append(ticket)
            while not (len(self._running) < self.capacity and self._waiting[0] is ticket):
                if cancelled.is_set():
                    self._waiting.remove(ticket)
                    self._cond.notify_all()
                    return False
                self._cond.wait(timeout=0.1)
            self._waiting.pop(0)
            self._running.add(ticket)
            self._cond.notify_all()
            return True

    def release(self, ticket) -> None:
        with self._cond:
            self._running.discard(ticket)
            self._cond.notify_all()

    @property
    def running(self) -> int:
        with self._cond:
            return len(self._running)


@dataclass
class Progress:
    """What the page shows; copied out under the runner's lock."""
    status: str = "idle"  # idle, queued, running, finished, stopped, failed
    message: str = ""
    steps: list[dict] = field(default_factory=list)  # per-step rows: iter, loss, lr, ms_per_iter, tokens_per_s
    evals: list[dict] = field(default_factory=list)  # iter, train_loss, val_loss
    samples: list[tuple[int, str]] = field(default_factory=list)  # (iter, text)
    snapshots: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (iter, pattern (L, H, T, T) float16)
    iters: int = 0
    max_iters: int = 0
    tokens_per_s: float = 0.0


class TrainingRunner:
    """Owns one Trainer and the thread that advances it, for one browser session."""

    def __init__(self, trainer: Trainer, slots: TrainingSlots, probe_ids: list[int] | None = None,
                 sample_every: int = 200, snapshot_every: int = 50, sample_chars: int = 200, chunk: int = 10,
                 name: str = "training"):
        self.trainer, self.name = trainer, name
        self.room_reporter = None  # called with the Trainer after each evaluation: the room saves and measures there
        self.slots = slots
        self.probe = torch.tensor([probe_ids[: trainer.config.block_size]]) if probe_ids else None
        self.sample_every, self.snapshot_every = sample_every, snapshot_every
        self.sample_chars, self.chunk = sample_chars, chunk
        self._lock = threading.Lock()  # guards _progress: held for microseconds
        self._progress = Progress(max_iters=trainer.train_config.max_iters)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # Called from the page ---------------------------------------------------------------
    def start(self) -> None:
        """Start (or resume after a stop) on a new daemon thread."""
        if self.alive or self.trainer.diverged:
            return
        self._stop.clear()
        self._set(status="queued", message="")
        self._thread = threading.Thread(target=self._main, name="gpt-explorer-training", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to stop between steps. Cheap and non-blocking: safe from any thread."""
        self._stop.set()
        self.trainer.request_stop()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def snapshot(self) -> Progress:
        with self._lock:
            return copy.copy(self._progress)  # lists are only ever appended to or replaced

    def queue_position(self) -> int:
        return self.slots.position(self)

    def model_copy(self) -> torch.nn.Module:
        """A copy of the model for other views; the training thread keeps the original."""
        with self.trainer.lock:  # not while a step is half applied
            model = copy.deepcopy(self.trainer.model).cpu()
        return model.eval()

    def checkpoint(self) -> Checkpoint:
        """The model as it is now, with its vocabulary and record, for other views and downloads."""
        t = self.trainer
        return Checkpoint(self.model_copy(), t.corpus.tokenizer, t.train_config, copy.copy(t.record), self.name)

    # The thread: Trainer.train runs the loop, these callbacks report it ---------------------
    def _main(self) -> None:
        if not self.slots.acquire(self, self._stop):
            self._set(status="stopped", message="left the queue")
            return
        try:
            self._set(status="running")
            trainer = self.trainer
            if trainer.record.iters == 0:
                self._look()  # the untrained model's sample and heads, for the story from the start
            trainer.train(on_step=self._on_step, on_eval=self._on_eval, chunk=self.chunk,
                          pause_every=(self.sample_every, self.snapshot_every if self.probe is not None else 0))
            finished = trainer.record.iters >= trainer.train_config.max_iters
            status = "failed" if trainer.diverged else "finished" if finished else "stopped"
            self._set(status=status, message=trainer.stop_reason)
        except Exception as e:  # shown in this session; the server carries on
            self._set(status="failed", message=f"training failed: {type(e).__name__}: {e}")
        finally:
            self.slots.release(self)

    def _on_step(self, rows: list[dict]) -> None:
        if rows:
            with self._lock:
                p = self._progress
                p.steps = p.steps + rows
                p.iters = rows[-1]["iter"]
                p.tokens_per_s = float(np.median([r["tokens_per_s"] for r in rows]))
        if not self.trainer.diverged:  # NaN weights: nothing to sample or look at
            self._look()

    def _on_eval(self, losses: dict[str, float]) -> None:
        self._add("evals", dict(iter=self.trainer.record.iters, train_loss=losses["train"], val_loss=losses["val"]))
        if self.room_reporter is not None and not self.trainer.diverged:
            self.room_reporter(self.trainer)

    def _look(self) -> None:
        """Sample and snapshot attention when their intervals come round, and at the last step."""
        it = self.trainer.record.iters
        last = it >= self.trainer.train_config.max_iters
        if self.sample_every and (it % self.sample_every == 0 or last):
            self._add("samples", (it, self._sample()))
        if self.probe is not None and self.snapshot_every and (it % self.snapshot_every == 0 or last):
            self._add("snapshots", (it, self._attention()))

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

    def _add(self, name: str, item) -> None:
        with self._lock:
            items = getattr(self._progress, name) + [item]
            if name == "snapshots" and len(items) > MAX_SNAPSHOTS:
                items = items[::2]  # keep the story from first to last at half the resolution
            setattr(self._progress, name, items)

    def _set(self, **changes) -> None:
        with self._lock:
            for k, v in changes.items():
                setattr(self._progress, k, v)

