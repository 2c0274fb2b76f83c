"""Export: any matrix of a prompt's run as CSV, the whole cache as .npz. (Each figure saves
itself as PNG through the camera button of its toolbar.)"""

from functools import partial

import numpy as np
import streamlit as st

from core import lens, visible
from core.lens import head_matrix
from explorer.glue import sidebar, widgets
from explorer.offpage import figures


def export_view() -> None:
    st.title("Export")
    st.markdown("Every figure in the explorer has a camera button in its toolbar that saves it as a PNG. "
                "Here: the numbers behind them, for a spreadsheet or a notebook.")
    ckpt = sidebar.require_checkpoint()
    prompt = widgets.prompt_box(ckpt)
    if prompt is None:
        return
    logits, cache = widgets.run_prompt(ckpt, prompt)
    tensors = {"logits": logits, **cache}
    st.subheader("The whole cache")
    st.markdown(f"{len(cache)} tensors named as in TransformerLens, plus `tokens` and `logits`; "
                "`np.load(path)` reads them.")
    arrays = {"tokens": np.array(prompt.ids)} | {name: t.numpy() for name, t in tensors.items()}
    # Built only on the click: the cache of a full-size model is tens of MB.
    st.download_button("Download cache (.npz)", partial(widgets.npz_bytes, arrays), "cache.npz",
                       "application/octet-stream", key="npz", on_click="ignore")

    st.subheader("One matrix")
    left, right = st.columns([3, 1])
    name = left.selectbox("Tensor", list(tensors), key="export_name")
    per_head = tensors[name].dim() == 4
    head = right.selectbox("Head", range(ckpt.model.config.n_head), key="export_head") if per_head else 0
    matrix = head_matrix(tensors, name, head).numpy()
    rows = figures.position_labels(prompt.chars)
    if name == "logits":
        columns = [visible(ch) for ch in ckpt.tokenizer.itos]
    elif lens.is_quadratic(name):
        columns = rows  # (query, key)
    else:
        columns = None  # numbered dimensions
    frame = widgets.matrix_frame(matrix, rows, columns)
    st.caption(f"{name}: shape {tuple(tensors[name].shape)}; this table: {matrix.shape[0]} × {matrix.shape[1]}"
               + (f", head {head}." if per_head else "."))
    st.dataframe(frame, height=300)
    widgets.csv_download(frame, name.replace(".", "_") + (f"_head{head}" if per_head else ""))


export_view()
