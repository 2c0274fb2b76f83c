"""Training on several processes (torchrun, DistributedDataParallel on gloo) and gradient
accumulation: both must take the very step one process takes on all the batches at once."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import TINY_TEXT
from safetensors.torch import load_file, save_file

from core import distributed
from core import trainer as trainer_module
from core.checkpoint import load_checkpoint, resume_trainer, save_trainer
from core.data import Corpus
from core.trainer import TrainConfig, Trainer
from helpers import tiny_config

ROOT = Path(__file__).resolve().parent.parent
B = 4  # sequences per micro-batch
# float32, dropout 0 (it draws from torch's global generator) and no clipping (it would hide a
# wrong gradient scale); AdamW's first step barely depends on that scale, so compare gradients too.
SETTINGS = dict(batch_size=B, learning_rate=1e-2, warmup_iters=0, grad_clip=0.0, seed=3, precision="float32")
TOL = 1e-6


class FixedBatch:
    """A stand-in corpus whose every training batch is (x, y)."""

    def __init__(self, corpus: Corpus, x: torch.Tensor, y: torch.Tensor):
        self.tokenizer, self.x, self.y = corpus.tokenizer, x, y

    def get_batch(self, split, batch_size, block_size=None, generator=None):
        assert (split, batch_size) == ("train", len(self.x))
        return self.x, self.y


def draws(corpus: Corpus, seeds_and_counts: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Batches of B drawn as the trainer draws them (a generator per seed), concatenated."""
    xs, ys = [], []
    for seed, count in seeds_and_counts:
        rng = torch.Generator().manual_seed(seed)
        for _ in range(count):
            x, y = corpus.get_batch("train", B, tiny_config().block_size, rng)
            xs.append(x)
            ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def one_step_on(corpus: Corpus, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Parameters and gradients after one plain single-process step on the batch (x, y)."""
    config = tiny_config(vocab_size=corpus.tokenizer.vocab_size)
    trainer = Trainer(config, TrainConfig(**{**SETTINGS, "batch_size": len(x)}), FixedBatch(corpus, x, y))
    trainer.run(1)
    return params_and_grads(trainer)


def params_and_grads(trainer: Trainer) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in trainer.model.named_parameters():
        out[name] = p.detach().clone()
        out[f"grad.{name}"] = p.grad.detach().clone()
    return out


def assert_close(got: dict, want: dict):
    assert got.keys() == want.keys()
    for name in want:
        assert torch.allclose(got[name], want[name], rtol=0, atol=TOL), \
            f"{name}: off by {(got[name] - want[name]).abs().max():.2e}"


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return Corpus(TINY_TEXT, block_size=tiny_config().block_size)


# Gradient accumulation, in one process ----------------------------------------------------


def test_gradient_accumulation_equals_one_big_batch(corpus):
    k = 3
    config = tiny_config(vocab_size=corpus.tokenizer.vocab_size)
    accumulating = Trainer(config, TrainConfig(**SETTINGS, grad_accum_steps=k), corpus)
    row = accumulating.run(1)[0]
    x, y = draws(corpus, [(SETTINGS["seed"], k)])  # the k micro-batches, drawn in order
    assert_close(params_and_grads(accumulating), one_step_on(corpus, x, y))
    assert accumulating.record.tokens == k * B * config.block_size
    with torch.no_grad():
        big = Trainer(config, TrainConfig(**SETTINGS), corpus).model(x, y)[1]  # the same initial weights
    assert row["loss"] == pytest.approx(big.item(), abs=1e-6)  # the logged loss: the mean over micro-batches


def test_grad_accum_steps_must_be_a_positive_integer():
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="grad_accum_steps must be a positive integer"):
            TrainConfig(grad_accum_steps=bad)


def test_without_torchrun_nothing_is_distributed(corpus, monkeypatch):
    for name in distributed.TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    assert not distributed.under_torchrun()
    with distributed.process_group("cpu"):
        trainer = Trainer(tiny_config(vocab_size=corpus.tokenizer.vocab_size), TrainConfig(**SETTINGS), corpus)
        assert not dist.is_initialized()
    assert (trainer.rank, trainer.world_size, trainer.ddp) == (0, 1, None)
    assert distributed.backend_for("cpu") == "gloo" and distributed.backend_for("cuda") == "nccl"


def test_resumed_ranks_draw_batches_of_their_own(corpus, tmp_path, monkeypatch):
    """Only rank 0's batch sampler is saved; on resume each rank must still draw its own."""
    config = tiny_config(vocab_size=corpus.tokenizer.vocab_size)
    first = Trainer(config, TrainConfig(**SETTINGS), corpus)
    first.run(2)
    save_trainer(tmp_path / "ck", first)
    batches = []
    for rank in (0, 1, 1):
        monkeypatch.setattr(trainer_module, "rank_and_world_size", lambda rank=rank: (rank, 2))
        resumed = resume_trainer(tmp_path / "ck", corpus)
        batches.append(corpus.get_batch("train", B, None, resumed.batch_rng)[0])
    assert not torch.equal(batches[0], batches[1])
    assert torch.equal(batches[1], batches[2])  # and the same ones at every resume


# Two processes, DDP on gloo ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_step_as_rank(rank: int, port: int, text: str, out_dir: str):
    """A spawned process: join the group the way torchrun's variables say, take one step, save
    the parameters and gradients it ends with."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    corpus = Corpus(text, block_size=tiny_config().block_size)
    with distributed.process_group("cpu"):
        assert dist.get_backend() == "gloo"
        trainer = Trainer(tiny_config(vocab_size=corpus.tokenizer.vocab_size),
                          TrainConfig(**SETTINGS, threads=1), corpus)
        trainer.run(1)
    save_file(params_and_grads(trainer), os.path.join(out_dir, f"rank{rank}.safetensors"))


def test_two_ranks_take_the_step_of_one_process_on_both_batches(corpus, tmp_path):
    mp.spawn(_one_step_as_rank, args=(free_port(), TINY_TEXT, str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1))
    x, y = draws(corpus, [(SETTINGS["seed"], 1), (SETTINGS["seed"] + 1, 1)])  # each rank seeds seed + rank
    assert not torch.equal(x[:B], x[B:])  # the ranks drew different batches
    assert_close(rank0, one_step_on(corpus, x, y))
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name])  # every copy of the model took the same step


def test_torchrun_writes_one_checkpoint_that_loads(tmp_path):
    text = tmp_path / "play.txt"
    text.write_text(TINY_TEXT * 3, encoding="utf-8")
    out = tmp_path / "run" / "ddp"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "core.train",
         "--data", str(text), "--out", str(out), "--n-layer", "1", "--n-embd", "16", "--n-head", "2",
         "--block-size", "16", "--batch-size", "4", "--grad-accum-steps", "2", "--max-iters", "4",
         "--eval-interval", "2", "--eval-iters", "2", "--threads", "1"],
        cwd=ROOT, capture_output=True, text=True, encoding="utf-8", timeout=120)
    assert done.returncode == 0, done.stderr
    # Only rank 0 evaluates and prints: each evaluation once, one summary.
    assert [line.split(":")[0] for line in done.stdout.splitlines()] == ["step 0", "step 2", "step 4"]
    assert done.stderr.count("reached max_iters (4)") == 1
    assert done.stderr.count("on cpu x 2 processes") == 1
    assert sorted(p.name for p in out.parent.iterdir()) == ["ddp.json", "ddp.safetensors", "ddp.state.safetensors"]
    ckpt = load_checkpoint(out)
    assert ckpt.record.iters == 4
    assert ckpt.record.tokens == 4 * (4 * 2 * 2) * 16  # steps x (batch x micro-steps x ranks) x block
    assert ckpt.train_config.grad_accum_steps == 2
    meta = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
    assert meta["record"]["val_loss"] is not None
