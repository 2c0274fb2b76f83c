"""Lecture: the checkpoints this project trained, stage by stage, as the lecture builds them."""

import numpy as np
import streamlit as st
import torch

from explorer.glue import sidebar, widgets
from explorer.offpage import figures
from explorer.offpage.checkpoint_table import table

PROMPT = "ROMEO:"
SAMPLE_CHARS = 200


def lecture_view() -> None:
    st.title("The lecture, stage by stage")
    paths = sidebar.pretrained_paths()
    if not paths:
        st.info(f"No checkpoints in `{sidebar.pretrained_dir()}`: train them with the scripts in pretrained/.")
        return
    checkpoints = [sidebar.load_pretrained(str(p), p.stat().st_mtime) for p in paths]
    frame = table(checkpoints)
    st.markdown("Each `stage-*` model adds one step of the lecture to the one before, all trained at one "
                "shape for the same number of steps, so the losses compare fairly. The lecture's own losses "
                "(at its sizes) are beside them.")
    st.dataframe(frame.drop(columns=["command"]), hide_index=True, column_config={
        "train loss": st.column_config.NumberColumn(format="%.3f"),
        "val loss": st.column_config.NumberColumn(format="%.3f")})
    widgets.chart(figures.bar_chart(frame["val loss"].to_numpy(dtype=np.float32), list(frame["name"]),
                               "Validation loss by stage (lower is better)", y_title="val loss"), "val_loss_by_stage")
    with st.expander("The command that made each checkpoint"):
        for name, command in zip(frame["name"], frame["command"]):
            st.markdown(f"**{name}**")
            st.code(command or "(not recorded)", language="bash")
    st.subheader(f"What each one writes after {PROMPT!r} (seed 0)")
    for path, name in zip(paths, [c.name for c in checkpoints]):
        st.markdown(f"**{name}**")
        st.code(sample(str(path), path.stat().st_mtime), language=None)


@st.cache_data(max_entries=32, show_spinner="Sampling…")
def sample(path: str, mtime: float) -> str:
    """The same prompt and seed for every model; cached per file version for every session."""
    ckpt = sidebar.load_pretrained(path, mtime)
    ids = torch.tensor([ckpt.tokenizer.encode(PROMPT, errors="drop") or [0]])
    out = ckpt.model.generate(ids, SAMPLE_CHARS, generator=torch.Generator().manual_seed(0))
    return ckpt.tokenizer.decode(out[0].tolist())


lecture_view()
