"""The live-training runner: progress, stop and resume, the queue, failures, no leftover threads."""

import threading
import time
from dataclasses import replace

import numpy as np
import pytest

from core import CharTokenizer, GPTConfig
from core import experiments as E
from core.data import Corpus
from core.trainer import TrainConfig, Trainer
from explorer.offpage.training_run import QUEUED_POLL_S, Progress, ProgressBook, TrainingRunner, TrainingSlots
from helpers import wait_for

TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 30


def make_runner(slots, max_iters=40, train=None, **kwargs) -> TrainingRunner:
    tok = CharTokenizer.from_text(TEXT)
    cfg = GPTConfig.from_preset("layernorm", vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=16, block_size=16)
    tcfg = TrainConfig(**{**dict(batch_size=4, max_iters=max_iters, eval_interval=20, eval_iters=2, warmup_iters=5),
                          **(train or {})})
    trainer = Trainer(cfg, tcfg, Corpus(TEXT, cfg.block_size, tok))
    defaults = dict(probe_ids=tok.encode("To be, or not"), sample_every=20, snapshot_every=10, sample_chars=20)
    return TrainingRunner(trainer, slots, **{**defaults, **kwargs})


@pytest.fixture
def slots():
    return TrainingSlots(capacity=1)


def test_a_run_reports_progress_to_the_end(slots):
    runner = make_runner(slots)
    runner.start()
    assert wait_for(lambda: not runner.alive)
    p = runner.snapshot()
    assert p.status == "finished" and "max_iters" in p.message
    assert [r["iter"] for r in p.steps] == list(range(1, 41))
    assert [e["iter"] for e in p.evals] == [0, 20, 40]
    assert p.evals[-1]["val_loss"] < p.evals[0]["val_loss"]
    assert [it for it, _ in p.samples] == [0, 20, 40] and all(len(text) == 20 for _, text in p.samples)
    its = [it for it, _ in p.snapshots]
    assert its == [0, 10, 20, 30, 40]
    pattern = p.snapshots[-1][1]
    assert pattern.shape == (2, 2, 13, 13) and pattern.dtype == np.float16
    np.testing.assert_allclose(pattern.astype(np.float32).sum(-1), 1.0, atol=1e-2)
    # Heads change as the model learns.
    assert not np.allclose(p.snapshots[0][1], p.snapshots[-1][1], atol=1e-3)


def test_stop_then_resume(slots):
    runner = make_runner(slots, max_iters=100_000, snapshot_every=0)
    runner.start()
    assert wait_for(lambda: runner.snapshot().iters >= 10)
    runner.stop()
    runner.join(10)
    stopped = runner.snapshot()
    assert stopped.status == "stopped" and 10 <= stopped.iters < 100_000
    assert slots.running == 0
    runner.start()  # resume on the same trainer
    assert wait_for(lambda: runner.snapshot().iters >= stopped.iters + 10)
    runner.stop()
    runner.join(10)
    steps = [r["iter"] for r in runner.snapshot().steps]
    assert steps == list(range(1, len(steps) + 1))  # no step lost or repeated


def test_the_cap_queues_a_second_run(slots):
    first = make_runner(slots, max_iters=100_000, snapshot_every=0, sample_every=0)
    second = make_runner(slots, max_iters=20, snapshot_every=0, sample_every=0)
    first.start()
    assert wait_for(lambda: first.queue_position() == 0)
    second.start()
    assert wait_for(lambda: second.snapshot().status == "queued" and second.queue_position() == 1)
    assert second.snapshot().iters == 0
    first.stop()
    assert wait_for(lambda: second.snapshot().status == "finished")
    first.join(10)


def test_leaving_the_queue(slots):
    first = make_runner(slots, max_iters=100_000, snapshot_every=0, sample_every=0)
    second = make_runner(slots, snapshot_every=0, sample_every=0)
    first.start()
    assert wait_for(lambda: first.queue_position() == 0)
    second.start()
    assert wait_for(lambda: second.queue_position() == 1)
    second.stop()
    second.join(10)
    assert second.snapshot().status == "stopped" and second.queue_position() == -1
    first.stop()
    first.join(10)
    assert slots.running == 0
    second.start()  # Resume after leaving the queue: the stop was the queue's, not the training's
    assert wait_for(lambda: not second.alive)
    assert second.snapshot().status == "finished" and second.snapshot().iters == 40


