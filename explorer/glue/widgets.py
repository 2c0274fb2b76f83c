"""Widgets every view shares: the prompt box with its bad-input messages, a pick of one
position, charts with Plotly's image button, check marks, CSV and .npz downloads."""

import hashlib
import io
import re
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st
import torch

from core import visible
from core.checkpoint import Checkpoint
from core.lens import run_with_cache
from core.model import Cache
from explorer.offpage import figures

PROMPT = "prompt"  # one prompt shared by the views that read a model's insides
MAX_NAMED = 20  # unknown characters a warning names; the rest are counted
MARKDOWN_SPECIALS = re.compile(r"([\\`*_\[\]<>#~$:|])")
DEFAULT_PROMPT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
                  "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?")
SQUARE_MIN_PX = 220  # a chart of square cells is never flatter than this (a 1 x 6 grid of heads on a phone)
SCREEN_LESS_PX = 160  # what a chart of square cells leaves of the screen: Streamlit's header, a row of controls above it


@dataclass
class Prompt:
    ids: list[int]
    chars: list[str]  # visible labels, one a position

    @property
    def T(self) -> int:
        return len(self.ids)


def fitting(text: str, block_size: int) -> str:
    """The longest start of text that fits a context of block_size characters and ends at the
    end of a line, else of a word: a default prompt that no model crops mid-word."""
    if len(text) <= block_size:
        return text
    head = text[:block_size + 1]
    for sep in ("\n", " "):
        cut = head.rfind(sep)
        if cut > 0:
            return text[:cut]
    return text[:block_size]


def prompt_box(ckpt: Checkpoint, key: str = PROMPT, default: str = DEFAULT_PROMPT, height: int = 110) -> Prompt | None:
    """The prompt as the model can read it: unknown characters named (and dropped if asked),
    cropped to the last block_size characters. None, with a message, when nothing is left.
    The default is cut to fit the model's context."""
    tokenizer, block_size = ckpt.tokenizer, ckpt.model.config.block_size
    text = st.text_area("Prompt", value=fitting(default, block_size), key=key, height=height, persist_state="session")
    if not text:
        st.warning("The prompt is empty: type at least one character.")
        return None
    unknown = tokenizer.unknown(text)
    if unknown:
        st.warning(f"Not in this model's vocabulary: {name_chars(unknown)}. The model has no token for "
                   f"{'it' if len(unknown) == 1 else 'them'}.")
        if not st.checkbox("Drop unknown characters", key=f"{key}_drop"):
            return None
    ids = tokenizer.encode(text, errors="drop")
    if not ids:
        st.warning("No character of the prompt is in the vocabulary: type some that are.")
        return None
    if len(ids) > block_size:
        st.info(f"The prompt has {len(ids)} characters; this model sees at most {block_size} (its block_size), "
                f"so it was cropped to the last {block_size}.")
        ids = ids[-block_size:]
    return Prompt(ids, [visible(tokenizer.itos[i]) for i in ids])


def name_chars(chars: list[str]) -> str:
    """Characters as a message names them: quoted with their code point, so that a combining
    accent or an invisible character can be told apart; at most MAX_NAMED, then a count."""
    names = ", ".join(f"{ch!r} (U+{ord(ch):04X})" for ch in chars[:MAX_NAMED])
    more = f" and {len(chars) - MAX_NAMED:,} more" if len(chars) > MAX_NAMED else ""
    return escape_markdown(names) + more


def escape_markdown(text: str) -> str:
    """Text shown as itself by Streamlit's markdown (st.markdown, st.error, ...): a file name or a
    file's contents may hold `*`, `[link](url)`, `:red[...]` or `$math$`."""
    return MARKDOWN_SPECIALS.sub(r"\\\1", text)


_MODEL_KEYS: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()


def model_key(model: torch.nn.Module) -> str:
    """A name for caches, new for every model object (an id() may be reused by a later model).
    The views never change a model in place, so a name always means the same weights."""
    return _MODEL_KEYS.setdefault(model, uuid.uuid4().hex)


def run_key(ckpt: Checkpoint, prompt: Prompt) -> tuple:
    """What a prompt's run depends on: the model and the prompt's ids."""
    return model_key(ckpt.model), tuple(prompt.ids)


