"""The room's database and files (explorer/offpage/classroom.py), without Streamlit: names, the board,
concurrent writers, checkpoints with the server's own val loss, the disk cap, recovery after a
restart, the watcher on the runner interface, caps and the export."""

import csv
import gc
import io
import threading
import zipfile

import pytest
import torch

from core.checkpoint import load_checkpoint, resume_trainer
from core.data import Corpus
from core.trainer import TrainConfig, Trainer
from explorer.offpage.classroom import (
    MAX_MB_ENV,
    OWN_TEXT,
    SHAKESPEARE,
    EvalReporter,
    Room,
    RoomError,
    RoomWatcher,
    clean_name,
    fixed_val_loss,
)
from explorer.offpage.recipes import read_limits
from explorer.offpage.training_run import Progress
from helpers import tiny_config, wait_for

TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 40


@pytest.fixture
def room(tmp_path) -> Room:
    return Room(tmp_path / "room")


def tiny_trainer(text: str = TEXT, max_iters: int = 20, **config) -> Trainer:
    corpus = Corpus(text, 16)
    cfg = tiny_config(vocab_size=corpus.tokenizer.vocab_size, block_size=16, **config)
    return Trainer(cfg, TrainConfig(batch_size=4, max_iters=max_iters, eval_interval=10, eval_iters=2, threads=1), corpus)


def a_training(room: Room, name: str = "Ada", text: str | None = None) -> int:
    me, _ = room.join(name)
    return room.add_training(me.id, "layernorm run 1", "1-minute demo", "layernorm 2×2×16, context 16", 20, text)


def test_names_are_cleaned_unique_in_the_room_and_seats_identify_their_owner(room):
    ada, seat = room.join("  Ada\u0000  Lovelace ")
    assert ada.name == "Ada Lovelace"  # control characters out, spaces single
    assert room.participant(seat) == ada
    assert room.participant("not a seat") is None and room.participant(None) is None
    for taken in ("ada lovelace", "ＡＤＡ Lovelace"):  # the same name by case or full-width letters
        with pytest.raises(RoomError, match="already called"):
            room.join(taken)
    for bad in ("", "   ", "x" * 31):
        with pytest.raises(RoomError):
            clean_name(bad)
    bobby, _ = room.join("<b>*Bobby*</b> [x](y)")  # kept as typed: the views escape it where shown
    assert bobby.name == "<b>*Bobby*</b> [x](y)"
    assert "seat" not in room.board_csv()


def test_the_board_ranks_by_val_loss_and_keeps_each_curve(room):
    ids = [a_training(room, name) for name in ("A", "B", "C")]
    room.record_eval(ids[0], 10, 2.5, saved=True)
    room.record_eval(ids[0], 20, 2.0, saved=True)
    room.record_eval(ids[2], 10, 1.5, saved=False, note="not saved")
    board = room.board()
    assert [e.name for e in board] == ["C", "A", "B"]  # no loss yet: last
    assert board[0].note == "not saved" and board[0].saved_step is None and board[1].saved_step == 20
    steps, losses = room.curves()[ids[0]]
    assert steps.tolist() == [10, 20] and losses.tolist() == [2.5, 2.0]
    assert ids[1] not in room.curves()


def test_many_sessions_write_at_once_from_threads(tmp_path):
    """Writers from 8 threads (the app's sessions, trainings and watcher) through one Room and a
    second Room on the same files (another process's view): every write lands, none fails."""
    first, second = Room(tmp_path / "room"), Room(tmp_path / "room")
    errors, n_threads, n_writes = [], 8, 25

    def writer(k: int) -> None:
        try:
            room = first if k % 2 else second
            me, _ = room.join(f"writer {k}")
            training = room.add_training(me.id, f"run {k}", "r", "s", n_writes, None)
            for i in range(1, n_writes + 1):
                room.update_progress(training, "running", i, n_writes, 1000.0 + i, f"sample {i}")
                room.record_eval(training, i, 3.0 - i / n_writes, saved=False)
                room.board()  # readers among the writers
        except Exception as e:  # reported below: an exception in a thread would pass unseen
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert first._db().execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    board = first.board()
    assert len(board) == n_threads and all(e.steps == n_writes for e in board)
    assert sum(len(steps) for steps, _ in first.curves().values()) == n_threads * n_writes


