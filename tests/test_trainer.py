"""The training engine: learning, stopping, divergence, reproducibility, history, schedule."""

import math
import statistics
import threading
import time

import pandas as pd
import pytest
import torch

from core import GPTConfig
from core.data import Corpus
from core.lens import run_with_cache
from core.trainer import TrainConfig, Trainer
from helpers import tiny_config


@pytest.fixture(scope="module")
def corpus(shakespeare) -> Corpus:
    return Corpus(shakespeare, block_size=tiny_config().block_size)


@pytest.fixture
def tiny_corpus(tiny_text) -> Corpus:
    return Corpus(tiny_text, block_size=tiny_config().block_size)


def make(corpus: Corpus, dropout: float = 0.0, **train) -> Trainer:
    settings = dict(batch_size=8, max_iters=40, learning_rate=3e-3, warmup_iters=5, eval_interval=10, eval_iters=2)
    config = tiny_config(vocab_size=corpus.tokenizer.vocab_size, dropout=dropout)
    return Trainer(config, TrainConfig(**{**settings, **train}), corpus)


def losses(rows) -> list[float]:
    return [r["loss"] for r in rows]


def test_loss_falls_on_tiny_shakespeare(corpus):
    trainer = make(corpus, batch_size=16, max_iters=60, eval_iters=5)
    before = trainer.estimate_loss()
    assert abs(before["train"] - math.log(65)) < 0.1  # a fresh model guesses uniformly
    rows = trainer.run(60)
    after = trainer.estimate_loss()
    assert len(rows) == 60 and trainer.record.iters == 60
    assert after["train"] < before["train"] - 0.5
    assert after["val"] < before["val"] - 0.5


def test_estimate_loss_uses_the_same_batches_every_time(tiny_corpus):
    trainer = make(tiny_corpus)
    first = trainer.estimate_loss()
    assert trainer.estimate_loss() == first
    assert trainer.history[-1] == dict(iter=0, train_loss=first["train"], val_loss=first["val"])


@pytest.mark.parametrize("training", [True, False])
def test_estimate_loss_restores_the_mode(tiny_corpus, training):
    trainer = make(tiny_corpus, dropout=0.3)
    trainer.model.train(training)
    first = trainer.estimate_loss()
    assert trainer.model.training == training
    assert trainer.estimate_loss() == first  # dropout is off while estimating


# Stopping ----------------------------------------------------------------------------------


def test_stop_asked_before_run(tiny_corpus):
    trainer = make(tiny_corpus)
    trainer.request_stop()
    assert trainer.run(10) == []
    assert trainer.stop_reason == "stopped on request" and trainer.record.iters == 0
    # The request is used up: the next call trains, and its stop reason is its own.
    assert len(trainer.run(5)) == 5
    assert trainer.stop_reason is None and trainer.record.iters == 5


def test_stop_from_another_thread(tiny_corpus):
    trainer = make(tiny_corpus, max_iters=100_000)
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("rows", trainer.run(100_000)))
    worker.start()
    deadline = time.monotonic() + 30
    while trainer.record.iters < 3 and time.monotonic() < deadline:
        time.sleep(0.001)
    trainer.request_stop()
    worker.join(timeout=30)
    assert not worker.is_alive()
    assert trainer.stop_reason == "stopped on request"
    assert 3 <= trainer.record.iters < 100_000
    assert len(result["rows"]) == trainer.record.iters  # it stopped between steps: every step has its row


def test_stop_between_chunks_of_train_is_not_lost(tiny_corpus):
    """A stop asked for while train() is between two run() calls (here: inside on_step)."""
    trainer = make(tiny_corpus, max_iters=40, eval_interval=20)
    evals = []
    trainer.train(on_step=lambda rows: trainer.request_stop(), on_eval=lambda l: evals.append(trainer.record.iters),
                  chunk=5)
    assert trainer.stop_reason == "stopped on request"
    assert trainer.record.iters == 5
    assert evals == [0, 5]  # the state it stopped in is evaluated, once