def run_prompt(ckpt: Checkpoint, prompt: Prompt) -> tuple[torch.Tensor, Cache]:
    """The model's logits and cache for the prompt (a batch of one), computed once for every
    session that shows the same model the same prompt (a workshop on one pretrained model):
    shared, so read them and never change them."""
    return _run(run_key(ckpt, prompt), ckpt.model)


@st.cache_resource(max_entries=4, show_spinner=False)  # a full-size cache is large: benchmarks/README.md, inference
def _run(key: tuple, _model: torch.nn.Module) -> tuple[torch.Tensor, Cache]:
    return run_with_cache(_model, torch.tensor([key[1]]))


def pick_position(label: str, chars: list[str], key: str) -> int:
    """One position of a sequence, shown with its character; the last by default."""
    if len(chars) == 1:
        return 0  # a slider needs two options
    if st.session_state.get(key, -1) not in range(len(chars)):  # new, or past the end of a shorter text
        st.session_state[key] = len(chars) - 1
    return st.select_slider(label, options=range(len(chars)), key=key, format_func=lambda i: f"{i} {chars[i]}")


def chart(fig: go.Figure, name: str, **select) -> None:
    """A figure with Plotly's own modebar; its camera button saves NAME.png. select: on_select
    and key of st.plotly_chart, for a figure that can be clicked.

    A figure with square cells keeps its shape at any width: drawn at its own height on a phone, it
    would leave blank bands above and below the plot, and the server never learns the screen's width.
    So the browser sizes it: a box of the plot's aspect ratio (CSS), never taller than the figure
    or than the screen less a row of controls, that the chart fills."""
    config = {"displaylogo": False, "toImageButtonOptions": {"format": "png", "filename": name, "scale": 2}}
    aspect = figures.plot_aspect(fig)
    if aspect is None:
        st.plotly_chart(fig, width="stretch", config=config, **select)
        return
    box = f"chart_{name}"
    st.html(f"<style>.st-key-{box} {{aspect-ratio: {aspect:.4f}; min-height: {SQUARE_MIN_PX}px; "
            f"max-height: min({fig.layout.height}px, calc(100vh - {SCREEN_LESS_PX}px))}}</style>")
    with st.container(key=box):
        st.plotly_chart(fig, width="stretch", height="stretch", config=config, **select)


def shared_chart(build: Callable[..., go.Figure], *args, name: str, select: dict | None = None, **kwargs) -> None:
    """chart() of build(*args, **kwargs), a builder of explorer.offpage.figures, built once for
    every session that draws it from the same inputs: the cache key is the builder and a digest
    of every argument, arrays by their bytes. Building a figure is Python that holds the GIL,
    which the server's sessions share. name is only the PNG's file name; select as in chart()."""
    chart(_figure(figure_key(build, args, kwargs), build, args, kwargs), name, **(select or {}))


def figure_key(build: Callable, args: tuple, kwargs: dict) -> str:
    digest = hashlib.blake2b(f"{build.__module__}.{build.__qualname__}".encode(), digest_size=16)
    for value in (*args, *sorted(kwargs.items())):
        if isinstance(value, np.ndarray):
            digest.update(f"{value.dtype}{value.shape}".encode())
            digest.update(np.ascontiguousarray(value).tobytes())
        else:
            digest.update(repr(value).encode())
        digest.update(b"\0")
    return digest.hexdigest()


@st.cache_resource(max_entries=256, show_spinner=False)  # figure sizes: benchmarks/README.md, app speed
def _figure(key: str, _build: Callable[..., go.Figure], _args: tuple, _kwargs: dict) -> go.Figure:
    return _build(*_args, **_kwargs)


def check(ok: bool, label: str) -> None:
    """A claim with a green tick or a red cross (Streamlit's icon font: no emoji font needed)."""
    st.markdown(f"{':green[:material/check_circle:]' if ok else ':red[:material/cancel:]'} {label}")


def matrix_frame(matrix: np.ndarray, rows: list[str], columns: list[str] | None = None) -> pd.DataFrame:
    return pd.DataFrame(matrix, index=rows, columns=columns)


def csv_download(frame: pd.DataFrame, name: str, label: str = "Download CSV") -> None:
    """Written only on the click: serialising a large matrix on every run slowed the page."""
    st.download_button(label, lambda: frame.to_csv().encode("utf-8"), f"{name}.csv", "text/csv",
                       key=f"csv_{name}", on_click="ignore")


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """Arrays in one compressed .npz (numpy's own format: np.load reads it without pickles)."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()
