"""What the Train view shares between sessions, cached by Streamlit: Tiny Shakespeare encoded
once, the server-wide training queue, the measured step times, and the runner for a new
training on the backend GPT_EXPLORER_WORKERS names (threads here, or Ray workers)."""

import os

import streamlit as st

from core import CharTokenizer, stage_of
from core.data import Corpus, load_shakespeare
from explorer.offpage.recipes import Limits, Settings, every_line_twice, make_trainer, probe_ids, read_limits, watch
from explorer.offpage.step_times import Costs, StepTimes, measure
from explorer.offpage.training_run import Runner, TrainingRunner, TrainingSlots


@st.cache_resource(show_spinner="Reading Tiny Shakespeare…")
def shakespeare_corpus(block_size: int) -> Corpus:
    """One encoded copy per block size, shared read-only by every session."""
    return Corpus(load_shakespeare(), block_size)


@st.cache_resource(show_spinner="Reading Tiny Shakespeare…")
def shakespeare_twice() -> str:
    """The induction recipe's text, made once for every session."""
    return every_line_twice(load_shakespeare())


@st.cache_resource
def training_slots(workers: str, max_trainings: int | None) -> TrainingSlots:
    """The server-wide queue: one for every session (keyed by the backend and the cap). Threads
    keep a core for the pages; Ray workers run niced, so every core trains (new_runner sizes
    the queue to the cluster once Ray is up)."""
    cores = os.cpu_count() or 2
    return TrainingSlots(max_trainings or (max(1, cores - 1) if workers == "threads" else cores))


def prepare_workers() -> None:
    """A server on Ray starts it, and warms its workers (trainings' and sampling's), at the
    first page anyone opens: the room's Start finds them up. A server on threads never imports Ray."""
    limits, _ = read_limits()
    if limits.workers == "ray":
        from explorer.offpage import ray_sampling, ray_training

        if ray_training.prepare(hosts=limits.max_trainings).is_set():
            ray_training.keep_to_the_first_core()  # once up: its daemons and workers keep every core
        ray_sampling.warm()


def new_runner(settings: Settings, text: str | None, limits: Limits, run: int) -> Runner:
    """A runner for the form's settings on a text (None: Tiny Shakespeare), not yet started.
    Raises ValueError (DataError, bad settings) with a message for the user."""
    slots = training_slots(limits.workers, limits.max_trainings)
    watching = watch(settings.eval_interval)
    if limits.workers == "ray":
        from explorer.offpage import ray_training  # a server on threads never imports Ray

        tokenizer = shakespeare_corpus(settings.block_size).tokenizer if text is None else CharTokenizer.from_text(text)
        vocab_size = tokenizer.vocab_size
        name = f"{stage_of(settings.model_config(vocab_size))} run {run}"
        runner = ray_training.RayTrainingRunner(settings, text, vocab_size, slots, name, step_ms(settings, vocab_size),
                                                **watching)  # starts Ray with the server's first training
        if limits.max_trainings is None:
            slots.resize(ray_training.cluster_cpus())  # machines may have joined since the last training
        return runner
    trainer = make_trainer(settings, text, shakespeare_corpus)
    vocab_size = trainer.corpus.tokenizer.vocab_size
    return TrainingRunner(trainer, slots, probe_ids=probe_ids(trainer.corpus, settings.block_size),
                          name=f"{stage_of(trainer.config)} run {run}", step_ms=step_ms(settings, vocab_size), **watching)


@st.cache_resource
def _step_times() -> StepTimes:
    return StepTimes()


def costs(settings: Settings, vocab_size: int) -> Costs | None:
    """What a live training of these settings costs on this server (a step, an evaluation, a
    sample and snapshot: explorer/offpage/step_times.py); None while it is being measured."""
    # Only the shape, the batch and the optimizer change these costs: not the steps, nor the rates.
    key = repr((settings.model_config(vocab_size), settings.batch_size, settings.optimizer))
    return _step_times().get(key, lambda: measure(settings, vocab_size))


def step_ms(settings: Settings, vocab_size: int) -> float | None:
    """Milliseconds of one real training step of these settings on this server; None while it is
    being measured."""
    measured = costs(settings, vocab_size)
    return None if measured is None else measured.step_ms