def test_absurd_learning_rate_stops_with_advice(tiny_corpus):
    trainer = make(tiny_corpus, learning_rate=1e6, min_lr=0.0, grad_clip=0.0, warmup_iters=0, max_iters=200)
    trainer.train()
    assert "diverged" in trainer.stop_reason and "learning rate" in trainer.stop_reason
    assert trainer.record.iters < 200
    steps = [r for r in trainer.history if "loss" in r]
    assert not math.isfinite(steps[-1]["loss"])
    assert [r["iter"] for r in trainer.history if "val_loss" in r] == [0]  # a diverged model is not evaluated
    assert trainer.diverged and trainer.done
    reason, iters = trainer.stop_reason, trainer.record.iters
    assert trainer.run(5) == []  # no more steps on NaN weights
    assert (trainer.stop_reason, trainer.record.iters) == (reason, iters)


def test_a_healthy_run_has_not_diverged(tiny_corpus):
    trainer = make(tiny_corpus, max_iters=5)
    trainer.train()
    assert not trainer.diverged


# Reproducibility ---------------------------------------------------------------------------


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_same_seed_same_run(tiny_corpus, dropout):
    a, b = make(tiny_corpus, dropout, seed=7), make(tiny_corpus, dropout, seed=7)
    torch.rand(100)  # whatever else the process draws from the global generator must not matter
    assert losses(a.run(15)) == losses(b.run(15))
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_different_seed_different_run(tiny_corpus, dropout):
    a, b = make(tiny_corpus, dropout, seed=7), make(tiny_corpus, dropout, seed=8)
    assert losses(a.run(5)) != losses(b.run(5))


def test_how_steps_are_split_into_calls_does_not_matter(tiny_corpus):
    one, many = make(tiny_corpus, 0.1), make(tiny_corpus, 0.1)
    whole = losses(one.run(12))
    pieces = losses(many.run(5)) + losses(many.run(1)) + losses(many.run(6))
    assert whole == pieces


def test_training_leaves_the_global_generator_alone(tiny_corpus):
    trainer = make(tiny_corpus, 0.1)
    before = torch.get_rng_state()
    trainer.run(3)
    assert torch.equal(torch.get_rng_state(), before)


def test_dropout_is_on_while_training(tiny_corpus):
    plain, dropped = make(tiny_corpus, 0.0), make(tiny_corpus, 0.3)
    assert losses(plain.run(3)) != losses(dropped.run(3))  # same weights and batches: only dropout differs


# History, schedule, the train() loop -------------------------------------------------------


def test_train_runs_to_max_iters_with_evals_and_callbacks(tiny_corpus):
    trainer = make(tiny_corpus, max_iters=25, eval_interval=10)
    steps, evals = [], []
    record = trainer.train(on_step=steps.extend, on_eval=lambda l: evals.append((trainer.record.iters, l)))
    assert [r["iter"] for r in steps] == list(range(1, 26))
    assert [it for it, _ in evals] == [0, 10, 20, 25]  # every eval_interval steps, and at the end
    assert all(set(l) == {"train", "val"} for _, l in evals)
    assert record is trainer.record and record.iters == 25 and trainer.done
    assert trainer.stop_reason == "reached max_iters (25)"
    assert record.tokens == 25 * 8 * tiny_config().block_size
    assert record.seconds > 0
    assert (record.train_loss, record.val_loss) == (evals[-1][1]["train"], evals[-1][1]["val"])
    assert trainer.run(5) == []  # nothing left to do


def test_history_frame(tiny_corpus):
    trainer = make(tiny_corpus, max_iters=20, eval_interval=10)
    trainer.train()
    frame = trainer.history_frame()
    assert isinstance(frame, pd.DataFrame)
    steps = frame[frame["loss"].notna()]
    evals = frame[frame["val_loss"].notna()]
    assert list(steps["iter"]) == list(range(1, 21)) and len(frame) == len(steps) + len(evals)
    assert list(evals["iter"]) == [0, 10, 20]
    assert steps["train_loss"].isna().all() and evals["lr"].isna().all()
    assert (steps["lr"] > 0).all() and (steps["ms_per_iter"] > 0).all()
    assert list(steps["lr"]) == [trainer.train_config.lr_at(i) for i in range(20)]


def test_learning_rate_schedule():
    cfg = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=110)
    warmup = [cfg.lr_at(i) for i in range(10)]
    assert all(a < b for a, b in zip(warmup, warmup[1:])) and warmup[-1] < 1e-3
    assert cfg.lr_at(10) == pytest.approx(1e-3)
    decay = [cfg.lr_at(i) for i in range(10, 111)]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert cfg.lr_at(60) == pytest.approx(5.5e-4)  # halfway down the cosine
    assert cfg.lr_at(110) == pytest.approx(1e-4) and cfg.lr_at(5000) == 1e-4
    assert TrainConfig(warmup_iters=0).lr_at(0) == pytest.approx(TrainConfig().learning_rate)


