"""Compare: two models (or two snapshots of one training) on one prompt: their heads side by
side and their difference, what each predicts after each layer, how hard each finds each
character, and their val loss on the same windows."""

import numpy as np
import streamlit as st
import torch

from core import experiments as E
from core import visible
from core.checkpoint import Checkpoint, CheckpointError
from core.data import Corpus, DataError, load_shakespeare
from core.lens import logit_lens, patterns
from core.tokenizer import UnknownCharactersError
from explorer.glue import sidebar, widgets
from explorer.glue.widgets import Prompt
from explorer.offpage import figures

K = "cmp_"  # widget keys of this view
SIDES = ("A", "B")


def compare_view() -> None:
    st.title("Compare")
    choices = sidebar.model_choices()
    if len(choices) < 2:
        st.info("Compare needs two models: train one (each run, or a Resume after a Stop, joins the sidebar's "
                "list as it is then), upload one, or add a checkpoint to the pretrained folder.")
        return
    labels = list(choices)
    left, right = st.columns(2)
    a_label = left.selectbox("Model A", labels, index=0, key=K + "a")
    b_label = right.selectbox("Model B", labels, index=1, key=K + "b")
    try:
        a, b = choices[a_label](), choices[b_label]()
    except (CheckpointError, OSError) as e:
        st.error(f"Could not load a model: {widgets.escape_markdown(str(e))}")
        return
    same_vocab = a.tokenizer.itos == b.tokenizer.itos
    what_differs(a, b, same_vocab)
    prompt = widgets.prompt_box(a, key=K + "prompt")  # read with A's vocabulary and context
    if prompt is None:
        return
    text = "".join(a.tokenizer.itos[i] for i in prompt.ids)
    if b.tokenizer.unknown(text):
        st.warning(f"Model B does not know {widgets.name_chars(b.tokenizer.unknown(text))}: nothing of the prompt "
                   "is compared. Type a prompt both vocabularies hold.")
        return
    text = text[-b.model.config.block_size:]  # what both can read
    prompts = [read(c, text) for c in (a, b)]
    if len(text) < len(prompt.ids):
        st.info(f"Model B sees at most {b.model.config.block_size} characters: both read the last {len(text)}.")
    heads, lens, losses, val = st.tabs(["Attention", "Logit lens", "Loss per character", "Val loss"])
    with heads:
        attention(a, b, prompts)
    with lens:
        lenses(a, b, prompts)
    with losses:
        char_losses(a, b, prompts, text)
    with val:
        val_losses(a, b, same_vocab)


def read(ckpt: Checkpoint, text: str) -> Prompt:
    ids = ckpt.tokenizer.encode(text)
    return Prompt(ids, [visible(ckpt.tokenizer.itos[i]) for i in ids])


def what_differs(a: Checkpoint, b: Checkpoint, same_vocab: bool) -> None:
    """Say up front what can be compared between these two models and what cannot."""
    ca, cb = a.model.config, b.model.config
    notes = []
    if not same_vocab:
        notes.append(f"Their vocabularies differ ({ca.vocab_size} and {cb.vocab_size} characters): the prompt is "
                     "compared character by character where both know it, but not their val losses.")
    if ca.block_size != cb.block_size:
        notes.append(f"Their contexts differ ({ca.block_size} and {cb.block_size} characters): both read the "
                     "prompt's last characters that fit the shorter one.")
    if (ca.n_layer, ca.n_head) != (cb.n_layer, cb.n_head):
        notes.append(f"Their shapes differ ({ca.n_layer} x {ca.n_head} and {cb.n_layer} x {cb.n_head} "
                     "layers x heads): their heads are shown side by side but not subtracted.")
    for note in notes:
        st.info(note)


def attention(a: Checkpoint, b: Checkpoint, prompts: list[Prompt]) -> None:
    if not (a.model.config.attention and b.model.config.attention):
        st.info("One of them is the bigram model, a lookup table: it has no heads to compare.")
        return
    grids = [patterns(widgets.run_prompt(c, p)[1]).numpy() for c, p in zip((a, b), prompts)]
    for column, side, grid in zip(st.columns(2), SIDES, grids):
        with column:
            st.markdown(f"**Model {side}**")
            widgets.chart(figures.head_grid(grid), f"compare_heads_{side}")
    if grids[0].shape != grids[1].shape:
        return
    L, H = grids[0].shape[:2]
    left, right = st.columns(2)
    layer = left.selectbox("Layer", range(L), key=K + "layer")
    head = right.selectbox("Head", range(H), key=K + "head")
    labels = figures.position_labels(prompts[0].chars)
    diff = grids[1][layer, head] - grids[0][layer, head]
    fig = figures.heatmap(np.where(np.tri(len(labels), dtype=bool), diff, np.nan), labels, labels,
                          f"Layer {layer}, head {head}: B's weights minus A's", x_title="key", y_title="query",
                          value="B − A", zmin=-1, zmax=1, zmid=0, height=560)
    widgets.chart(fig, "compare_head_difference")
    st.caption("Red: B looks there more than A; blue: less. The empty upper triangle is the future, masked in both.")


