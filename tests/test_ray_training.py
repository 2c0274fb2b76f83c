"""Trainings on Ray workers: the same result as a thread for the same settings, stop and resume,
a worker killed mid-training, and the Train view on Ray.

One local Ray instance with 2 CPUs serves the module; every wait is bounded.
"""

import os
import signal
import threading
import time

import pytest
import torch
from test_train_view import click, open_train, step

from core import CharTokenizer
from explorer.offpage.recipes import Settings, make_trainer, probe_ids
from explorer.offpage.training_run import TrainingRunner, TrainingSlots
from helpers import as_session, rerun_until, wait_for

ray = pytest.importorskip("ray")
from explorer.offpage import ray_training  # noqa: E402  (needs ray)

TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 30
SETTINGS = Settings(preset="layernorm", n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4, max_iters=1000,
                    eval_interval=50)  # long enough for a stop to land: a warm host trains 200 steps within a poll
WATCH = dict(sample_every=50, snapshot_every=25, sample_chars=20)
VOCAB = CharTokenizer.from_text(TEXT).vocab_size
TIMEOUT = 120  # a worker's first start imports torch on a busy machine


@pytest.fixture(scope="module")
def local_ray():
    ray_training.start_ray(num_cpus=2)
    assert wait_for(lambda: ray_training.HOSTS.idle == 2, timeout=TIMEOUT)  # warm with Ray: a host per CPU
    yield
    ray.shutdown()


def ray_runner(slots: TrainingSlots, settings: Settings = SETTINGS) -> ray_training.RayTrainingRunner:
    return ray_training.RayTrainingRunner(settings, TEXT, VOCAB, slots, name="ray run", **WATCH)


@pytest.fixture(scope="module")
def thread_run() -> TrainingRunner:
    """The reference: the same settings trained on a thread in this process, on one thread as a
    worker and the app's server train (a different thread count sums in another order)."""
    trainer = make_trainer(SETTINGS, TEXT, shakespeare=None)
    runner = TrainingRunner(trainer, TrainingSlots(1), probe_ids=probe_ids(trainer.corpus, SETTINGS.block_size), **WATCH)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runner.start()
        runner.join(TIMEOUT)
    finally:
        torch.set_num_threads(threads)
    assert runner.snapshot().status == "finished"
    return runner


def assert_same_training(runner, reference, stopped_at: int | None = None) -> None:
    p, q = runner.snapshot(), reference.snapshot()
    assert [r["iter"] for r in p.steps] == [r["iter"] for r in q.steps]
    assert [r["loss"] for r in p.steps] == [r["loss"] for r in q.steps]
    off_schedule = stopped_at is not None and stopped_at % SETTINGS.eval_interval != 0
    assert [e for e in p.evals if not (off_schedule and e["iter"] == stopped_at)] == q.evals  # a stop evaluates where it stopped
    assert p.samples == q.samples
    assert [it for it, _ in p.snapshots] == [it for it, _ in q.snapshots]
    mine, theirs = runner.checkpoint(), reference.checkpoint()
    assert mine.record.iters == theirs.record.iters == SETTINGS.max_iters
    for (name, a), (_, b) in zip(mine.model.state_dict().items(), theirs.model.state_dict().items()):
        assert a.equal(b), name


def test_a_ray_training_equals_a_thread_training(local_ray, thread_run):
    runner = ray_runner(TrainingSlots(2))
    runner.start()
    runner.join(TIMEOUT)
    assert not runner.alive
    p = runner.snapshot()
    assert p.status == "finished" and "max_iters" in p.message
    assert_same_training(runner, thread_run)
    weights, meta = runner.checkpoint_files()
    assert weights[:8] and b"gpt-explorer-checkpoint" in meta  # safetensors and JSON, ready to download


def test_stop_then_resume_on_a_new_worker_continues_exactly(local_ray, thread_run):
    slots = TrainingSlots(2)
    runner = ray_runner(slots)
    runner.start()
    assert wait_for(lambda: runner.snapshot().iters >= 20, timeout=TIMEOUT)
    runner.stop()
    runner.join(TIMEOUT)
    stopped = runner.snapshot()
    assert stopped.status == "stopped" and 20 <= stopped.iters < SETTINGS.max_iters
    assert runner.record.iters == stopped.iters and slots.running == 0
    runner.start()  # a new actor, from the weights and optimizer state of the first
    runner.join(TIMEOUT)
    assert runner.snapshot().status == "finished"
    assert_same_training(runner, thread_run, stopped.iters)  # no step lost, repeated or changed by the pause


def test_a_killed_worker_fails_only_its_own_training(local_ray):
    slots = TrainingSlots(2)
    doomed, other = ray_runner(slots, Settings(**{**vars(SETTINGS), "max_iters": 5000})), ray_runner(slots)
    doomed.start()
    other.start()
    assert wait_for(lambda: doomed.snapshot().iters > 0, timeout=TIMEOUT)
    os.kill(ray.get(doomed._actor.pid.remote(), timeout=TIMEOUT), signal.SIGKILL)  # as a crash in a native kernel
    doomed.join(TIMEOUT)
    p = doomed.snapshot()
    assert p.status == "failed" and p.message.startswith("the worker running this training stopped: ")
    assert "Reset to start again" in p.message
    assert doomed.weights_lost
    doomed.start()  # nothing to resume from
    assert not doomed.alive and slots.running <= 1
    other.join(TIMEOUT)
    assert other.snapshot().status == "finished"


