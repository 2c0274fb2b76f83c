"""The classroom's room: participants, the board of every training, and their checkpoints, kept
in SQLite and files so that a server restart loses nothing. Never imports streamlit.

    GPT_EXPLORER_ROOM_DIR     the room's folder (default runs/room/): room.db, checkpoints/, texts/
    GPT_EXPLORER_ROOM_MAX_MB  the room's disk cap (default 500); the teacher's page may set another

Any thread or process may use a room: each thread has its own connection, the database is in
WAL mode (readers never wait for the writer) and a writer waits up to BUSY_S for the lock.
A training reports through two paths that need only the runner interface the backends share:
`EvalReporter` (called with the Trainer after each evaluation, on the training's own thread or
worker) saves the checkpoint with its optimizer state and the val loss the server measures on
fixed windows; `RoomWatcher` copies `snapshot()` (status, steps, tokens/s, sample) into the
board and applies the teacher's stop requests.
"""

import csv
import hashlib
import io
import json
import os
import re
import secrets
import sqlite3
import threading
import time
import unicodedata
import weakref
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from core.checkpoint import paths, save_trainer
from core.experiments import val_loss, val_windows
from explorer.offpage.recipes import MAX_CAP, Limits, read_limits

ROOT = Path(__file__).resolve().parents[2]
ROOM_DIR_ENV = "GPT_EXPLORER_ROOM_DIR"
MAX_MB_ENV = "GPT_EXPLORER_ROOM_MAX_MB"
DEFAULT_MAX_MB = 500
BUSY_S = 10.0  # how long a writer waits for another's transaction before giving up
MAX_NAME = 30
SHAKESPEARE = "Tiny Shakespeare"
OWN_TEXT = "own text"
LIVE = ("idle", "queued", "running")  # idle: registered, its thread not started yet
ENDED = ("finished", "stopped", "failed")
CAPS = {"max_params": "largest model (parameters)", "max_iters": "steps of one training",
        "max_text_mb": "text to train on (MB)", "room_max_mb": "the room's disk (MB)"}

SCHEMA = """
CREATE TABLE IF NOT EXISTS participants (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL, name_key TEXT NOT NULL UNIQUE,
    seat_hash TEXT NOT NULL UNIQUE, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS trainings (
    id INTEGER PRIMARY KEY, participant INTEGER NOT NULL REFERENCES participants(id) ON DELETE CASCADE,
    run TEXT NOT NULL, recipe TEXT NOT NULL, shape TEXT NOT NULL, source TEXT NOT NULL,
    status TEXT NOT NULL, steps INTEGER NOT NULL DEFAULT 0, max_iters INTEGER NOT NULL,
    tokens_per_s REAL, val_loss REAL, saved_step INTEGER, sample TEXT NOT NULL DEFAULT '',
    note TEXT NOT NULL DEFAULT '', stop_requested INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS evals (
    training INTEGER NOT NULL REFERENCES trainings(id) ON DELETE CASCADE, step INTEGER NOT NULL,
    val_loss REAL NOT NULL, PRIMARY KEY (training, step));
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class RoomError(ValueError):
    """A room action that cannot be done; the message says why in a user's words."""


@dataclass(frozen=True)
class Participant:
    id: int
    name: str


@dataclass(frozen=True)
class Entry:
    """One training as the board shows it."""
    id: int
    participant: int
    name: str
    run: str
    recipe: str
    shape: str
    source: str
    status: str
    steps: int
    max_iters: int
    tokens_per_s: float | None
    val_loss: float | None
    saved_step: int | None
    sample: str
    note: str
    stop_requested: bool

    @property
    def live(self) -> bool:
        return self.status in LIVE

    @property
    def label(self) -> str:
        """Its name in a model picker: unique, since the participant's name is and ids are."""
        return f"{self.name}: {self.run} #{self.id}"


def room_dir() -> Path:
    return Path(os.environ.get(ROOM_DIR_ENV) or ROOT / "runs" / "room")


def clean_name(name: str) -> str:
    """A display name as the board keeps it: NFC, printable, single spaces, 1 to MAX_NAME characters."""
    text = " ".join("".join(ch for ch in unicodedata.normalize("NFC", str(name)) if ch.isprintable()).split())
    if not text:
        raise RoomError("type a name first (letters, digits, spaces: it is shown on the board)")
    if len(text) > MAX_NAME:
        raise RoomError(f"a name has at most {MAX_NAME} characters")
    return text