def test_an_evaluation_saves_a_resumable_checkpoint_and_the_servers_own_val_loss(room):
    training = a_training(room, text=TEXT)
    trainer = tiny_trainer()
    trainer.train(on_eval=lambda _: EvalReporter(room.folder, training)(trainer))
    entry = room.training(training)
    assert entry.source == OWN_TEXT and room.own_text(training) == TEXT
    assert entry.saved_step == 20 and entry.steps == 20
    assert entry.val_loss == pytest.approx(fixed_val_loss(trainer.model, trainer.corpus.splits["val"]))
    assert room.curves()[training][0].tolist() == [0, 10, 20]
    stem = room.checkpoint_stem(training)
    assert load_checkpoint(stem).record.iters == 20
    resumed = resume_trainer(stem, Corpus(TEXT, 16))  # the optimizer state came along
    assert resumed.record.iters == 20 and resumed.optimizer.state


def test_the_val_windows_are_the_same_for_every_model_and_fixed():
    trainer = tiny_trainer()
    val = trainer.corpus.splits["val"]
    assert fixed_val_loss(trainer.model, val) == fixed_val_loss(trainer.model, val)  # no random batches
    other = tiny_trainer(n_layer=1)
    assert fixed_val_loss(other.model, val) != fixed_val_loss(trainer.model, val)
    assert trainer.model.training  # left as it was


def test_a_save_past_the_disk_cap_is_refused_with_a_message(room, monkeypatch):
    training = a_training(room)
    monkeypatch.setenv(MAX_MB_ENV, "1")
    room.set_caps(room_max_mb=None)
    big = tiny_trainer(n_embd=128)  # about 2.4 MB with its optimizer state
    room.save_eval(training, big)
    entry = room.training(training)
    assert entry.saved_step is None and "disk cap" in entry.note and entry.val_loss is not None
    assert not list((room.folder / "checkpoints").iterdir())
    room.set_caps(room_max_mb=50)  # the teacher's cap wins over the environment's
    room.save_eval(training, big)
    assert room.training(training).saved_step == 0 and room.training(training).note == ""
    with pytest.raises(RoomError, match="disk cap"):
        room.set_caps(room_max_mb=1)
        room.add_training(entry.participant, "r", "r", "s", 10, "x" * 2_000_000)


def test_a_restart_marks_running_trainings_interrupted_but_not_live_ones(room):
    cut, live, done = (a_training(room, name) for name in ("cut", "live", "done"))
    for training in (cut, live):
        room.update_progress(training, "running", 5, 20, 100.0, "")
    room.update_progress(done, "finished", 20, 20, 100.0, "")
    assert room.recover(live={live}) == 1
    assert [room.training(t).status for t in (cut, live, done)] == ["interrupted", "running", "finished"]
    assert room.training(cut).note == "the server restarted"


class FakeRunner:
    """The runner interface every backend shares: start/stop/alive/snapshot()/checkpoint()/name."""

    def __init__(self):
        self.name, self.stopped, self.alive = "fake run", False, True
        self.progress = Progress(status="running", iters=7, max_iters=20, tokens_per_s=1234.0, samples=[(5, "hello")])

    def stop(self):
        self.stopped = True

    def snapshot(self):
        return self.progress


def test_the_watcher_copies_progress_and_passes_on_the_teachers_stop(room):
    training = a_training(room)
    runner = FakeRunner()
    w = RoomWatcher(room, interval=0.05)
    w.follow(training, runner)
    assert wait_for(lambda: room.training(training).steps == 7)
    e = room.training(training)
    assert (e.status, e.tokens_per_s, e.sample) == ("running", 1234.0, "hello")
    room.request_stop(training)
    assert wait_for(lambda: runner.stopped)
    runner.alive, runner.progress = False, Progress(status="stopped", iters=8, max_iters=20, message="stopped on request")
    assert wait_for(lambda: room.training(training).status == "stopped")
    assert wait_for(lambda: not room.training(training).stop_requested)
    assert room.training(training).note == "stopped by the teacher"
    runner = None  # the session ended and took its runner with it
    gc.collect()
    assert wait_for(lambda: w._thread is None)  # nothing left to follow: the thread ends
    assert w.live() == set()


