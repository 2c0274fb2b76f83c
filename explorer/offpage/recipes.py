"""What a training is made of, without any widget: the instructor's caps, the form's settings,
the named recipes, and the prompt whose attention is snapshotted.

Caps are environment variables, read when the server starts (see the README's "Running a
workshop"):
    GPT_EXPLORER_WORKERS        where trainings run: "threads" (default: in the server's process)
                                or "ray" (on Ray workers, explorer/offpage/ray_training.py)
    GPT_EXPLORER_MAX_TRAININGS  trainings at once (default: cores - 1, at least 1, with threads;
                                the cluster's CPUs with Ray workers; see explorer/glue/train_setup.py)
    GPT_EXPLORER_MAX_PARAMS     largest model a participant may train (default 1,000,000)
    GPT_EXPLORER_MAX_ITERS      most steps of one training (default 5,000)
    GPT_EXPLORER_MAX_TEXT_MB    largest uploaded or pasted text (default 5 MB)
"""

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from core import GPT, CharTokenizer, GPTConfig
from core.budget import MAX_ENV, Budgets, env_int
from core.data import Corpus
from core.trainer import OPTIMIZERS, TrainConfig, Trainer

PROBE = "First Citizen:\nBefore we proceed any further, hear me speak."
# A text where copying from the context pays: Tiny Shakespeare with every line written twice in a row.
TWICE = "Tiny Shakespeare, every line twice"


@dataclass(frozen=True)
class Limits:
    workers: str  # one of WORKERS
    max_trainings: int | None  # None: as many as the training backend has cores
    max_params: int
    max_iters: int
    max_text_bytes: int


WORKERS = ("threads", "ray")
MAX_CAP = MAX_ENV  # the caps a teacher may set, as the environment's


def read_limits() -> tuple[Limits, list[str]]:
    """The caps in force, and a note for each environment variable that could not be read."""
    problems: list[str] = []
    workers = os.environ.get("GPT_EXPLORER_WORKERS") or WORKERS[0]
    if workers not in WORKERS:
        problems.append(f"GPT_EXPLORER_WORKERS={workers!r} is not one of {', '.join(WORKERS)}; using {WORKERS[0]}.")
        workers = WORKERS[0]
    limits = Limits(
        workers=workers,
        max_trainings=env_int("GPT_EXPLORER_MAX_TRAININGS", None, problems),
        max_params=env_int("GPT_EXPLORER_MAX_PARAMS", 1_000_000, problems),
        max_iters=env_int("GPT_EXPLORER_MAX_ITERS", 5_000, problems),
        max_text_bytes=env_int("GPT_EXPLORER_MAX_TEXT_MB", 5, problems) * 1_000_000,
    )
    return limits, problems + list(Budgets.from_env().notes)  # the model budgets are the instructor's caps too


@dataclass(frozen=True)
class Settings:
    """Everything the Train form sets."""
    preset: str = "layernorm"
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 64
    block_size: int = 64
    dropout: float = 0.0
    max_iters: int = 1500
    batch_size: int = 16
    learning_rate: float = 3e-3
    eval_interval: int = 100
    optimizer: str = OPTIMIZERS[0]  # "muon": Muon for the blocks' matrices, AdamW (at learning_rate) for the rest

    def model_config(self, vocab_size: int) -> GPTConfig:
        return GPTConfig.from_preset(self.preset, vocab_size=vocab_size, n_layer=self.n_layer, n_head=self.n_head,
                                     n_embd=self.n_embd, block_size=self.block_size, dropout=self.dropout)

    def train_config(self) -> TrainConfig:
        return TrainConfig(batch_size=self.batch_size, max_iters=self.max_iters, learning_rate=self.learning_rate,
                           min_lr=self.learning_rate / 10, warmup_iters=min(100, self.max_iters // 10),
                           eval_interval=self.eval_interval, eval_iters=10, device="auto", optimizer=self.optimizer)


def watch(eval_interval: int) -> dict:
    """How a live training is watched (LiveTraining's options): a sample at every evaluation, at
    most one every 100 steps."""
    return dict(sample_every=max(100, eval_interval))


ROOM_RECIPE = "Room (everyone at once)"
# Named starting points that make sense on a shared CPU; each sets the whole form. (A timed recipe's
# max_iters holds only until the server's costs are measured: see RECIPE_SECONDS.)
RECIPES: dict[str, tuple[str, Settings]] = {
    "1-minute demo": ("A 4-block model with LayerNorm, trained with Muon, its steps sized to take about a minute on "
                      "this server, evaluations and samples included: watch the loss fall and the heads form. A minute "
                      "on a 2-core Xeon bought val loss 1.70 (benchmarks/README.md).",
                      Settings(eval_interval=200, optimizer="muon")),
    "Bigram in seconds": ("The lecture's first model: a lookup table, trained in seconds.",
                          Settings(preset="bigram", n_layer=1, n_head=1, max_iters=1000, batch_size=32,
                                   learning_rate=1e-2)),
    "Lecture stage comparison": (
        "The shape of the shipped stage checkpoints at a third of their budget: give each group a "
        "different stage, then compare the val losses.",
        Settings(preset="one_head", n_layer=1, n_head=1, max_iters=1000, batch_size=32)),
    ROOM_RECIPE: (
        "A small model for a whole room training together, with Muon: a few hundred steps each, so thirty "
        "participants on a small server are all done within minutes.",
        Settings(n_layer=2, n_head=2, n_embd=32, block_size=32, max_iters=400, batch_size=16, optimizer="muon")),
    "Longer run (about 10 minutes)": ("More steps and a wider model: readable Shakespeare-like text.",
                                      Settings(n_embd=128, max_iters=4000, batch_size=16, learning_rate=2e-3,
                                               eval_interval=250)),
    "Induction heads (a few minutes)": (
        "Two blocks on Tiny Shakespeare with every line written twice, where copying pays: watch an induction "
        "head appear, marked on the loss curve (benchmarks/README.md).",
        Settings(n_layer=2, block_size=128, max_iters=4000, eval_interval=250)),
}
RECIPE_TEXTS = {"Induction heads (a few minutes)": TWICE}  # the text a recipe trains on, where not the form's
# The seconds a recipe's training should take, evaluations and samples included: its steps are sized
# from what a step, an evaluation and a sample of its shape cost on the server (step_times.py).
RECIPE_SECONDS = {"1-minute demo": 60.0}


def every_line_twice(text: str) -> str:
    return "".join(line + line for line in text.splitlines(keepends=True))


def make_trainer(settings: Settings, text: str | None, shakespeare: Callable[[int], Corpus]) -> Trainer:
    """A Trainer for the form's settings on a text (None: Tiny Shakespeare, as
    shakespeare(block_size) gives it). Raises ValueError (DataError, bad settings) with a
    message for the user."""
    if text is None:
        corpus = shakespeare(settings.block_size)
    else:
        corpus = Corpus(text, settings.block_size, CharTokenizer.from_text(text))
    return Trainer(settings.model_config(corpus.tokenizer.vocab_size), settings.train_config(), corpus)


def count_params(config: GPTConfig) -> int:
    with torch.device("meta"):  # shapes only: no memory, no time
        return GPT(config).num_params(non_embedding=False)


def probe_ids(corpus: Corpus, block_size: int) -> list[int]:
    """The prompt whose attention is snapshotted while training: a fixed Shakespeare line when
    the vocabulary has its characters, else the start of the validation text."""
    length = min(block_size, 64)
    if not corpus.tokenizer.unknown(PROBE):
        return corpus.tokenizer.encode(PROBE)[:length]
    return corpus.splits["val"][:length].tolist()
