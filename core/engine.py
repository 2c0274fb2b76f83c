"""Batched sampling: one engine per loaded model writes the characters of every request at once.

A room of people pressing Generate on the same model would otherwise run one decode loop per
person, each a batch of one: dozens of tiny forwards fighting for the GIL and the cores. The
engine keeps every active request in a row of one preallocated `KVCache` and advances all of
them with one batched forward per new character. Each request keeps its own prompt length,
temperature, top-k, top-p and seeded generator, so its characters are the ones it would get
alone.

- A new request's prompt (all but its last token) is prefilled into a free row, alone
  (`kv.rows(i, i + 1)`); from the next step on its last token is fed with everyone else's.
- Rows are compacted when requests leave (the last row moves into the gap), so a step computes
  only active rows. At most `max_rows` rows are written at once; the rest wait in FIFO order.
- When a row's window of block_size positions is full it slides, alone:
  `window="fast"` (the project's) by half a block, re-prefilling that row once per half block;
  `window="lecture"` by one character, recomputing the whole window at every step, as the
  lecture's generate does (idx[:, -block_size:]): its exact characters, at its cost.

`Engine` runs the steps on one background thread per model, started by `submit` and ended
when no request is left; it never touches Streamlit. `stream` runs one request on the calling
thread (the command line).
"""

import threading
import time
from collections import deque
from collections.abc import Iterator

import numpy as np
import torch

from .model import GPT, GPTConfig, KVCache, _check_sampling, sample_rows

WINDOWS = ("fast", "lecture")
MAX_ROWS = 64  # rows of the shared cache: what bounds the engine's memory