def name_key(name: str) -> str:
    """What makes two names the same: "Ada", "ada" and "Ａｄａ" (full-width) are one name."""
    return unicodedata.normalize("NFKC", name).casefold()


def _seat_hash(seat: str) -> str:
    return hashlib.sha256(seat.encode()).hexdigest()


def fixed_val_loss(model: torch.nn.Module, val: torch.Tensor) -> float:
    """The board's val loss: the fixed windows every experiment is judged on (core.experiments),
    at the model's own context, the same for every model of a text."""
    x, y = val_windows(val, min(model.config.block_size, len(val) - 1))
    device = next(model.parameters()).device
    return val_loss(model, x.to(device), y.to(device))


def checkpoint_bytes_needed(model: torch.nn.Module) -> int:
    """About what a checkpoint with its optimizer state takes: the weights and AdamW's two moments."""
    return 3 * sum(p.numel() * p.element_size() for p in model.parameters()) + 64_000


def _spreadsheet_safe(value):
    """A CSV cell a spreadsheet will not run: names may start with = + - @."""
    return f"'{value}" if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


class Room:
    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        for sub in ("checkpoints", "texts"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        self.db_path = self.folder / "room.db"
        self._local = threading.local()
        self._db().executescript(SCHEMA)

    # Connections ------------------------------------------------------------------------------
    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.db_path, timeout=BUSY_S, isolation_level=None)
            db.row_factory = sqlite3.Row
            db.execute(f"PRAGMA busy_timeout = {int(BUSY_S * 1000)}")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")  # in WAL mode: never corrupt, at worst the last commits lost
            db.execute("PRAGMA foreign_keys = ON")
            self._local.db = db
        return db

    @contextmanager
    def _write(self):
        db = self._db()
        db.execute("BEGIN IMMEDIATE")  # the write lock up front: two readers upgrading at once would deadlock
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    # Participants ------------------------------------------------------------------------------
    def join(self, name: str) -> tuple[Participant, str]:
        """A new participant and their seat: the secret that says who they are (its hash is stored)."""
        name = clean_name(name)
        seat = secrets.token_urlsafe(18)
        try:
            with self._write() as db:
                cur = db.execute("INSERT INTO participants (name, name_key, seat_hash, created) VALUES (?, ?, ?, ?)",
                                 (name, name_key(name), _seat_hash(seat), time.time()))
        except sqlite3.IntegrityError:
            raise RoomError(f"someone in the room is already called {name}: choose another name") from None
        return Participant(cur.lastrowid, name), seat

    def participant(self, seat: str | None) -> Participant | None:
        if not isinstance(seat, str) or not seat:
            return None
        row = self._db().execute("SELECT id, name FROM participants WHERE seat_hash = ?", (_seat_hash(seat),)).fetchone()
        return Participant(row["id"], row["name"]) if row else None

    def participants(self) -> list[Participant]:
        return [Participant(r["id"], r["name"]) for r in self._db().execute("SELECT id, name FROM participants ORDER BY id")]

    # Trainings ---------------------------------------------------------------------------------
    def add_training(self, participant: int, run: str, recipe: str, shape: str, max_iters: int,
                     text: str | None = None) -> int:
        """A new board row; text is the participant's own training text (None: Tiny Shakespeare),
        kept so the run can be measured and resumed after a restart."""
        data = text.encode("utf-8") if text is not None else b""
        self.check_room_for(len(data))
        now = time.time()
        with self._write() as db:
            cur = db.execute("INSERT INTO trainings (participant, run, recipe, shape, source, status, max_iters, created, "
                             "updated) VALUES (?, ?, ?, ?, ?, 'idle', ?, ?, ?)",
                             (participant, run, recipe, shape, SHAKESPEARE if text is None else OWN_TEXT, max_iters, now, now))
        if text is not None:
            self.text_path(cur.lastrowid).write_bytes(data)
        return cur.lastrowid

    def text_path(self, training: int) -> Path:
        return self.folder / "texts" / f"training-{training}.txt"

    def own_text(self, training: int) -> str | None:
        path = self.text_path(training)
        return path.read_text(encoding="utf-8") if path.is_file() else None

    def checkpoint_stem(self, training: int) -> Path:
        return self.folder / "checkpoints" / f"training-{training}"

    def update_progress(self, training: int, status: str, steps: int, max_iters: int, tokens_per_s: float | None,
                        sample: str, note: str | None = None) -> None:
        with self._write() as db:
            db.execute("UPDATE trainings SET status = ?, steps = ?, max_iters = ?, tokens_per_s = ?, sample = ?, "
                       "note = COALESCE(?, note), updated = ? WHERE id = ?",
                       (status, steps, max_iters, tokens_per_s, sample, note, time.time(), training))

    def set_status(self, training: int, status: str, note: str | None = None) -> None:
        with self._write() as db:
            db.execute("UPDATE trainings SET status = ?, note = COALESCE(?, note), stop_requested = 0, updated = ? "
                       "WHERE id = ?", (status, note, time.time(), training))

    def set_note(self, training: int, note: str) -> None:
        with self._write() as db:
            db.execute("UPDATE trainings SET note = ?, updated = ? WHERE id = ?", (note, time.time(), training))

    def record_eval(self, training: int, step: int, val_loss: float, saved: bool, note: str = "") -> None:
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO evals (training, step, val_loss) VALUES (?, ?, ?)", (training, step, val_loss))
            db.execute("UPDATE trainings SET val_loss = ?, steps = MAX(steps, ?), note = ?, updated = ?, "
                       "saved_step = CASE WHEN ? THEN ? ELSE saved_step END WHERE id = ?",
                       (val_loss, step, note, time.time(), saved, step, training))

    def save_eval(self, training: int, trainer) -> None:
        """After an evaluation: the server's own val loss, and the checkpoint with its optimizer
        state in place of the last one, unless that would take the room over its disk cap."""
        if self.training(training) is None:
            return  # removed by the teacher meanwhile
        loss = fixed_val_loss(trainer.model, trainer.corpus.splits["val"])
        step = trainer.record.iters
        stem = self.checkpoint_stem(training)
        kept = sum(p.stat().st_size for p in paths(stem) if p.is_file())  # replaced by this save
        try:
            self.check_room_for(checkpoint_bytes_needed(trainer.model) - kept)
        except RoomError as e:
            self.record_eval(training, step, loss, saved=False, note=f"checkpoint at step {step:,} not saved: {e}")
            return
        save_trainer(stem, trainer, extra={"room_training": training})
        self.record_eval(training, step, loss, saved=True)

    def training(self, training: int) -> Entry | None:
        rows = self._entries("WHERE t.id = ?", (training,))
        return rows[0] if rows else None

    def board(self) -> list[Entry]:
        """Every training, best val loss first; those without one yet last, newest first."""
        return self._entries("ORDER BY t.val_loss IS NULL, t.val_loss, t.id DESC", ())

    def _entries(self, tail: str, args: tuple) -> list[Entry]:
        rows = self._db().execute(
            "SELECT t.id, t.participant, p.name, t.run, t.recipe, t.shape, t.source, t.status, t.steps, t.max_iters, "
            "t.tokens_per_s, t.val_loss, t.saved_step, t.sample, t.note, t.stop_requested "
            f"FROM trainings t JOIN participants p ON p.id = t.participant {tail}", args).fetchall()
        return [Entry(*r[:-1], bool(r[-1])) for r in rows]

    def curves(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Each training's val loss at each evaluation: (steps, losses)."""
        rows = np.array(self._db().execute("SELECT training, step, val_loss FROM evals ORDER BY training, step").fetchall(),
                        dtype=np.float64).reshape(-1, 3)
        ids, starts = np.unique(rows[:, 0], return_index=True)
        return {int(i): (part[:, 1].astype(np.int64), part[:, 2].astype(np.float32))
                for i, part in zip(ids, np.split(rows, starts[1:]))}

    def request_stop(self, training: int) -> None:
        with self._write() as db:
            db.execute("UPDATE trainings SET stop_requested = 1 WHERE id = ?", (training,))

    def recover(self, live: set[int]) -> int:
        """At a server start: a training marked as running whose runner is not in this process
        was cut off by the restart. It keeps its last checkpoint; its owner may resume it."""
        with self._write() as db:
            ids = [r[0] for r in db.execute(f"SELECT id FROM trainings WHERE status IN ({','.join('?' * len(LIVE))})", LIVE)]
            cut = [i for i in ids if i not in live]
            db.executemany("UPDATE trainings SET status = 'interrupted', note = 'the server restarted', stop_requested = 0 "
                           "WHERE id = ?", [(i,) for i in cut])
        return len(cut)

    def remove(self, training: int) -> None:
        with self._write() as db:
            db.execute("DELETE FROM trainings WHERE id = ?", (training,))
        for path in (*paths(self.checkpoint_stem(training)), self.text_path(training)):
            path.unlink(missing_ok=True)

    def clear(self) -> None:
        """Everyone and everything out; the teacher's caps stay."""
        with self._write() as db:
            db.execute("DELETE FROM trainings")
            db.execute("DELETE FROM participants")
            db.execute("DELETE FROM settings WHERE key = 'push'")
        for sub in ("checkpoints", "texts"):
            for path in (self.folder / sub).iterdir():
                path.unlink()

    # Disk ----------------------------------------------------------------------------------------
    def disk_bytes(self) -> int:
        """The room's files, the database included."""
        return sum(p.stat().st_size for p in self.folder.rglob("*") if p.is_file())

    def max_bytes(self) -> int:
        mb = self.caps().get("room_max_mb")
        if mb is None:
            try:
                mb = int(os.environ.get(MAX_MB_ENV) or DEFAULT_MAX_MB)
            except ValueError:
                mb = DEFAULT_MAX_MB
        return mb * 1_000_000

    def check_room_for(self, more: int) -> None:
        used, cap = self.disk_bytes(), self.max_bytes()
        if used + more > cap:
            raise RoomError(f"the room's disk cap is reached ({used / 1e6:,.1f} MB used of {cap / 1e6:,.0f} MB): "
                            "ask the teacher to remove some trainings or raise the cap")

    # Settings: the teacher's caps and push ------------------------------------------------------
    def _setting(self, key: str):
        row = self._db().execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def _set(self, db: sqlite3.Connection, key: str, value) -> None:
        db.execute("INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)", (key, json.dumps(value)))

    def caps(self) -> dict[str, int]:
        return self._setting("caps") or {}

    def set_caps(self, **caps: int | None) -> None:
        """Caps for new trainings (None: back to the server's environment or default)."""
        for key, value in caps.items():
            if key not in CAPS or (value is not None and not (isinstance(value, int) and 1 <= value <= MAX_CAP)):
                raise RoomError(f"{key} must be a whole number from 1 to {MAX_CAP:,}")
        with self._write() as db:
            merged = {**(self._setting("caps") or {}), **caps}
            self._set(db, "caps", {k: v for k, v in merged.items() if v is not None})

    def limits(self) -> tuple[Limits, list[str]]:
        """read_limits() with the teacher's caps in place of the environment's."""
        limits, problems = read_limits()
        caps = self.caps()
        return replace(limits, max_params=caps.get("max_params", limits.max_params),
                       max_iters=caps.get("max_iters", limits.max_iters),
                       max_text_bytes=caps["max_text_mb"] * 1_000_000 if "max_text_mb" in caps else limits.max_text_bytes
                       ), problems

    def push(self, model: str, view: str, prompt: str = "", layer: int = 0, head: int = 0,
             training: int | None = None) -> int:
        """Show every participant a model (a picker label; training: the room's model it names),
        a prompt and a view; returns the push's number."""
        with self._write() as db:
            number = int((self._setting("push") or {}).get("id", 0)) + 1
            self._set(db, "push", dict(id=number, model=model, view=view, prompt=prompt, layer=layer, head=head,
                                       training=training))
        return number

    def latest_push(self) -> dict | None:
        return self._setting("push")

    # Export ----------------------------------------------------------------------------------------
    def board_csv(self) -> str:
        out = io.StringIO()
        w = csv.writer(out)
        w.writerow(["rank", "name", "run", "recipe", "shape", "source", "status", "steps", "max_iters", "tokens_per_s",
                    "val_loss", "checkpoint_step", "note"])
        for rank, e in enumerate(self.board(), 1):
            w.writerow([_spreadsheet_safe(v) for v in (rank, e.name, e.run, e.recipe, e.shape, e.source, e.status, e.steps,
                                                       e.max_iters, e.tokens_per_s, e.val_loss, e.saved_step, e.note)])
        return out.getvalue()

    def export_zip(self, out) -> None:
        """board.csv and every training's checkpoint (and own text) into one zip written to out."""
        with zipfile.ZipFile(out, "w") as z:
            z.writestr("board.csv", self.board_csv())
            for rank, e in enumerate(self.board(), 1):
                folder = f"{rank:03d}-{re.sub(r'[^A-Za-z0-9_-]+', '-', e.name).strip('-') or 'participant'}-{e.id}"
                for path in (*paths(self.checkpoint_stem(e.id)), self.text_path(e.id)):
                    if path.is_file():  # weights do not compress; the JSON and the text do
                        method = zipfile.ZIP_STORED if path.suffix == ".safetensors" else zipfile.ZIP_DEFLATED
                        z.write(path, f"{folder}/{path.name}", compress_type=method)


_ROOMS: dict[Path, Room] = {}
_ROOMS_LOCK = threading.Lock()


def open_room(folder: str | os.PathLike | None = None) -> Room:
    """The process's one Room for a folder (so its threads share their connections' cache)."""
    folder = Path(folder or room_dir()).resolve()
    with _ROOMS_LOCK:
        if folder not in _ROOMS:
            _ROOMS[folder] = Room(folder)
        return _ROOMS[folder]


class EvalReporter:
    """What a runner calls with its Trainer after each evaluation (see Room.save_eval). A
    failure here is noted on the board and never ends the training."""

    def __init__(self, folder: str | os.PathLike, training: int):
        self.folder, self.training = Path(folder), training

    def __call__(self, trainer) -> None:
        room = open_room(self.folder)
        try:
            room.save_eval(self.training, trainer)
        except Exception as e:
            try:
                room.set_note(self.training, f"not saved: {type(e).__name__}: {e}")
            except sqlite3.Error:
                pass


class RoomWatcher:
    """One per room and process: every `interval` seconds it copies each followed runner's
    snapshot() into the board, passes on the teacher's stop requests, and records how the
    training ended. Runners are held weakly (a closed tab's runner goes with its session); the
    thread ends when it has nothing left to follow."""

    def __init__(self, room: Room, interval: float = 1.0):
        self.room, self.interval = room, interval
        self._lock = threading.Lock()
        self._runners: dict[int, weakref.ref] = {}
        self._thread: threading.Thread | None = None

    def follow(self, training: int, runner) -> None:
        with self._lock:
            self._runners[training] = weakref.ref(runner)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="gpt-explorer-room", daemon=True)
                self._thread.start()

    def live(self) -> set[int]:
        with self._lock:
            return {i for i, ref in self._runners.items() if ref() is not None}

    def stop(self, training: int) -> None:
        with self._lock:
            runner = self._runners.get(training, lambda: None)()
        if runner is not None:
            runner.stop()

    def _loop(self) -> None:
        while True:
            with self._lock:
                if not self._runners:
                    self._thread = None
                    return
                followed = list(self._runners.items())
            self.sync(followed)
            time.sleep(self.interval)

    def sync(self, followed: list[tuple[int, weakref.ref]] | None = None) -> None:
        """One round (the thread's; a test may call it)."""
        if followed is None:
            with self._lock:
                followed = list(self._runners.items())
        for training, ref in followed:
            try:
                done = self._sync_one(training, ref())
            except sqlite3.Error:
                done = False  # the database was busy past BUSY_S: next round
            if done:
                with self._lock:
                    if self._runners.get(training) is ref:
                        del self._runners[training]

    def _sync_one(self, training: int, runner) -> bool:
        """True once there is nothing more to follow: the runner is gone, or its row is. An ended
        runner is still followed, since its owner may resume it."""
        entry = self.room.training(training)
        if runner is None or entry is None:
            if runner is not None:
                runner.stop()  # removed by the teacher
            elif entry is not None and entry.live:
                self.room.set_status(training, "stopped", note="its browser session ended")
            return True
        if entry.stop_requested and runner.alive:
            runner.stop()
        alive, p = runner.alive, runner.snapshot()
        status = p.status if p.status != "idle" else entry.status
        ended = not alive and status in ENDED
        sample = p.samples[-1][1] if p.samples else entry.sample
        tokens_per_s = p.tokens_per_s or None
        if (status, p.iters, tokens_per_s, sample) != (entry.status, entry.steps, entry.tokens_per_s, entry.sample):
            note = ("stopped by the teacher" if entry.stop_requested and status == "stopped" else p.message) if ended else ""
            self.room.update_progress(training, status, p.iters, p.max_iters, tokens_per_s, sample, note or None)
        if ended and entry.stop_requested:
            self.room.set_status(training, status)  # clears the request
        return False


_WATCHERS: dict[Path, RoomWatcher] = {}


def watcher(room: Room) -> RoomWatcher:
    with _ROOMS_LOCK:
        if room.folder not in _WATCHERS:
            _WATCHERS[room.folder] = RoomWatcher(room)
        return _WATCHERS[room.folder]
