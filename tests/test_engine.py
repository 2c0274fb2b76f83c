"""The batched sampling engine: every request writes exactly what it writes alone, whoever joins
or leaves beside it; the lecture's window writes the lecture's characters; memory is bounded.

The models here run in float64: a batch of rows (or a prompt prefilled apart from its last token)
sums in another order than one row alone, and in float32 that can flip a near tie between two
characters. In float64 it does not, so any difference is a bug."""

import weakref

import pytest
import torch
from torch.nn import functional as F

from benchmarks.reference import lecture_generate
from core import engine
from core.engine import Decoder, Engine, Request, stream
from explorer.offpage.polling import ROOM_POLLS_PER_S
from explorer.offpage.sample_job import POLL_S, SampleJob
from helpers import race, tiny_model, wait_for

# (prompt, length, temperature, top_k, top_p, seed, window): prompts shorter than, equal to and
# longer than the block (12), lengths that slide the window several times.
SETTINGS = [
    ([1], 40, 1.0, None, None, 0, "fast"),
    ([3, 4, 5, 6, 7], 35, 0.0, None, None, 1, "fast"),
    (list(range(12)), 30, 0.8, 5, None, 2, "fast"),
    (list(range(1, 20)), 45, 1.3, None, 0.9, 3, "fast"),
    ([2, 9], 38, 1.0, 4, 0.8, 4, "lecture"),
    (list(range(3, 15)), 33, 0.0, None, None, 5, "lecture"),
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread, as the app runs: these tiny steps are all overhead, and on a shared
    machine a second thread spins waiting for a busy core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def model64(preset: str = "layernorm"):
    """A tiny model with sharp odds: untrained, its distributions are so flat that the same
    random draws pick the same characters whatever the context, which would prove nothing."""
    model = tiny_model(preset, seed=1).double()
    head = model.token_embedding_table if preset == "bigram" else model.lm_head
    head.weight.data *= 100
    return model


def alone(model, prompt, length, temperature, top_k, top_p, seed, window) -> list[int]:
    """The characters one request gets by itself: the model's own generate_stream for the fast
    window (the lecture's is checked against the lecture's generate below)."""
    if window == "lecture":
        return [t for t, _ in stream(model, prompt, length, temperature, top_k, top_p, seed, window)]
    out = model.generate_stream(torch.tensor([prompt]), length, temperature, top_k, top_p,
                                torch.Generator().manual_seed(seed))
    return [int(t) for t, _ in out]


def request(model, settings) -> Request:
    return Request(model.config, *settings)


def run(decoder: Decoder, steps: int | None = None) -> None:
    with torch.no_grad():
        while decoder.rows and steps != 0:
            decoder.step()
            steps = None if steps is None else steps - 1


@pytest.mark.parametrize("preset", ["bigram", "layernorm"])
def test_requests_joining_mid_way_write_what_they_write_alone(preset):
    model = model64(preset)
    decoder = Decoder(model, max_rows=8)
    requests = [request(model, s) for s in SETTINGS]
    with torch.no_grad():
        for r in requests[:2]:
            decoder.add(r)
    run(decoder, 7)
    with torch.no_grad():
        decoder.add(requests[2])  # joins 7 characters in
    run(decoder, 13)
    with torch.no_grad():
        for r in requests[3:]:
            decoder.add(r)  # join while others slide their windows
    run(decoder)
    for r, s in zip(requests, SETTINGS):
        assert r.done and r.error is None
        assert r.new_ids == alone(model, *s), s
        assert len(r.probs) == s[1] and all(p.dtype == "float32" and p.shape == (model.config.vocab_size,) for p in r.probs)
    assert decoder.capacity == 8  # grown by doubling as rows were needed


def test_prompts_and_windows_of_one_length_share_a_forward():
    """Rows 0, 2, 4 (apart in the cache) and rows 1, 3 have prompts of one length: two prefill
    forwards, not five, and their windows slide together, each row still writing its own."""
    model = model64()
    settings = [([1, 2, 3, 4, 5], 40, 1.0, None, None, 10, "fast"), ([6, 7, 8], 40, 0.8, 3, None, 11, "fast"),
                ([5, 4, 3, 2, 1], 40, 1.2, None, 0.9, 12, "fast"), ([8, 8, 8], 40, 1.0, None, None, 13, "fast"),
                ([2, 2, 3, 3, 4], 40, 0.0, None, None, 14, "fast")]
    prefills = []
    forward = model.forward
    model.forward = lambda idx, **kw: (prefills.append(idx.shape) if idx.shape[1] > 1 else None) or forward(idx, **kw)
    decoder = Decoder(model)
    requests = [request(model, s) for s in settings]
    with torch.no_grad():
        decoder.add(*requests)
    assert sorted(prefills) == [(2, 2), (3, 4)]
    run(decoder)
    assert len(prefills) < 2 + 5 * 3  # slides shared too (each row slides at least 3 times alone)
    for r, s in zip(requests, settings):
        assert r.error is None and r.new_ids == alone(model, *s), s


def test_the_distributions_are_those_sampled_alone():
    model = model64()
    s = SETTINGS[2]
    decoder = Decoder(model)
    r = request(model, s)
    with torch.no_grad():
        decoder.add(request(model, SETTINGS[0]))
        decoder.add(r)
    run(decoder)
    solo = model.generate_stream(torch.tensor([s[0]]), s[1], *s[2:5], torch.Generator().manual_seed(s[5]))
    for mine, (_, p) in zip(r.probs, solo):
        torch.testing.assert_close(torch.from_numpy(mine), p[0].float())


def test_stop_ends_one_request_only_and_rows_compact():
    model = model64()
    decoder = Decoder(model)
    requests = [request(model, s) for s in SETTINGS[:4]]
    with torch.no_grad():
        for r in requests:
            decoder.add(r)
    run(decoder, 5)
    requests[0].stop()  # row 0: the last row moves into its place
    requests[2].stop()
    run(decoder, 1)
    assert len(decoder.rows) == 2 and decoder.rows == [requests[3], requests[1]]
    run(decoder)
    for i in (0, 2):
        assert requests[i].done and requests[i].error is None and len(requests[i].new_ids) == 5
        assert requests[i].new_ids == alone(model, *SETTINGS[i])[:5]
    for i in (1, 3):
        assert requests[i].new_ids == alone(model, *SETTINGS[i])


class OneHot(torch.nn.Module):
    """The model with its logits turned into a near one-hot: the lecture's generate (which has
    no temperature) then draws the argmax, whatever the generator."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, idx):
        logits, _ = self.model(idx)
        return 1e4 * F.one_hot(logits.argmax(-1), self.config.vocab_size).double(), None


@pytest.mark.parametrize("prompt", [[0], list(range(5)), list(range(12)), list(range(1, 19))])
def test_the_lecture_window_writes_the_lectures_characters(prompt):
    model = model64()
    n = 3 * model.config.block_size
    crop = prompt[-model.config.block_size:]  # the lecture's generate crops each step, the engine once
    sampled = lecture_generate(model, torch.tensor([crop]), n, torch.Generator().manual_seed(7))[0, len(crop):]
    assert [t for t, _ in stream(model, prompt, n, seed=7, window="lecture")] == sampled.tolist()
    greedy = lecture_generate(OneHot(model), torch.tensor([crop]), n)[0, len(crop):]
    assert [t for t, _ in stream(model, prompt, n, temperature=0, window="lecture")] == greedy.tolist()
    fast = [t for t, _ in stream(model, prompt, n, seed=7)]
    first_slide = model.config.block_size - len(crop)  # the windows agree until the first is full
    assert fast[:first_slide + 1] == sampled.tolist()[:first_slide + 1] and fast != sampled.tolist()


def test_stream_is_generate_stream_for_the_fast_window():
    model = model64()
    for s in SETTINGS[:4]:
        assert [t for t, _ in stream(model, *s)] == alone(model, *s)


def test_the_engine_thread_serves_requests_and_ends_when_idle():
    model = model64()
    eng = Engine(model)
    requests = [eng.submit(*s) for s in SETTINGS]
    assert all(r.wait(30) for r in requests)
    for r, s in zip(requests, SETTINGS):
        assert r.error is None and r.new_ids == alone(model, *s)
    assert wait_for(lambda: not eng.running) and eng.capacity == 0  # the cache is freed
    again = eng.submit(*SETTINGS[0])  # a later request starts the thread again
    assert again.wait(30) and again.new_ids == alone(model, *SETTINGS[0])


def test_at_most_max_rows_are_written_and_the_rest_wait_in_order():
    model = model64()
    eng = Engine(model, max_rows=2)
    requests = [eng.submit([1, 2], 150, seed=i) for i in range(5)]
    seen_rows, seen_capacity = 0, 0

    def all_done():
        nonlocal seen_rows, seen_capacity
        seen_rows, seen_capacity = max(seen_rows, eng.active), max(seen_capacity, eng.capacity)
        return all(r.done for r in requests)

    assert wait_for(all_done, timeout=60, interval=0.001)
    assert seen_rows <= 2 and seen_capacity <= 2
    starts = [r.started for r in requests]
    assert starts == sorted(starts)  # first in, first out
    for i in range(2, 5):  # a waiting request starts only when an earlier one has left its row
        assert requests[i].started >= sorted(r.finished for r in requests[:i])[i - 2]
    for i, r in enumerate(requests):
        assert r.new_ids == alone(model, [1, 2], 150, 1.0, None, None, i, "fast")


def test_a_waiting_request_that_is_stopped_leaves_the_queue_at_once():
    model = model64()
    eng = Engine(model, max_rows=1)
    first = eng.submit([1], 100_000)
    queued = eng.submit([1], 10)
    assert wait_for(lambda: first.new_ids)
    queued.stop()
    assert queued.done and queued.new_ids == [] and eng.waiting == 0
    first.stop()
    assert first.wait(10) and 0 < len(first.new_ids) < 100_000 and first.error is None
    assert wait_for(lambda: not eng.running)


def test_stop_as_the_engine_gives_the_request_a_row_ends_it_without_error():
    """The engine clears a request's cancel callback when it admits it, from its own thread: a
    Stop clicked at that moment must not call the callback it has just seen go."""
    cancelled = []

    class AdmittedMidStop(Request):
        reads = 0

        @property
        def _on_stop(self):  # set while stop() checks it, cleared before a second read
            self.reads += 1
            return cancelled.append if self.reads == 1 else None

        @_on_stop.setter
        def _on_stop(self, value):
            pass

    request = AdmittedMidStop(model64().config, [1], 10)
    request.stop()
    assert cancelled == [request] and request._stopped.is_set()


def test_an_error_in_one_request_does_not_stop_the_others(monkeypatch):
    model = model64()
    real = engine.sample_rows

    def flaky(logits, temperature, *args):  # a batch holding that request fails, as does that row alone
        if 0.7 in temperature:
            raise RuntimeError("this request's sampling broke")
        return real(logits, temperature, *args)

    monkeypatch.setattr(engine, "sample_rows", flaky)
    eng = Engine(model)
    broken = eng.submit([1, 2, 3], 20, temperature=0.7)
    others = [eng.submit(*s) for s in SETTINGS[:3]]
    assert broken.wait(30) and all(r.wait(30) for r in others)
    assert broken.error == "RuntimeError: this request's sampling broke" and broken.new_ids == []
    for r, s in zip(others, SETTINGS):
        assert r.error is None and r.new_ids == alone(model, *s)
    later = eng.submit(*SETTINGS[0])
    assert later.wait(30) and later.new_ids == alone(model, *SETTINGS[0])


def test_a_model_that_writes_nan_fails_its_requests_with_a_message():
    model = model64()
    with torch.no_grad():
        model.lm_head.bias.fill_(float("nan"))
    eng = Engine(model)
    requests = [eng.submit(*s[:6]) for s in SETTINGS[:3]]
    assert all(r.wait(30) for r in requests)
    assert all(r.new_ids == [] and "not finite" in r.error for r in requests)


def test_a_failed_prompt_fails_only_its_request(monkeypatch):
    model = model64()
    real = Decoder._fill

    def fill(self, rows, windows):  # a forward holding that prompt fails, as does that prompt alone
        if any(ids[:3] == [9, 9, 9] for ids in windows):
            raise RuntimeError("prefill failed")
        real(self, rows, windows)

    monkeypatch.setattr(Decoder, "_fill", fill)
    eng = Engine(model)
    ok = eng.submit(*SETTINGS[1])
    bad = eng.submit([9, 9, 9, 1, 2], 10)  # as long as ok's prompt: they may share a forward
    assert ok.wait(30) and bad.wait(30)
    assert bad.error == "RuntimeError: prefill failed" and ok.new_ids == alone(model, *SETTINGS[1])


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(top_k=0), dict(top_p=1.5), dict(length=-1),
                                    dict(window="sliding"), dict(prompt_ids=[]), dict(prompt_ids=[20])])
def test_bad_settings_are_refused_at_submit(kwargs):
    eng = Engine(model64())
    args = {"prompt_ids": [1], "length": 5, **kwargs}
    with pytest.raises(ValueError):
        eng.submit(**args)
    assert not eng.running


def test_a_request_of_no_characters_is_done_at_once():
    eng = Engine(model64())
    r = eng.submit([1], 0)
    assert r.done and r.new_ids == [] and not eng.running


def test_pages_counting_the_rooms_samples_while_others_generate_break_nothing(monkeypatch):
    """Every session's Sample page counts the server's writing jobs while others press Generate
    (the room's moment): counting must not break on a job added mid-way. Switches forced often."""
    monkeypatch.setattr(SampleJob, "_all", weakref.WeakSet())  # this test's jobs only
    eng, jobs = Engine(model64()), []

    def generate():
        for i in range(200):
            jobs.append(SampleJob(eng, "tiny", [1], 1, dict(seed=i)))

    errors = race(writers=[generate, generate], readers=[SampleJob.poll_seconds, SampleJob.poll_seconds])
    assert not errors, errors[0]
    for job in jobs:
        job.join(10)
    assert len(jobs) == 400 and not any(job.alive for job in jobs)


def test_sample_pages_poll_more_seldom_while_the_room_samples_at_once(monkeypatch):
    monkeypatch.setattr(SampleJob, "_all", weakref.WeakSet())  # this test's jobs only
    eng = Engine(model64(), max_rows=40)
    jobs = [SampleJob(eng, "tiny", [1], 2000, dict(seed=i)) for i in range(30)]
    assert SampleJob.poll_seconds() == 30 / ROOM_POLLS_PER_S  # 30 writing: 15 polls a second together
    for job in jobs[:25]:
        job.stop()
        job.join(10)
        assert not job.alive  # seen done by its page
    assert SampleJob.poll_seconds() == POLL_S  # 5 still writing: each page as alone
    for job in jobs[25:]:
        job.stop()