def test_trainings_reuse_the_warm_workers_and_a_dead_one_is_replaced(local_ray):
    """A room's trainings run on the pool's processes, started once; a killed one is not lent again."""
    long = Settings(**{**vars(SETTINGS), "max_iters": 5000})

    def trained_on(runner, kill: bool = False) -> int:
        runner.start()
        assert wait_for(lambda: runner.snapshot().iters > 0, timeout=TIMEOUT)
        pid = ray.get(runner._actor.pid.remote(), timeout=TIMEOUT)
        os.kill(pid, signal.SIGKILL) if kill else runner.stop()
        runner.join(TIMEOUT)
        assert runner.snapshot().status == ("failed" if kill else "stopped")
        return pid

    slots = TrainingSlots(1)
    first, second = trained_on(ray_runner(slots, long)), trained_on(ray_runner(slots, long))
    assert first == second  # one process, two trainings
    dead = trained_on(ray_runner(slots, long), kill=True)
    assert trained_on(ray_runner(slots, long)) != dead


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores, Linux")
def test_each_host_keeps_a_core_of_its_own(local_ray):
    """A replaced host (the test above killed one) takes the core its predecessor left."""
    hosts = [ray_training.HOSTS.borrow()[0] for _ in range(2)]
    try:
        cores = [os.sched_getaffinity(ray.get(h.pid.remote(), timeout=TIMEOUT)) for h in hosts]
    finally:
        for h in hosts:
            ray_training.HOSTS.give_back(h, healthy=True)
    assert all(len(c) == 1 for c in cores) and cores[0] != cores[1], cores


# The Train view on Ray workers ------------------------------------------------------------


@pytest.fixture
def ray_app(local_ray, app_server, monkeypatch):
    monkeypatch.setenv("GPT_EXPLORER_WORKERS", "ray")


def test_a_ray_server_warms_its_workers_before_anyone_trains(local_ray, monkeypatch):
    from explorer.glue import train_setup
    from explorer.offpage import ray_sampling

    asked, sampling, up = [], [], threading.Event()

    def prepare(hosts=None):
        asked.append(hosts)
        return up

    monkeypatch.setattr(ray_training, "prepare", prepare)
    monkeypatch.setattr(ray_sampling, "warm", lambda: sampling.append("warm"))
    monkeypatch.setenv("GPT_EXPLORER_MAX_TRAININGS", "3")
    cores = os.sched_getaffinity(0)
    train_setup.prepare_workers()
    assert asked == [] and sampling == []  # threads: nothing to start
    monkeypatch.setenv("GPT_EXPLORER_WORKERS", "ray")
    train_setup.prepare_workers()
    assert asked == [3] and sampling == ["warm"]  # the trainings' hosts and the sampling worker
    assert os.sched_getaffinity(0) == cores  # Ray still starting: its daemons must inherit every core
    up.set()
    try:
        train_setup.prepare_workers()
        assert os.sched_getaffinity(0) == {min(cores)}  # up: the server keeps to the first core
        ray_training.keep_to_the_first_core()  # every page view asks: once is enough
    finally:
        ray_training._release_the_first_core()  # as when Ray shuts down
    assert os.sched_getaffinity(0) == cores


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux's CPU affinity")
def test_sessions_opening_their_first_page_at_once_give_the_server_all_its_cores_back(monkeypatch):
    """The room opens its first pages together, and each asks the server to keep to the first
    core once Ray is up: one that asked while another was pinning it took the one core for all
    the server had, and kept it there after Ray. The look at Ray made slow, so both ask at once."""
    cores = os.sched_getaffinity(0)
    monkeypatch.setattr(ray, "is_initialized", lambda: time.sleep(0.05) or True)
    asking = [threading.Thread(target=ray_training.keep_to_the_first_core) for _ in range(2)]
    try:
        for thread in asking:
            thread.start()
        for thread in asking:
            thread.join(10)
        assert os.sched_getaffinity(0) == {min(cores)}
    finally:
        ray_training._release_the_first_core()  # as when Ray shuts down
        released = os.sched_getaffinity(0)
        ray_training._pin(cores)  # whatever happened, the rest of the suite keeps every core
    assert released == cores


def test_the_train_view_trains_on_a_worker(ray_app):
    at = open_train(max_iters=200)
    click(at, "train_start")
    assert rerun_until(at, lambda a: step(a) > 0, timeout=TIMEOUT)
    assert rerun_until(at, lambda a: "Finished" in "".join(s.value for s in a.success), timeout=TIMEOUT)
    assert step(at) == 200
    # "Finished" shows a moment before the worker's thread has ended; the run after that publishes it.
    assert rerun_until(at, lambda a: a.sidebar.selectbox(key="model").value == "layernorm run 1 (trained here)",
                       timeout=TIMEOUT)
    assert at.get("download_button")


def test_the_train_view_says_a_worker_died_and_reset_works(ray_app):
    from explorer.glue.session import session_threads

    at = open_train(max_iters=5000)
    click(at, "train_start")
    assert rerun_until(at, lambda a: step(a) > 0, timeout=TIMEOUT)
    with as_session("test session id"):
        ray.kill(session_threads().runner._actor)
    assert rerun_until(at, lambda a: a.error, timeout=TIMEOUT)
    assert "the worker running this training stopped" in at.error[0].value
    assert not [o for o in at.sidebar.selectbox(key="model").options if o.endswith("(trained here)")]
    click(at, "train_reset")
    assert not at.button(key="train_start").disabled  # the form is back