def test_a_failure_is_reported_and_frees_the_slot(slots, monkeypatch):
    runner = make_runner(slots)

    def broken(n):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(runner.trainer, "run", broken)
    runner.start()
    runner.join(10)
    p = runner.snapshot()
    assert p.status == "failed" and "out of memory" in p.message
    assert slots.running == 0


def test_divergence_fails_with_advice(slots):
    runner = make_runner(slots, snapshot_every=0, sample_every=0,
                         train=dict(learning_rate=1e6, min_lr=1e6, grad_clip=0, warmup_iters=0))
    runner.start()
    runner.join(20)
    p = runner.snapshot()
    assert p.status == "failed" and "lower learning rate" in p.message


def test_model_copy_is_independent(slots):
    runner = make_runner(slots, max_iters=5)
    copy = runner.model_copy()
    runner.start()
    runner.join(20)
    before = next(copy.parameters()).clone()
    assert not next(runner.trainer.model.parameters()).equal(before)  # training moved the original
    assert next(copy.parameters()).equal(before)


def test_threads_end_with_their_runs(slots):
    baseline = threading.active_count()
    runners = [make_runner(slots, max_iters=100_000, snapshot_every=0, sample_every=0) for _ in range(3)]
    for r in runners:
        r.start()
    assert threading.active_count() == baseline + 3
    for r in runners:
        r.stop()
    for r in runners:
        r.join(10)
    assert threading.active_count() == baseline


def test_the_forecast_serves_the_queue_in_order():
    slots = TrainingSlots(capacity=2)
    never = threading.Event()
    a, b, c, d = "a", "b", "c", "d"
    for ticket in (a, b):
        assert slots.acquire(ticket, never)
    waiting = [threading.Thread(target=slots.acquire, args=(t, never), daemon=True) for t in (c, d)]
    for i, thread in enumerate(waiting):
        thread.start()
        assert wait_for(lambda i=i: slots.waiting == i + 1)
    left = {a: 30.0, b: 10.0, c: 20.0, d: None}  # d's time is unknown: the median of the others
    starts, end = slots.forecast(left.get)
    assert starts == {c: 10.0, d: 30.0}  # c takes b's slot, d a's
    assert end == 50.0  # d ends last: 30 + 20
    assert slots.forecast(lambda t: None) is None
    slots.release(a)
    slots.release(b)
    for thread in waiting:
        thread.join(10)
    assert slots.running == 2 and slots.waiting == 0


def test_a_room_polls_more_seldom_as_it_grows():
    slots = TrainingSlots(capacity=2)
    never = threading.Event()
    assert slots.poll_seconds(polls_per_s=4) == 1.0  # alone: once a second
    for ticket in range(2):
        assert slots.acquire(ticket, never)
    leave = threading.Event()
    waiting = [threading.Thread(target=slots.acquire, args=(t, leave), daemon=True) for t in range(2, 32)]
    for thread in waiting:
        thread.start()
    assert wait_for(lambda: slots.waiting == 30)
    assert slots.poll_seconds(polls_per_s=4) == 1.0  # the 2 running pages: once a second each
    assert slots.poll_seconds(queued=True, polls_per_s=10) == QUEUED_POLL_S  # 30 waiting: 6 polls a second
    assert slots.poll_seconds(queued=True, polls_per_s=4) == 7.5  # 30 waiting, 4 polls a second together
    leave.set()
    slots.wake()  # the waiting sleep until something changes: whoever cancels says so
    for thread in waiting:
        thread.join(10)
    assert slots.waiting == 0
    big = TrainingSlots(capacity=40)
    for ticket in range(40):
        assert big.try_acquire(ticket)
    assert big.poll_seconds(polls_per_s=20) == 2.0  # 40 running: 20 polls a second together


def test_a_free_slot_is_taken_at_start_and_a_full_one_queues():
    slots = TrainingSlots(capacity=1)
    first, second = make_runner(slots, max_iters=400), make_runner(slots, max_iters=400)
    first.start()
    assert first.snapshot().status == "running" and slots.running == 1  # before its thread has run
    second.start()
    assert second.snapshot().status == "queued"
    assert not slots.try_acquire("third")  # a slot goes to the queue first, never past it
    for runner in (first, second):
        runner.stop()
        runner.join(10)
    assert slots.running == 0 and slots.waiting == 0