def test_warmup_stable_decay_schedule():
    cfg = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=110, schedule="wsd", decay_frac=0.2)
    assert [cfg.lr_at(i) for i in range(10)] == [TrainConfig(**{**cfg.to_dict(), "schedule": "cosine"}).lr_at(i)
                                                 for i in range(10)]  # the same warmup as cosine
    assert all(cfg.lr_at(i) == 1e-3 for i in range(10, 88))  # held until the last 22 steps
    decay = [cfg.lr_at(i) for i in range(88, 111)]
    assert decay[0] == pytest.approx(1e-3) and decay[-1] == pytest.approx(1e-4)
    assert all(a - b == pytest.approx(9e-4 / 22) for a, b in zip(decay, decay[1:]))  # a straight line down
    assert cfg.lr_at(5000) == 1e-4
    # A decay longer than what follows the warmup starts right after the warmup.
    whole = TrainConfig(learning_rate=1e-3, min_lr=0.0, warmup_iters=10, max_iters=20, schedule="wsd", decay_frac=1.0)
    assert whole.lr_at(10) == pytest.approx(1e-3) and whole.lr_at(15) == pytest.approx(5e-4)


def test_the_ramps_grow_from_a_quarter_to_the_whole():
    cfg = TrainConfig(batch_size=16, batch_ramp_iters=100, seq_ramp_iters=40)
    assert [cfg.batch_at(i) for i in (0, 50, 99, 100, 1000)] == [4, 10, 16, 16, 16]
    assert [cfg.seq_at(i, 64) for i in (0, 20, 39, 40)] == [16, 40, 63, 64]
    assert TrainConfig(batch_size=2, batch_ramp_iters=10).batch_at(0) == 1  # never an empty batch
    assert TrainConfig(batch_size=16).batch_at(0) == 16  # no ramp unless asked


