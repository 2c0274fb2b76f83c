"""Generates on a Ray worker: the characters the server's own engine writes, a stop that ends
one request, a worker killed mid-sample, and the Sample view on a server on Ray.

One local Ray instance with 2 CPUs serves the module; every wait is bounded.
"""

import itertools
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from test_app import generate, start

from core import GPT, CharTokenizer
from core.checkpoint import Checkpoint, load_checkpoint
from core.engine import Engine
from helpers import as_session, race, tiny_config, wait_for

ray = pytest.importorskip("ray")
from explorer.offpage import ray_sampling, ray_training  # noqa: E402  (needs ray)

TEXT = "To be, or not to be, that is the question:\n"
TIMEOUT = 120  # a worker's first start imports torch on a busy machine


@pytest.fixture(scope="module")
def local_ray():
    ray_training.start_ray(num_cpus=2)
    yield
    ray.shutdown()


FIRST_LOAD = """
import sys
from explorer.offpage.ray_sampling import SamplingHost
from core.checkpoint import load_checkpoint
SamplingHost()  # as Ray builds the actor
before = set(sys.modules)
load_checkpoint("pretrained/cpu-best.json")
print(sorted(set(sys.modules) - before))
"""


def test_a_new_sampling_host_has_made_torchs_first_calls_before_its_first_model():
    """The first model a process checks imports torch._dynamo, which the room's first Generate
    paid for in the room: the host's warm-up does it, at the server's first page view."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", FIRST_LOAD], cwd=root, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"  # loading the first model imported nothing


@pytest.fixture(scope="module")
def ckpt() -> Checkpoint:
    tokenizer = CharTokenizer.from_text(TEXT)
    torch.manual_seed(0)
    model = GPT(tiny_config("layernorm", vocab_size=tokenizer.vocab_size)).eval()
    return Checkpoint(model, tokenizer)


def written(request, n: int) -> bool:
    """Wait until the request has at least n characters here (a look at `done` fetches them)."""
    return wait_for(lambda: request.done or len(request.new_ids) >= n, timeout=TIMEOUT)


REQUESTS = [("To be", 40, dict(seed=1)), ("or not", 25, dict(seed=2, temperature=0.7, top_k=5)),
            ("question", 33, dict(seed=3, top_p=0.9, window="lecture"))]


def test_a_worker_writes_what_the_servers_engine_writes(local_ray, ckpt):
    remote, local = ray_sampling.RemoteEngine(ckpt, "same"), Engine(ckpt.model)
    ids = [ckpt.tokenizer.encode(p) for p, _, _ in REQUESTS]
    theirs = [remote.submit(i, n, **s) for i, (_, n, s) in zip(ids, REQUESTS)]
    ours = [local.submit(i, n, **s) for i, (_, n, s) in zip(ids, REQUESTS)]
    for r, q, (_, n, _) in zip(theirs, ours, REQUESTS):
        assert r.wait(TIMEOUT) and q.wait(TIMEOUT)
        assert r.error is None and len(r.new_ids) == n
        assert r.new_ids == q.new_ids
        np.testing.assert_allclose(np.stack(r.probs), np.stack(q.probs), atol=1e-6)


def test_trainings_yield_the_cpu_to_sampling(local_ray):
    """Both kinds of worker run below the server's priority; a room's trainings below the samples."""
    training = ray_training.HOSTS.borrow()[0]
    try:
        nice = {name: os.getpriority(os.PRIO_PROCESS, ray.get(actor.pid.remote()))
                for name, actor in (("training", training), ("sampling", ray_sampling.host()))}
    finally:
        ray_training.HOSTS.give_back(training, healthy=True)
    assert os.getpriority(os.PRIO_PROCESS, 0) < nice["sampling"] < nice["training"]


def test_the_sampling_worker_keeps_to_the_last_core(local_ray):
    """Beside the last training host, off the server's core (this process keeps every core)."""
    pid = ray.get(ray_sampling.host().pid.remote())
    assert os.sched_getaffinity(pid) == {max(os.sched_getaffinity(0))}


def test_a_room_generating_on_a_new_model_sends_it_once(local_ray, ckpt):
    remote = ray_sampling.RemoteEngine(ckpt, "room")
    requests = []
    burst = [threading.Thread(target=lambda s=s: requests.append(remote.submit([1], 30, seed=s))) for s in range(8)]
    for thread in burst:
        thread.start()
    for thread in burst:
        thread.join(TIMEOUT)
    assert len(requests) == 8 and all(r.wait(TIMEOUT) and len(r.new_ids) == 30 for r in requests)
    assert ray.get(ray_sampling.host().load_counts.remote())["room"] == 1  # one engine: written together


