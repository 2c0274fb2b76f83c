"""Attention: what each character looks at, one step of the computation at a time."""

import numpy as np
import pandas as pd
import streamlit as st

from core import lens
from core.lens import ATTENTION_STEPS, attention_step, head_stats
from core.model import Cache
from core.stages import first_with
from explorer.glue import sidebar, widgets
from explorer.glue.widgets import Prompt
from explorer.offpage import figures

STEPS = {
    "raw": "**q · kᵀ**: how well each query (row) matches each key (column). Nothing is hidden yet.",
    "scaled": "**q · kᵀ / √head_size**: scaled so the scores keep a variance near 1, and the softmax "
              "does not turn into a one-hot at initialisation.",
    "masked": "**masked_fill(tril == 0, −inf)**: the future is set to −inf, so a character may look only "
              "at itself and what came before it.",
    "softmax": "**softmax** of each row: the attention weights. −inf becomes 0, and each row sums to 1.",
}


def attention_view() -> None:
    st.title("Attention")
    ckpt = sidebar.require_checkpoint()
    cfg = ckpt.model.config
    if not cfg.attention:
        st.info("This is the bigram model: it has no attention. Each character predicts the next from its "
                f"own row of a lookup table and never looks at the others. Attention arrives in the "
                f"{first_with('attention')} stage.")
        return
    prompt = widgets.prompt_box(ckpt)
    if prompt is None:
        return
    _, cache = widgets.run_prompt(ckpt, prompt)
    left, middle, right = st.columns([1, 1, 3])
    layer = left.selectbox("Layer", range(cfg.n_layer), key="attn_layer")
    head = middle.selectbox("Head", range(cfg.n_head), key="attn_head")
    step = right.radio("Step", ATTENTION_STEPS, horizontal=True, key="attn_step", index=len(ATTENTION_STEPS) - 1)
    one_head(cache, layer, head, step, prompt)
    grid, query, lines, stats = st.tabs(["All heads", "One query", "Lines", "Statistics"])
    with grid:
        all_heads(cache)
    with query:
        one_query(cache, layer, head, prompt)
    with lines:
        pattern = lens.pattern(cache, layer)[0, head].numpy()
        st.caption(f"Layer {layer}, head {head}: each key (left) joins each query (right) that reads it; "
                   "the darker the line, the more weight.")
        widgets.shared_chart(figures.bipartite, pattern, prompt.chars, name=f"lines_L{layer}H{head}")
    with stats:
        statistics(cache)


def one_head(cache: Cache, layer: int, head: int, step: str, prompt: Prompt) -> None:
    scores = attention_step(cache, layer, step)[0, head].numpy()  # (T, T): queries x keys
    name = f"attention_L{layer}H{head}_{step}"
    widgets.shared_chart(figures.attention_heatmap, scores, prompt.chars, step, f"Layer {layer}, head {head}: {step}",
                         name=name)
    st.markdown(STEPS[step])
    labels = figures.position_labels(prompt.chars)
    widgets.csv_download(widgets.matrix_frame(scores, labels, labels), name)


def all_heads(cache: Cache) -> None:
    st.caption("Softmax weights of every head at once. Above 128 characters each pixel shows the largest "
               "weight of a small block of cells.")
    widgets.shared_chart(figures.head_grid, lens.patterns(cache).numpy(), name="all_heads")  # (L, H, T, T)


def one_query(cache: Cache, layer: int, head: int, prompt: Prompt) -> None:
    """The lecture's weighted sum for one query: z = Σ_j w_j v_j."""
    t = widgets.pick_position("Query position", prompt.chars, key="attn_query")
    weights = lens.pattern(cache, layer)[0, head, t, : t + 1].numpy()  # (t+1,)
    values = lens.values(cache, layer)[0, : t + 1, head].numpy()  # (t+1, head_size)
    z = lens.head_outputs(cache, layer)[0, t, head].numpy()  # (head_size,)
    keys = prompt.chars[: t + 1]
    widgets.shared_chart(figures.bar_chart, weights, figures.position_labels(keys),
                         f"What '{prompt.chars[t]}' (position {t}) looks at: layer {layer}, head {head}",
                         x_title="key", y_title="weight", name=f"query_{t}_L{layer}H{head}")
    st.markdown(f"Its output is the weighted sum of the values of the characters it looks at: "
                f"**z = Σⱼ wⱼ vⱼ**, the head's `hook_z` at position {t}.")
    widgets.shared_chart(figures.weighted_sum, weights, values, z, keys, name=f"weighted_sum_{t}_L{layer}H{head}")
    diff = float(np.abs(weights @ values - z).max())
    widgets.check(np.allclose(weights @ values, z, atol=1e-5), f"w · v summed equals `hook_z` (largest difference {diff:.1e})")


def statistics(cache: Cache) -> None:
    patterns = lens.patterns(cache)
    L, H = patterns.shape[:2]
    stats = head_stats(patterns)
    frame = pd.DataFrame({name: s.flatten().numpy() for name, s in stats.items()},
                         index=pd.MultiIndex.from_product([range(L), range(H)], names=["layer", "head"]))
    st.dataframe(frame, column_config={name: st.column_config.NumberColumn(format="%.3f") for name in frame})
    st.caption("entropy: how spread out a query's weights are, in nats (log(t+1) for an even spread over "
               "t+1 keys, 0 for a single key). mean_distance: how far back a query looks on average. "
               "prev_char, first_char: the weight on the previous and on the first character "
               "(queries from position 1 on).")
    widgets.csv_download(frame, "head_statistics")


attention_view()