class Request:
    """One sample being written. `new_ids` and `probs` grow as the engine writes (read them from
    any thread: `probs` is appended before `new_ids`, so it is never the shorter)."""

    def __init__(self, config: GPTConfig, prompt_ids: list[int], length: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0, window: str = "fast"):
        _check_sampling(length, temperature, top_k, top_p, config.vocab_size)
        if window not in WINDOWS:
            raise ValueError(f"window must be one of {WINDOWS}, got {window!r}")
        prompt_ids = [int(i) for i in prompt_ids]
        if not prompt_ids:
            raise ValueError("the prompt needs at least one token")
        if not all(0 <= i < config.vocab_size for i in prompt_ids):
            raise ValueError(f"prompt ids must be in [0, {config.vocab_size})")
        self.prompt_ids, self.length, self.window = prompt_ids, length, window
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.generator = torch.Generator().manual_seed(seed)
        self.new_ids: list[int] = []
        self.probs: list[np.ndarray] = []  # (vocab,) float32: the distribution each new character was drawn from
        self.error: str | None = None
        self.submitted, self.started, self.finished = time.monotonic(), None, None
        self._block = config.block_size
        self._context = prompt_ids[-self._block:]  # the newest tokens, the last one not yet fed
        self._cached = 0  # positions of this request's row filled in the cache
        self._stopped = threading.Event()
        self._done = threading.Event()
        self._on_stop = None  # the engine's, while the request waits for a row
        if length == 0:
            self._finish()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def stop(self) -> None:
        """End this request after the current step (others go on). Safe from any thread."""
        self._stopped.set()
        on_stop = self._on_stop  # read once: the engine clears it when it gives the request a row
        if on_stop is not None:
            on_stop(self)

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def _finish(self, error: str | None = None) -> None:
        if not self.done:
            self.error, self.finished = error, time.monotonic()
            self._done.set()

    def _fail(self, e: Exception) -> None:
        self._finish(f"{type(e).__name__}: {e}")

    def _add(self, token: int, probs: np.ndarray) -> None:
        self.probs.append(probs)
        self.new_ids.append(token)
        self._context.append(token)
        if len(self._context) > 2 * self._block:  # only the last block is ever read again
            del self._context[:-self._block]
        if len(self.new_ids) == self.length:
            self._finish()

    def _window(self) -> list[int]:
        """The tokens before the last one that the row must hold when its window is full."""
        keep = self._block if self.window == "lecture" else max(1, self._block // 2)
        return self._context[-keep:-1]


class Decoder:
    """The cache rows of the requests being written (row i holds rows[i]) and the step that
    advances all of them by one character. Not thread-safe: one thread drives it."""

    def __init__(self, model: GPT, max_rows: int = MAX_ROWS):
        self.model, self.max_rows = model, max_rows
        self.device = next(model.parameters()).device
        self.rows: list[Request] = []
        self._kv: KVCache | None = None
        self._views: dict[int, KVCache] = {}  # rows 0..n as one cache, for the batched step

    @property
    def capacity(self) -> int:
        return 0 if self._kv is None else self._kv.lengths.shape[0]

    def add(self, *requests: Request) -> None:
        """Give the requests the next free rows and prefill their prompts there (prompts of one
        length in one forward: a room pressing Generate on the default prompt)."""
        if len(self.rows) + len(requests) > self.max_rows:
            raise RuntimeError(f"all {self.max_rows} rows are in use")
        self._reserve(len(self.rows) + len(requests))
        first = len(self.rows)
        for request in requests:
            request.started = time.monotonic()
            self.rows.append(request)
        self._prefill({first + j: r._context[:-1] for j, r in enumerate(requests)})

    def step(self) -> None:
        """One character for every active row: full windows slide, then one batched forward of
        each row's newest token, then each row samples with its own settings."""
        self.compact()
        self._prefill({i: r._window() for i, r in enumerate(self.rows) if r._cached == self.model.config.block_size})
        self.compact()
        if not self.rows:
            return
        n = len(self.rows)
        idx = torch.tensor([[r._context[-1]] for r in self.rows], device=self.device)
        try:
            logits, _ = self.model(idx, kv=self._view(n))
        except Exception as e:  # nothing tells whose row broke a batched forward
            for r in self.rows:
                r._fail(e)
            return
        for r in self.rows:
            r._cached += 1
        live = [i for i, r in enumerate(self.rows) if not r._stopped.is_set()]
        if live:
            self._sample([self.rows[i] for i in live], logits[live, -1, :])
        self.compact()

    def _sample(self, rows: list[Request], logits: torch.Tensor) -> None:
        """Each row's next character, drawn with its own settings, in one batch."""
        try:
            tokens, probs = sample_rows(logits, [r.temperature for r in rows], [r.top_k for r in rows],
                                        [r.top_p for r in rows], [r.generator for r in rows])
        except Exception as e:  # nothing tells whose row broke the batch: each row alone then
            if len(rows) == 1:
                rows[0]._fail(e)
            else:
                for i, r in enumerate(rows):
                    self._sample([r], logits[i:i + 1])
            return
        finite = torch.isfinite(probs).all(dim=-1).tolist()
        for r, token, p, ok in zip(rows, tokens, probs.to(torch.float32).numpy(), finite):
            if ok:
                r._add(token, p.copy())
            else:
                r._finish("the model's probabilities are not finite (nan or inf): its weights may be broken")

    def compact(self) -> None:
        """Drop finished and stopped rows; the last row moves into each gap."""
        i = 0
        while i < len(self.rows):
            r = self.rows[i]
            if r._stopped.is_set():
                r._finish()
            if not r.done:
                i += 1
                continue
            last = len(self.rows) - 1
            if i != last:
                self._move(last, i)
                self.rows[i] = self.rows[last]
            self.rows.pop()

    def fail_all(self, e: Exception) -> None:
        for r in self.rows:
            r._fail(e)
        self.rows.clear()

    def _prefill(self, windows: dict[int, list[int]]) -> None:
        """Fill each row i with windows[i] from its start: one forward for the rows whose windows
        have one length. A failed forward is retried row by row, so it fails only its own."""
        by_length: dict[int, list[int]] = {}
        for i, ids in windows.items():
            by_length.setdefault(len(ids), []).append(i)
        for rows in by_length.values():
            try:
                self._fill(rows, [windows[i] for i in rows])
            except Exception as e:
                if len(rows) == 1:
                    self.rows[rows[0]]._fail(e)
                else:
                    for i in rows:
                        self._prefill({i: windows[i]})

    def _fill(self, rows: list[int], windows: list[list[int]]) -> None:
        kv, T = self._kv, len(windows[0])
        for i in rows:
            kv.lengths[i] = 0
            self.rows[i]._cached = T
        if T == 0:
            return
        idx = torch.tensor(windows, device=self.device)
        if rows == list(range(rows[0], rows[0] + len(rows))):
            self.model(idx, kv=kv.rows(rows[0], rows[0] + len(rows)))
            return
        scratch = KVCache(self.model, len(rows), positions=T)  # rows apart: filled together, then copied in
        self.model(idx, kv=scratch)
        kv.k[:, rows, :, :T], kv.v[:, rows, :, :T] = scratch.k, scratch.v
        kv.lengths[rows] = T

    def _move(self, src: int, dst: int) -> None:
        n = self.rows[src]._cached
        kv = self._kv
        kv.k[:, dst, :, :n] = kv.k[:, src, :, :n]
        kv.v[:, dst, :, :n] = kv.v[:, src, :, :n]
        kv.lengths[dst] = kv.lengths[src]

    def _reserve(self, n: int) -> None:
        """A cache of at least n rows, grown by doubling (up to max_rows) and allocated only then."""
        if n <= self.capacity:
            return
        old, used = self._kv, len(self.rows)
        self._kv = KVCache(self.model, min(self.max_rows, max(n, 2 * self.capacity, 4)))
        self._views.clear()
        if old is not None and used:
            self._kv.k[:, :used], self._kv.v[:, :used] = old.k[:, :used], old.v[:, :used]
            self._kv.lengths[:used] = old.lengths[:used]

    def _view(self, n: int) -> KVCache:
        if n not in self._views:
            self._views[n] = self._kv.rows(0, n)
        return self._views[n]


class Engine:
    """The sampling engine of one model: `submit` queues a request; a background thread admits
    up to max_rows of them and steps them together until none is left, then ends."""

    def __init__(self, model: GPT, max_rows: int = MAX_ROWS, thread_name: str = "gpt-explorer-sampler"):
        self.model, self.max_rows, self.thread_name = model, max_rows, thread_name
        self._waiting: deque[Request] = deque()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._decoder: Decoder | None = None

    def submit(self, prompt_ids: list[int], length: int, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, seed: int = 0, window: str = "fast") -> Request:
        """Queue a request (its settings are checked here: a ValueError for bad ones)."""
        request = Request(self.model.config, prompt_ids, length, temperature, top_k, top_p, seed, window)
        if request.done:
            return request
        with self._lock:
            request._on_stop = self._cancel
            self._waiting.append(request)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
                self._thread.start()
        return request

    @property
    def running(self) -> bool:
        return self._thread is not None

    @property
    def active(self) -> int:
        """Rows being written now."""
        decoder = self._decoder
        return len(decoder.rows) if decoder is not None else 0

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def capacity(self) -> int:
        """Rows the cache holds now (0 when idle: its memory is freed)."""
        decoder = self._decoder
        return decoder.capacity if decoder is not None else 0

    def _cancel(self, request: Request) -> None:
        """A request stopped while it waits leaves the queue now, not when its turn comes."""
        with self._lock:
            if request in self._waiting:
                self._waiting.remove(request)
                request._finish()

    def _run(self) -> None:
        decoder = self._decoder = Decoder(self.model, self.max_rows)
        try:
            with torch.no_grad():
                while self._admit(decoder):
                    decoder.step()
        except Exception as e:  # a bug of the engine's own: every request hears of it, the next submit starts afresh
            with self._lock:
                decoder.fail_all(e)
                while self._waiting:
                    self._waiting.popleft()._fail(e)
                self._thread = self._decoder = None

    def _admit(self, decoder: Decoder) -> bool:
        """Move waiting requests into free rows; False (and the thread ends) when none is left."""
        decoder.compact()
        admitted = []
        with self._lock:
            while self._waiting and len(decoder.rows) + len(admitted) < self.max_rows:
                request = self._waiting.popleft()
                request._on_stop = None
                admitted.append(request)
            if not decoder.rows and not admitted:
                self._thread = self._decoder = None
                return False
        if admitted:
            decoder.add(*admitted)
        return True


def stream(model: GPT, prompt_ids: list[int], length: int, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, seed: int = 0, window: str = "fast") -> Iterator[tuple[int, np.ndarray]]:
    """One request written on the calling thread: yield (token, its distribution) one at a time.
    The settings are checked on the first next(); a failure raises RuntimeError."""
    request = Request(model.config, prompt_ids, length, temperature, top_k, top_p, seed, window)
    decoder = Decoder(model, max_rows=1)
    with torch.no_grad():  # per call: a generator must not leave grad mode off for its caller between yields
        decoder.add(request)
    written = 0
    while written < len(request.new_ids) or not request.done:
        if written == len(request.new_ids):
            with torch.no_grad():
                decoder.step()
        while written < len(request.new_ids):
            yield request.new_ids[written], request.probs[written]
            written += 1
    if request.error:
        raise RuntimeError(request.error)
