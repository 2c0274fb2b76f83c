"""Activations: the residual stream, MLP neurons, LayerNorm, the logit lens and the embeddings."""

import numpy as np
import streamlit as st
import torch

from core import lens, stage_of, visible
from core.checkpoint import Checkpoint
from core.lens import cosine_similarity, layer_norm_io, layer_norms, logit_lens, pca_2d, residual_streams
from core.model import Cache
from core.stages import first_with
from explorer.glue import sidebar, widgets
from explorer.glue.widgets import Prompt
from explorer.offpage import figures

TOP_NEURONS = 20  # bars for one position
SHOWN_NEURONS = 48  # rows of the neurons x positions map


def activations_view() -> None:
    st.title("Activations")
    ckpt = sidebar.require_checkpoint()
    if not ckpt.model.config.attention:
        st.info("This is the bigram model, a lookup table: it has no residual stream, MLP, LayerNorm, "
                "logit lens or position embeddings. Below is its one table: row i holds the scores of the "
                "character that follows character i.")
        token_embeddings(ckpt)
        return
    prompt = widgets.prompt_box(ckpt)
    if prompt is None:
        return
    _, cache = widgets.run_prompt(ckpt, prompt)
    stream, mlp, norm, lens, embeddings = st.tabs(["Residual stream", "MLP neurons", "LayerNorm", "Logit lens",
                                                   "Embeddings"])
    with stream:
        residual_norms(ckpt, cache, prompt)
    with mlp:
        mlp_neurons(ckpt, cache, prompt)
    with norm:
        layer_norm(ckpt, cache, prompt)
    with lens:
        logit_lens_map(ckpt, cache, prompt)
    with embeddings:
        token_embeddings(ckpt)
        position_embeddings(ckpt)


def _stream_names(n_layer: int) -> list[str]:
    return ["embeddings"] + [f"block {i}" for i in range(n_layer)]


def _missing(ckpt: Checkpoint, what: str, part: str) -> None:
    st.info(f"This model (stage: {stage_of(ckpt.model.config)}) has no {what}: it arrives in the lecture's "
            f"{first_with(part)} stage.")


def residual_norms(ckpt: Checkpoint, cache: Cache, prompt: Prompt) -> None:
    norms = residual_streams(cache)[:, 0].norm(dim=-1)  # (L+1, T)
    if not ckpt.model.config.residual:
        st.caption("No residual connections at this stage: each row is what a block hands to the next, "
                   "not a running sum.")
    fig = figures.by_position(norms.numpy(), _stream_names(ckpt.model.config.n_layer), prompt.chars,
                              "Length ‖x‖ of the residual stream at each position", row_title="after",
                              value="norm", colorscale="Viridis")
    widgets.chart(fig, "residual_norms")


def mlp_neurons(ckpt: Checkpoint, cache: Cache, prompt: Prompt) -> None:
    cfg = ckpt.model.config
    if not cfg.feed_forward:
        _missing(ckpt, "feed-forward layer (MLP)", "feed_forward")
        return
    left, right = st.columns([1, 3])
    layer = left.selectbox("Layer", range(cfg.n_layer), key="mlp_layer")
    with right:
        t = widgets.pick_position("Position", prompt.chars, key="mlp_position")
    post = lens.mlp_post(cache, layer)[0]  # (T, 4C): after the nonlinearity
    top = torch.topk(post[t], k=min(TOP_NEURONS, post.shape[1]))
    widgets.chart(figures.bar_chart(top.values.numpy(), [f"n{i}" for i in top.indices.tolist()],
                               f"The most active neurons at position {t} ('{prompt.chars[t]}'), layer {layer}",
                               x_title="neuron", y_title=f"{cfg.activation} output"), f"top_neurons_L{layer}_{t}")
    shown = post.abs().amax(0).topk(min(SHOWN_NEURONS, post.shape[1])).indices.sort().values
    fig = figures.by_position(post[:, shown].T.numpy(), [f"n{i}" for i in shown.tolist()], prompt.chars,
                              f"Neurons × positions, layer {layer}: the {len(shown)} most active of "
                              f"{post.shape[1]}", row_title="neuron", value="activation",
                              **_activation_scale(cfg.activation), height=200 + 12 * len(shown))
    widgets.chart(fig, f"neurons_L{layer}")


def _activation_scale(activation: str) -> dict:
    """ReLU never goes below 0: a one-sided scale from 0. GELU dips just below 0: diverging at 0."""
    return dict(colorscale="Viridis", zmin=0) if activation == "relu" else dict(zmid=0)


def layer_norm(ckpt: Checkpoint, cache: Cache, prompt: Prompt) -> None:
    if not ckpt.model.config.layer_norm:
        _missing(ckpt, "LayerNorm", "layer_norm")
        return
    name = st.selectbox("LayerNorm", layer_norms(cache), key="ln_name")
    before, after = (x[0] for x in layer_norm_io(cache, name))  # each (T, C)
    series = {"mean before": before.mean(-1), "std before": before.std(-1, unbiased=False),
              "mean after": after.mean(-1), "std after": after.std(-1, unbiased=False)}
    fig = figures.line_chart({k: v.numpy() for k, v in series.items()}, prompt.chars,
                             f"{name}: each position's mean and spread over its {before.shape[-1]} channels",
                             dashed=("mean after", "std after"))
    widgets.chart(fig, f"layernorm_{name}")
    st.caption("LayerNorm moves every position's vector to mean 0 and standard deviation 1, then applies its "
               "learned gain and bias: the dashed lines sit near what those make of 0 and 1.")


def logit_lens_map(ckpt: Checkpoint, cache: Cache, prompt: Prompt) -> None:
    probs = logit_lens(ckpt.model, cache)[:, 0]  # (L+1, T, vocab)
    best = probs.max(-1)
    itos = ckpt.tokenizer.itos
    guesses = np.array([[visible(itos[i]) for i in row] for row in best.indices.tolist()])
    fig = figures.by_position(best.values.numpy(), _stream_names(ckpt.model.config.n_layer), prompt.chars,
                              "The most likely next character, read after each block", row_title="read after",
                              value="probability", colorscale=figures.WEIGHTS, zmin=0, zmax=1, text=guesses)
    widgets.chart(fig, "logit_lens")
    st.caption("Each row sends the residual stream through the model's final LayerNorm and lm_head, as if "
               "the model ended there; the last row is the model's own prediction. Colour: its probability.")


def token_embeddings(ckpt: Checkpoint) -> None:
    table = ckpt.model.token_embedding_table.weight.detach()  # (vocab, C)
    points, share = pca_2d(table)
    labels = [visible(ch) for ch in ckpt.tokenizer.itos]
    widgets.chart(figures.scatter_2d(points.numpy(), labels, f"Token embeddings on their two main directions "
                                f"(PCA, {share:.0%} of the variance)", x_title="PC 1", y_title="PC 2"),
             "token_embeddings")


def position_embeddings(ckpt: Checkpoint) -> None:
    table = ckpt.model.position_embedding_table.weight.detach()  # (block_size, C)
    positions = [str(t) for t in range(table.shape[0])]
    widgets.chart(figures.heatmap(cosine_similarity(table).numpy(), positions, positions,
                             "Cosine similarity of the position embeddings", x_title="position",
                             y_title="position", value="cosine", zmin=-1, zmax=1, zmid=0, height=520),
             "position_similarity")


activations_view()
