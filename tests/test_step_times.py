"""What a training costs on the server, and the timed recipe sized from it: the step count that
fits a time, and a real live training of the sized recipe that lands near that time."""

import math
import threading
import time
from dataclasses import replace

import pytest
import torch

from core.data import Corpus
from explorer.offpage.recipes import RECIPE_SECONDS, RECIPES, Settings, make_trainer, probe_ids, watch
from explorer.offpage.step_times import FAILED, Costs, StepTimes, fit_steps, measure, run_seconds
from explorer.offpage.training_run import TrainingRunner, TrainingSlots
from helpers import wait_for

DEMO = RECIPES["1-minute demo"][1]


def test_run_seconds_counts_the_steps_evaluations_and_samples():
    costs = Costs(step_ms=20.0, eval_ms=300.0, look_ms=400.0)
    # Evaluations at 0, 50, ..., 200; samples (looks) at 0, 100 and 200.
    settings = Settings(max_iters=200, eval_interval=50)
    assert run_seconds(costs, settings) == pytest.approx((200 * 20 + 5 * 300 + 3 * 400) / 1000)
    # An evaluation and a look at the end of a run that stops between two of them.
    assert run_seconds(costs, replace(settings, max_iters=210)) == pytest.approx((210 * 20 + 6 * 300 + 4 * 400) / 1000)


def test_the_steps_that_fit_a_minute():
    costs = Costs(step_ms=20.0, eval_ms=300.0, look_ms=400.0)
    settings = Settings(eval_interval=100)
    steps = fit_steps(costs, settings, 60.0, 5000)
    # 100 steps cost 2 s + an evaluation and a sample (0.7 s); the start another 0.7 s.
    assert steps == 2190
    assert run_seconds(costs, replace(settings, max_iters=steps)) <= 60.0
    assert run_seconds(costs, replace(settings, max_iters=steps + 10)) > 60.0
    assert fit_steps(replace(costs, step_ms=10.0), settings, 60.0, 5000) > steps  # a faster server, more steps
    assert fit_steps(costs, settings, 60.0, 1000) == 1000  # never past the server's cap
    assert fit_steps(costs, settings, 0.1, 5000) == 10  # at least a few steps


def test_step_times_measure_once_per_key_on_a_thread_and_remember_failures():
    times = StepTimes()
    calls = []

    def measured():
        calls.append(1)
        return Costs(1.0, 2.0, 3.0)

    first = times.get("a", measured)
    assert first is None or first == Costs(1.0, 2.0, 3.0)  # None while it runs
    assert wait_for(lambda: times.get("a", measured) is not None)
    assert times.get("a", measured) == Costs(1.0, 2.0, 3.0) and len(calls) == 1

    def broken():
        raise RuntimeError("no")

    times.get("b", broken)
    assert wait_for(lambda: times.get("b", broken) is not None)
    assert times.get("b", broken) is FAILED and not FAILED.known and math.isnan(FAILED.step_ms)


def test_shapes_are_measured_one_at_a_time_and_only_the_newest_waiting():
    times = StepTimes()
    spans, started = {}, threading.Event()

    def measured(key, seconds=0.0):
        def run():
            start = time.perf_counter()
            started.set()
            time.sleep(seconds)
            spans[key] = (start, time.perf_counter())
            return Costs(1.0, 1.0, 1.0)
        return run

    times.get("first", measured("first", 0.3))
    assert started.wait(5)
    for key in ("older", "newer"):  # asked for while the first is measured: a form changed twice
        assert times.get(key, measured(key)) is None
    assert wait_for(lambda: times.get("newer", measured("newer")) is not None)
    assert list(spans) == ["first", "newer"]  # the older form's request was forgotten...
    assert wait_for(lambda: times.get("older", measured("older")) is not None)  # ...until asked for again
    order = sorted(spans, key=lambda k: spans[k][0])
    assert order == ["first", "newer", "older"]
    assert all(spans[a][1] <= spans[b][0] for a, b in zip(order, order[1:]))  # never two at once


def test_measure_times_every_part_of_a_live_training():
    settings = Settings(n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4, optimizer="muon")
    costs = measure(settings, vocab_size=30)
    assert costs.known and costs.step_ms > 0 and costs.eval_ms > 0 and costs.look_ms > 0


@pytest.fixture
def one_thread():
    """The app trains on one thread (explorer/app.py); so do these tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_the_sized_demo_lands_near_its_time(shakespeare):
    """The demo sized for a few seconds from costs measured here, then trained as the Train view
    trains it (TrainingRunner: evaluations, samples, snapshots): within 35% of the target (the
    better of two tries, as the machine is shared)."""
    assert "1-minute demo" in RECIPE_SECONDS
    target = 6.0
    corpus = Corpus(shakespeare, DEMO.block_size)
    errors = []
    for _ in range(2):
        costs = measure(DEMO, corpus.tokenizer.vocab_size)
        settings = replace(DEMO, max_iters=fit_steps(costs, DEMO, target, 5000))
        runner = TrainingRunner(make_trainer(settings, None, lambda block: corpus), TrainingSlots(1),
                                probe_ids=probe_ids(corpus, settings.block_size), **watch(settings.eval_interval))
        t0 = time.perf_counter()
        runner.start()
        runner.join()
        wall = time.perf_counter() - t0
        assert runner.snapshot().status == "finished", runner.snapshot().message
        errors.append(dict(error=abs(wall / target - 1), wall=wall, steps=settings.max_iters, costs=costs))
        if errors[-1]["error"] < 0.35:
            break
    assert min(e["error"] for e in errors) < 0.35, errors
