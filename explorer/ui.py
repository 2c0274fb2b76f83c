"""Widgets every view shares: the prompt box with its bad-input messages, a pick of one
position, charts with Plotly's image button, check marks, CSV and .npz downloads."""

import io
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

PROMPT = "prompt"  # one prompt shared by the views that read a model's insides
DEFAULT_PROMPT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
                  "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?")


@dataclass
class Prompt:
    ids: list[int]
    chars: list[str]  # visible labels, one a position

    @property
    def T(self) -> int:
        return len(self.ids)


def prompt_box(ckpt: Checkpoint, key: str = PROMPT, default: str = DEFAULT_PROMPT, height: int = 110) -> Prompt | None:
    """The prompt as the model can read it: unknown characters named (and dropped if asked),
    cropped to the last block_size characters. None, with a message, when nothing is left."""
    text = st.text_area("Prompt", value=default, key=key, height=height, persist_state="session")
    tokenizer, block_size = ckpt.tokenizer, ckpt.model.config.block_size
    if not text:
        st.warning("The prompt is empty: type at least one character.")
        return None
    unknown = tokenizer.unknown(text)
    if unknown:
        names = ", ".join(repr(ch) for ch in unknown)
        st.warning(f"Not in this model's vocabulary: {names}. The model has no token for "
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


def run_prompt(ckpt: Checkpoint, prompt: Prompt) -> tuple[torch.Tensor, Cache]:
    """The model's logits and cache for the prompt (a batch of one)."""
    return run_with_cache(ckpt.model, torch.tensor([prompt.ids]))


def pick_position(label: str, chars: list[str], key: str) -> int:
    """One position of a sequence, shown with its character; the last by default."""
    if len(chars) == 1:
        return 0  # a slider needs two options
    return st.select_slider(label, options=range(len(chars)), value=len(chars) - 1, key=key,
                            format_func=lambda i: f"{i} {chars[i]}")


def chart(fig: go.Figure, name: str) -> None:
    """A figure with Plotly's own modebar; its camera button saves NAME.png."""
    st.plotly_chart(fig, width="stretch", config={
        "displaylogo": False, "toImageButtonOptions": {"format": "png", "filename": name, "scale": 2}})


def check(ok: bool, label: str) -> None:
    """A claim with a green tick or a red cross (Streamlit's icon font: no emoji font needed)."""
    st.markdown(f"{':green[:material/check_circle:]' if ok else ':red[:material/cancel:]'} {label}")


def matrix_frame(matrix: np.ndarray, rows: list[str], columns: list[str] | None = None) -> pd.DataFrame:
    return pd.DataFrame(matrix, index=rows, columns=columns)


def csv_download(frame: pd.DataFrame, name: str, label: str = "Download CSV") -> None:
    st.download_button(label, frame.to_csv().encode("utf-8"), f"{name}.csv", "text/csv",
                       key=f"csv_{name}", on_click="ignore")


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """Arrays in one compressed .npz (numpy's own format: np.load reads it without pickles)."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()