def test_a_ramped_run_trains_on_the_ramped_batches(tiny_corpus, monkeypatch):
    trainer = make(tiny_corpus, batch_size=8, batch_ramp_iters=4, seq_ramp_iters=2, max_iters=6)
    shapes = []
    get_batch = tiny_corpus.get_batch

    def spy(split, batch_size, block_size=None, generator=None):
        x, y = get_batch(split, batch_size, block_size, generator)
        shapes.append(tuple(x.shape))
        return x, y

    monkeypatch.setattr(tiny_corpus, "get_batch", spy)
    rows = trainer.run(6)
    T = trainer.config.block_size
    cfg = trainer.train_config
    assert shapes == [(cfg.batch_at(i), cfg.seq_at(i, T)) for i in range(6)]
    assert shapes[0] == (2, T // 4) and shapes[-1] == (8, T)
    assert trainer.record.tokens == sum(b * t for b, t in shapes)
    assert all(r["tokens_per_s"] * r["ms_per_iter"] / 1000 == pytest.approx(b * t) for r, (b, t) in zip(rows, shapes))


@pytest.mark.parametrize("kwargs, message", [
    (dict(schedule="linear"), "schedule must be one of"),
    (dict(decay_frac=1.5), "decay_frac must be between 0 and 1"),
    (dict(batch_ramp_iters=-1), "must not be negative"),
    (dict(seq_ramp_iters=-1), "must not be negative"),
    (dict(batch_size=0), "batch_size must be a positive integer"),
    (dict(max_iters=-5), "max_iters must be a positive integer"),
    (dict(eval_interval=2.5), "eval_interval must be a positive integer"),
    (dict(eval_iters=True), "eval_iters must be a positive integer"),
    (dict(learning_rate=0.0), "learning_rate must be a positive number"),
    (dict(learning_rate=float("inf")), "learning_rate must be a positive number"),
    (dict(learning_rate=1e-3, min_lr=1e-2), "min_lr must be between 0 and learning_rate"),
    (dict(min_lr=-1e-5), "min_lr must be between 0 and learning_rate"),
    (dict(warmup_iters=-1), "must not be negative"),
    (dict(grad_clip=-1.0), "must not be negative"),
    (dict(threads=0), "threads must be at least 1"),
    (dict(device="tpu"), "device must be 'cpu', 'cuda' or 'auto'"),
    (dict(precision="float16"), "precision must be one of"),
    (dict(optimizer="sgd"), "optimizer must be one of"),
    (dict(muon_lr=0.0), "muon_lr must be a positive number"),
    (dict(muon_ns_steps=0), "muon_ns_steps must be a positive integer"),
])
def test_train_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_train_config_round_trip():
    cfg = TrainConfig(batch_size=4, learning_rate=3e-3, seed=5)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert TrainConfig.from_dict({**cfg.to_dict(), "from_the_future": 1}) == cfg  # newer keys are ignored


def test_muon_steps_the_block_matrices_and_adamw_the_rest(tiny_corpus):
    trainer = make(tiny_corpus, optimizer="muon", max_iters=3)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.run(1)
    muon, adamw = trainer.optimizer.optimizers[1], trainer.optimizer.optimizers[0]
    for name, p in trainer.model.named_parameters():
        assert not torch.equal(before[name], p.detach()), f"{name} did not move"
        owner = muon if p.dim() == 2 and name.startswith("blocks.") else adamw
        assert p in owner.state, name
    assert set(trainer.optimizer.state_of(trainer.model.blocks[0].sa.qkv.weight)) == {"momentum_buffer"}


def test_muon_follows_the_schedule(tiny_corpus):
    trainer = make(tiny_corpus, optimizer="muon", muon_lr=0.05, learning_rate=2e-3, warmup_iters=4)
    trainer.run(1)
    lrs = {type(o).__name__: o.param_groups[0]["lr"] for o in trainer.optimizer.optimizers}
    scale = trainer.train_config.lr_at(0) / 2e-3
    assert lrs == pytest.approx({"AdamW": 2e-3 * scale, "Muon": 0.05 * scale})


def test_fewer_newton_schulz_steps_are_less_orthogonal(tiny_corpus):
    from core.trainer import _orthogonalize
    g = torch.randn(16, 48, generator=torch.Generator().manual_seed(0))
    error = {n: (_orthogonalize(g, n) @ _orthogonalize(g, n).T - torch.eye(16)).abs().max().item() for n in (1, 3, 5)}
    assert error[5] < error[3] < error[1]
    assert make(tiny_corpus, optimizer="muon", muon_ns_steps=3).optimizer.optimizers[1].param_groups[0]["ns_steps"] == 3


def test_vocab_mismatch_is_refused(tiny_corpus):
    with pytest.raises(ValueError, match="vocab_size"):
        Trainer(tiny_config(vocab_size=tiny_corpus.tokenizer.vocab_size + 1), TrainConfig(), tiny_corpus)


def test_bfloat16_trains_and_stays_inside_training(corpus):
    trainer = make(corpus, batch_size=16, max_iters=60, eval_iters=5, precision="bfloat16")
    before = trainer.estimate_loss()
    trainer.run(60)
    after = trainer.estimate_loss()
    assert trainer.bf16 and after["val"] < before["val"] - 0.5
    # Only the matmuls of training ran in bfloat16: the weights and what the app reads are float32.
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    _, cache = run_with_cache(trainer.model, torch.zeros((1, 4), dtype=torch.long))
    assert all(t.dtype == torch.float32 for t in cache.values())


def test_auto_precision_is_bfloat16_only_where_the_cpu_has_it(tiny_corpus, monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True})
    assert not make(tiny_corpus).bf16
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True})
    assert make(tiny_corpus).bf16
    assert not make(tiny_corpus, precision="float32").bf16
    # ATEN_CPU_CAPABILITY=avx2 (an emulated AVX2 machine): the instructions are there, unused.
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert not make(tiny_corpus).bf16


def test_the_step_estimate_times_the_real_training_step(shakespeare):
    """time_step (the Train view's estimate) against the steps of a real training of the same
    shape, measured side by side: within 30% (the better of three tries, as machines are noisy)."""
    from core.trainer import time_step
    config = GPTConfig.from_preset("layernorm", vocab_size=65, n_layer=2, n_head=4, n_embd=64, block_size=64)
    tconf = TrainConfig(batch_size=16, max_iters=1000, eval_iters=1, precision="auto")
    corpus = Corpus(shakespeare, config.block_size)
    ratios = []
    for _ in range(3):
        trainer = Trainer(config, tconf, corpus)
        trainer.run(2)
        real = statistics.median(r["ms_per_iter"] for r in trainer.run(8))
        ratios.append(time_step(config, tconf) / real)
    assert min(abs(r - 1) for r in ratios) < 0.3, ratios