def lenses(a: Checkpoint, b: Checkpoint, prompts: list[Prompt]) -> None:
    for column, side, ckpt, prompt in zip(st.columns(2), SIDES, (a, b), prompts):
        with column:
            st.markdown(f"**Model {side}**")
            if not ckpt.model.config.attention:
                st.info("The bigram model has no layers to read after.")
                continue
            probs = logit_lens(ckpt.model, widgets.run_prompt(ckpt, prompt)[1])[:, 0]  # (L+1, T, vocab)
            best = probs.max(-1)
            guesses = np.array([[visible(ckpt.tokenizer.itos[i]) for i in row] for row in best.indices.tolist()])
            rows = ["embeddings"] + [f"block {i}" for i in range(ckpt.model.config.n_layer)]
            widgets.chart(figures.by_position(best.values.numpy(), rows, prompt.chars, "The most likely next "
                                              "character, read after each block", row_title="read after",
                                              value="probability", colorscale=figures.WEIGHTS, zmin=0, zmax=1,
                                              text=guesses), f"compare_lens_{side}")


def char_losses(a: Checkpoint, b: Checkpoint, prompts: list[Prompt], text: str) -> None:
    if len(text) < 2:
        st.warning("Type at least two characters: one to read and one to predict.")
        return
    results = [E.char_losses(c.model, p.ids) for c, p in zip((a, b), prompts)]
    chars = list(text[1:])
    vmax = max(5.0, *(float(r.loss.max()) for r in results))
    for column, side, result in zip(st.columns(2), SIDES, results):
        with column:
            st.metric(f"Model {side}: mean loss per character", f"{float(result.loss.mean()):.3f}")
            tips = [f"{visible(ch)}: loss {loss:.2f}" for ch, loss in zip(chars, result.loss.tolist())]
            st.html(figures.coloured_text(chars, result.loss.numpy(), tips, vmax=vmax))
    delta = (results[1].loss - results[0].loss).numpy()
    tips = [f"{visible(ch)}: {la:.2f} (A) → {lb:.2f} (B)" for ch, la, lb in zip(chars, results[0].loss.tolist(),
                                                                     results[1].loss.tolist())]
    st.markdown("**B's loss minus A's**")
    st.html(figures.coloured_text(chars, delta, tips, vmax=max(float(np.abs(delta).max()), 1e-6), signed=True))
    st.caption("Red: harder for B than for A; blue: easier (hover for both losses).")


def val_losses(a: Checkpoint, b: Checkpoint, same_vocab: bool) -> None:
    if not same_vocab:
        st.info("Their vocabularies differ, so the same validation characters cannot be given to both: no val "
                "loss is compared.")
        return
    losses = []
    for ckpt in (a, b):
        try:
            x, y = _windows(ckpt.model.config.block_size, "".join(ckpt.tokenizer.itos), ckpt)
        except (DataError, UnknownCharactersError) as e:
            st.info(f"Tiny Shakespeare's validation split is not available for these models: "
                    f"{widgets.escape_markdown(str(e))}")
            return
        losses.append(_val_loss(widgets.model_key(ckpt.model), ckpt, x, y))
    for column, side, loss in zip(st.columns(2), SIDES, losses):
        column.metric(f"Model {side}: val loss", f"{loss:.4f}")
    windows = ("the same windows" if a.model.config.block_size == b.model.config.block_size else
               "windows as long as each model's context (so not quite the same characters)")
    st.caption(f"On Tiny Shakespeare's validation split, in {windows}, spread evenly over the split: the numbers "
               "of the Experiments view.")


@st.cache_resource(max_entries=8, show_spinner=False)
def _windows(block_size: int, vocab: str, _ckpt: Checkpoint) -> tuple[torch.Tensor, torch.Tensor]:
    return E.val_windows(Corpus(load_shakespeare(), block_size, _ckpt.tokenizer), block_size)


@st.cache_resource(max_entries=16, show_spinner="Measuring the validation loss…")
def _val_loss(key: str, _ckpt: Checkpoint, _x: torch.Tensor, _y: torch.Tensor) -> float:
    return E.val_loss(_ckpt.model, _x, _y)


compare_view()
