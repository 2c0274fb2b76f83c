"""Lecture: the checkpoints this project trained, stage by stage, as the lecture builds them."""

import numpy as np
import streamlit as st
import torch

from explorer.glue import sidebar, widgets
from explorer.offpage import figures
from explorer.offpage.checkpoint_table import table

PROMPT = "ROMEO:"
# The table's columns, the losses first; the rest is behind "Details".
FIRST_COLUMNS = ["name", "stage", "val loss", "lecture val loss", "params", "shape", "iterations", "train loss"]
SAMPLE_CHARS = 200


def lecture_view() -> None:
    st.title("The lecture, stage by stage")
    loaded, broken = sidebar.pretrained_checkpoints()
    sidebar.broken_note(broken)
    if not loaded:
        st.info(f"No checkpoints in `{sidebar.pretrained_dir()}`: train them with the scripts in pretrained/.")
        return
    paths, checkpoints = list(loaded), list(loaded.values())
    frame = table(checkpoints)  # in the lecture's order
    st.markdown("Each `stage-*` model adds one step of the lecture to the one before, all trained at one "
                "shape for the same number of steps, so the losses compare fairly. The lecture's own losses "
                "(at its sizes: block 8 until `full`) are beside them: they compare in order, not in value.")
    numbers = {c: st.column_config.NumberColumn(format="%.3f") for c in ("val loss", "lecture val loss", "train loss")}
    st.dataframe(frame[FIRST_COLUMNS].astype({c: float for c in numbers}), hide_index=True,
                 column_config={**numbers, "params": st.column_config.NumberColumn(format="localized")})
    st.caption("`stage-full` is `stage-layernorm` with dropout 0.1. At this small budget the model does not "
               "overfit yet, so dropout only slows it down; it pays off at the lecture's size (`full-gpu`).")
    with st.expander("Details: tokens, wall time, machine, seed"):
        st.dataframe(frame.drop(columns=[*FIRST_COLUMNS[2:], "command"]), hide_index=True)
    widgets.chart(figures.bar_chart(frame["val loss"].to_numpy(dtype=np.float32), list(frame["name"]),
                               "Validation loss by stage (lower is better)", y_title="val loss"), "val_loss_by_stage")
    with st.expander("The command that made each checkpoint"):
        for name, command in zip(frame["name"], frame["command"]):
            st.markdown(f"**{name}**")
            st.code(command or "(not recorded)", language="bash", wrap_lines=True)
    st.subheader(f"What each one writes after {PROMPT!r} (seed 0)")
    path_of = {c.name: p for p, c in zip(paths, checkpoints)}
    for name in frame["name"]:  # the lecture's order, as in the table
        st.markdown(f"**{name}**")
        st.code(sample(str(path_of[name]), path_of[name].stat().st_mtime), language=None, wrap_lines=True)


@st.cache_data(max_entries=32, show_spinner="Sampling…")
def sample(path: str, mtime: float) -> str:
    """The same prompt and seed for every model; cached per file version for every session."""
    ckpt = sidebar.load_pretrained(path, mtime)
    ids = torch.tensor([ckpt.tokenizer.encode(PROMPT, errors="drop") or [0]])
    out = ckpt.model.generate(ids, SAMPLE_CHARS, generator=torch.Generator().manual_seed(0))
    return ckpt.tokenizer.decode(out[0].tolist())


lecture_view()