def test_a_runner_whose_session_ended_mid_training_shows_stopped(room):
    training = a_training(room)
    runner = FakeRunner()
    w = RoomWatcher(room)
    w.follow(training, runner)
    w.sync()
    runner = None
    gc.collect()
    w.sync()
    assert room.training(training).status == "stopped" and "session ended" in room.training(training).note


def test_a_removed_training_stops_its_runner_and_loses_its_files(room):
    training = a_training(room, text=TEXT)
    room.save_eval(training, tiny_trainer())
    runner = FakeRunner()
    w = RoomWatcher(room)
    w.follow(training, runner)
    room.remove(training)
    w.sync()
    assert runner.stopped and room.training(training) is None
    assert not list((room.folder / "checkpoints").iterdir()) and not room.text_path(training).exists()


def test_the_teachers_caps_replace_the_environments(room, monkeypatch):
    monkeypatch.setenv("GPT_EXPLORER_MAX_ITERS", "3000")
    assert room.limits()[0] == read_limits()[0]
    room.set_caps(max_iters=200, max_params=5000, max_text_mb=2)
    limits, _ = room.limits()
    assert (limits.max_iters, limits.max_params, limits.max_text_bytes) == (200, 5000, 2_000_000)
    for bad in (dict(max_iters=0), dict(max_iters=2.5), dict(nonsense=3)):
        with pytest.raises(RoomError):
            room.set_caps(**bad)
    room.set_caps(max_iters=None)
    assert room.limits()[0].max_iters == 3000


def test_export_holds_the_board_and_every_checkpoint_and_clear_empties_the_room(room):
    training = a_training(room, name="=HYPERLINK(\"x\")")  # a spreadsheet formula as a name
    room.save_eval(training, tiny_trainer())
    other = a_training(room, name="Bo")
    buffer = io.BytesIO()
    room.export_zip(buffer)
    names = zipfile.ZipFile(buffer).namelist()
    assert "board.csv" in names
    assert {n.rsplit("/", 1)[1] for n in names if n.startswith("001-")} == {
        f"training-{training}.json", f"training-{training}.safetensors", f"training-{training}.state.safetensors"}
    rows = list(csv.DictReader(io.StringIO(zipfile.ZipFile(buffer).read("board.csv").decode())))
    assert [r["name"] for r in rows] == ["'=HYPERLINK(\"x\")", "Bo"]  # not run as a formula
    assert rows[1]["source"] == SHAKESPEARE
    room.push("tiny (pretrained)", "Attention", "hi", 0, 1)
    room.set_caps(max_iters=100)
    room.clear()
    assert room.board() == [] and room.participants() == [] and room.latest_push() is None
    assert not list((room.folder / "checkpoints").iterdir()) and room.training(other) is None
    assert room.caps() == {"max_iters": 100}  # the teacher's settings stay


def test_pushes_are_numbered(room):
    assert room.latest_push() is None
    assert room.push("a", "Attention") == 1 and room.push("b", "Sample", "ROMEO:", training=3) == 2
    assert room.latest_push() == dict(id=2, model="b", view="Sample", prompt="ROMEO:", layer=0, head=0, training=3)


def test_the_room_persists_across_room_objects(tmp_path):
    """What a restart does to the files: a new process opens the same folder."""
    room = Room(tmp_path / "room")
    training = a_training(room)
    room.save_eval(training, tiny_trainer())
    again = Room(tmp_path / "room")
    assert again.training(training).name == "Ada" and again.training(training).saved_step == 0
    assert torch.equal(load_checkpoint(again.checkpoint_stem(training)).model.token_embedding_table.weight,
                       load_checkpoint(room.checkpoint_stem(training)).model.token_embedding_table.weight)
