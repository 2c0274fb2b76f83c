"""What the Train view shares between sessions, cached by Streamlit: Tiny Shakespeare encoded
once, the server-wide training queue, and the measured step times."""

import streamlit as st

from core import CharTokenizer
from core.data import Corpus, load_shakespeare
from core.trainer import Trainer, time_step
from explorer.offpage.recipes import Settings
from explorer.offpage.step_times import StepTimes
from explorer.offpage.training_run import TrainingSlots


@st.cache_resource(show_spinner="Reading Tiny Shakespeare…")
def shakespeare_corpus(block_size: int) -> Corpus:
    """One encoded copy per block size, shared read-only by every session."""
    return Corpus(load_shakespeare(), block_size)


def make_trainer(settings: Settings, text: str | None) -> Trainer:
    """A Trainer for the form's settings on a text (None: Tiny Shakespeare). Raises ValueError
    (DataError, bad settings) with a message for the user."""
    if text is None:
        corpus = shakespeare_corpus(settings.block_size)
    else:
        corpus = Corpus(text, settings.block_size, CharTokenizer.from_text(text))
    return Trainer(settings.model_config(corpus.tokenizer.vocab_size), settings.train_config(), corpus)


@st.cache_resource
def training_slots(capacity: int) -> TrainingSlots:
    """The server-wide queue: one for every session (keyed by its capacity)."""
    return TrainingSlots(capacity)


@st.cache_resource
def _step_times() -> StepTimes:
    return StepTimes()


def step_ms(settings: Settings, vocab_size: int) -> float | None:
    """Milliseconds of one real training step of these settings on this server (see
    core.trainer.time_step); None while it is being measured."""
    key = (settings.model_config(vocab_size), settings.train_config())
    return _step_times().get(repr(key), lambda: time_step(*key))