def test_a_queued_run_stopped_leaves_the_queue_at_once():
    slots = TrainingSlots(capacity=1)
    first, second = make_runner(slots, max_iters=100_000), make_runner(slots, max_iters=400)
    first.start()
    second.start()
    assert wait_for(lambda: slots.waiting == 1)
    began = time.monotonic()
    second.stop()
    second.join(5)  # its thread sleeps until woken: a stop that did not wake it would hang here
    assert not second.alive and time.monotonic() - began < 1.0
    assert second.snapshot().status == "stopped" and second.snapshot().message == "left the queue"
    assert slots.waiting == 0 and first.alive
    first.stop()
    first.join(10)
    assert slots.running == 0


def test_a_book_sends_only_what_is_new():
    runner = make_runner(TrainingSlots(1), max_iters=60)
    runner.start()
    runner.join(20)
    mirror, cursor = ProgressBook(Progress()), (0, 0, 0, -1, -1)
    whole = runner.book.snapshot()
    seen = 0
    for n in (7, 30, len(whole.steps)):  # three polls of a page on another machine
        source = ProgressBook(replace(whole, steps=whole.steps[:n], snapshots=whole.snapshots[: n // 10 + 1],
                                      head_scores=whole.head_scores[: n // 10 + 1]))
        news, cursor = source.since(cursor)
        assert news.steps == whole.steps[seen:n]
        mirror.merge(news)
        seen = n
    mine = mirror.snapshot()
    assert mine.steps == whole.steps and mine.evals == whole.evals and mine.samples == whole.samples
    assert [it for it, _ in mine.snapshots] == [it for it, _ in whole.snapshots]
    assert [r["iter"] for r in mine.head_scores] == [r["iter"] for r in whole.head_scores] == list(range(0, 61, 10))
    for got, sent in zip(mine.head_scores, whole.head_scores):
        np.testing.assert_array_equal(got["induction"], sent["induction"])
        np.testing.assert_array_equal(got["previous_token"], sent["previous_token"])
        assert got["icl_gap"] == sent["icl_gap"]
    assert mine.status == "finished" and mine.iters == 60


def test_every_snapshot_scores_the_heads_as_core_experiments_does():
    runner = make_runner(TrainingSlots(1), max_iters=20)
    runner.start()
    runner.join(20)
    p, model = runner.snapshot(), runner.trainer.model
    assert [r["iter"] for r in p.head_scores] == [it for it, _ in p.snapshots] == [0, 10, 20]
    last = p.head_scores[-1]
    assert last["induction"].shape == last["previous_token"].shape == (2, 2)
    np.testing.assert_allclose(last["induction"], E.induction_scores(model).numpy(), atol=1e-6)
    assert last["icl_gap"] == pytest.approx(E.icl_gap(model).gap, abs=1e-6)


def test_the_induction_step_is_the_first_score_over_the_threshold():
    rows = [dict(iter=it, induction=np.array([[0.0, score]])) for it, score in ((0, 0.01), (50, 0.35), (100, 0.2))]
    assert Progress(head_scores=rows).induction_step(0.3) == 50
    assert Progress(head_scores=rows).induction_step(0.5) is None


def test_a_stop_on_a_sample_step_is_not_looked_at_twice(slots):
    """Stopped at step 20, where a sample and a snapshot are due, then resumed: each step is
    sampled and snapshotted once (the resumed leg does not look again where the last one ended)."""
    runner = make_runner(slots, max_iters=40)
    live, on_step = runner.live, runner.live._on_step

    def stop_at_20(rows):
        on_step(rows)
        if runner.trainer.record.iters == 20 and live._on_step is stop_at_20:
            runner.trainer.request_stop()
            live._on_step = on_step  # once

    live._on_step = stop_at_20
    live.run()
    assert runner.snapshot().status == "stopped" and runner.trainer.record.iters == 20
    live.run()
    p = runner.snapshot()
    assert p.status == "finished"
    assert [it for it, _ in p.samples] == [0, 20, 40]
    assert [it for it, _ in p.snapshots] == [0, 10, 20, 30, 40]