def test_a_generate_waits_for_nothing_on_the_worker(local_ray, ckpt, monkeypatch):
    """The page's script run sends the request (and the model, new to the worker) and goes on."""
    def no_waiting(*args, **kwargs):
        raise AssertionError("submit waited for the worker")

    remote = ray_sampling.RemoteEngine(ckpt, "no waiting")
    ray_sampling.host()
    with monkeypatch.context() as patch:
        patch.setattr(ray, "get", no_waiting)
        patch.setattr(ray, "wait", no_waiting)
        request = remote.submit([1], 30, seed=4)
    assert request.wait(TIMEOUT) and request.error is None and len(request.new_ids) == 30


def test_bad_settings_are_refused_before_anything_is_sent(local_ray, ckpt):
    remote = ray_sampling.RemoteEngine(ckpt, "bad")
    with pytest.raises(ValueError, match="temperature"):
        remote.submit([0], 10, temperature=-1.0)
    with pytest.raises(ValueError, match="prompt"):
        remote.submit([], 10)


def test_stop_ends_one_request_the_other_goes_on(local_ray, ckpt):
    remote = ray_sampling.RemoteEngine(ckpt, "stop")
    long, other = remote.submit([1, 2], 100_000, seed=1), remote.submit([3], 300, seed=2)
    assert written(long, 1)
    long.stop()
    assert long.wait(TIMEOUT) and other.wait(TIMEOUT)
    assert 0 < len(long.new_ids) < 100_000 and long.error is None
    assert len(other.new_ids) == 300 and other.error is None


def test_a_killed_worker_fails_its_request_and_the_next_generate_works(local_ray, ckpt):
    remote = ray_sampling.RemoteEngine(ckpt, "killed")
    doomed = remote.submit([1], 100_000)
    assert written(doomed, 1)
    ray.kill(ray_sampling.host())
    assert doomed.wait(TIMEOUT)
    assert "the sampling worker stopped" in doomed.error and "Generate again" in doomed.error
    again = remote.submit([1], 20)  # a new worker, which gets the model again
    assert again.wait(TIMEOUT) and again.error is None and len(again.new_ids) == 20


def test_the_sample_view_writes_on_a_worker(local_ray, pretrained, monkeypatch):
    monkeypatch.setenv("GPT_EXPLORER_WORKERS", "ray")
    at = start("sampling")
    at.slider(key="sample_length").set_value(20).run()
    text = generate(at).code[0].value
    ckpt = load_checkpoint(pretrained)
    ids = ckpt.tokenizer.encode("ROMEO:")
    alone = Engine(ckpt.model).submit(ids, 20, seed=0)
    assert alone.wait(TIMEOUT)
    assert text == ckpt.tokenizer.decode(ids + alone.new_ids)
    assert isinstance(at.session_state["sample_pick"], int)  # the inspection below the text ran
    from explorer.glue.session import session_threads

    with as_session("test session id"):
        assert isinstance(session_threads().sample._request, ray_sampling.RemoteRequest)


def test_a_room_fetching_while_others_generate_breaks_no_request(ckpt, monkeypatch):
    """The worker answers on several threads at once: a fetch that forgets a finished request
    while a Generate looks through the requests for old ones must not break that Generate (it
    did, once in a room of 30). Switches forced often, on a host built here, as Ray builds one."""
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # the host's settings: not this process's
    monkeypatch.setattr(ray_training, "keep_to_the_last_core", lambda: None)
    host = ray_sampling.SamplingHost()
    host.engines["room"] = Engine(ckpt.model)  # loaded: submit needs no checkpoint
    unfetched, ids = queue.SimpleQueue(), itertools.count()

    def submit():
        for _ in range(300):
            request_id = next(ids)
            host.submit("room", [None], request_id, [1], 1, dict(seed=request_id))
            unfetched.put(request_id)

    def fetch():
        try:
            request_id = unfetched.get(timeout=0.01)
        except queue.Empty:
            return
        if not host.since(request_id, 0)[2]:
            unfetched.put(request_id)  # not written yet: later

    errors = race(writers=[submit] * 3, readers=[fetch] * 3)
    assert not errors, errors[0]
    while not unfetched.empty():
        fetch()
    assert not host.requests  # every request fetched and forgotten


def test_a_request_that_outlives_its_ray_says_so(local_ray, ckpt):
    """Last in the module: it shuts Ray down."""
    request = ray_sampling.RemoteEngine(ckpt, "gone").submit([1], 100_000)
    assert written(request, 1)
    ray.shutdown()
    assert request.wait(TIMEOUT) and "the sampling worker stopped" in request.error
    request.stop()
    assert not ray.is_initialized()  # asking did not start a Ray of its own
