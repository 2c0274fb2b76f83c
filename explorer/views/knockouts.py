"""Experiments: knock out a head and see what it did; rank every head; what kind each head is;
which characters the model finds hard."""

import numpy as np
import pandas as pd
import streamlit as st
import torch

from core import experiments as E
from core import visible
from core.checkpoint import Checkpoint
from core.data import TRAIN_FRACTION, Corpus, DataError, load_shakespeare
from core.model import GPT, Edits
from core.tokenizer import UnknownCharactersError
from explorer.glue import sidebar, widgets
from explorer.offpage import figures

HOW = {"zero": "set to zero", "mean": "set to its mean over the validation characters"}
SAMPLE_CHARS = 200
LOSS_TEXT_CHARS = 1500  # the default text: the start of the validation split
MAX_LOSS_CHARS = 5000  # a longer text is cut here: 5,000 spans are already a long page
HARDEST = 12
RANK_CHART = "exp_rank_chart"
RANKED = "exp_ranked"  # (model key, how) of the rankings this session asked for


def experiments_view() -> None:
    st.title("Experiments")
    ckpt = sidebar.require_checkpoint()
    if not ckpt.model.config.attention:
        st.info("This is the bigram model, a lookup table: it has no heads to knock out.")
        return
    try:
        x, y = _val_windows(widgets.model_key(ckpt.model), ckpt)
    except (DataError, UnknownCharactersError) as e:
        st.warning(f"Experiments are judged on Tiny Shakespeare's validation split, which is not available "
                   f"for this model: {widgets.escape_markdown(str(e))}")
        return
    st.caption(f"Every loss here is measured on the same {y.numel():,} validation characters ({len(x)} windows "
               f"spread evenly over the split), so numbers compare across views and models.")
    knock, rank, types, hard = st.tabs(["Knock out a head", "Rank every head", "Head types", "Loss per character"])
    with knock:
        knock_out(ckpt, x, y)
    with rank:
        ranking(ckpt, x, y)
    with types:
        head_types(ckpt, x)
    with hard:
        loss_per_character(ckpt)


@st.cache_resource(max_entries=8, show_spinner=False)
def _val_windows(key: str, _ckpt: Checkpoint) -> tuple[torch.Tensor, torch.Tensor]:
    T = _ckpt.model.config.block_size
    return E.val_windows(Corpus(load_shakespeare(), T, _ckpt.tokenizer), T)


@st.cache_resource(max_entries=8, show_spinner="Averaging every head's output…")
def _means(key: str, _model: GPT, _x: torch.Tensor) -> E.Means:
    return E.activation_means(_model, _x)


def _edits(ckpt: Checkpoint, x: torch.Tensor, layer: int, head: int, how: str) -> Edits:
    means = _means(widgets.model_key(ckpt.model), ckpt.model, x) if how == "mean" else None
    return E.ablate_heads(ckpt.model, [(layer, head)], means)


@st.cache_resource(max_entries=256, show_spinner="Measuring the validation loss…")
def _val_loss(key: str, knocked_out: tuple | None, _ckpt: Checkpoint, _x: torch.Tensor, _y: torch.Tensor) -> float:
    """The val loss with nothing removed (knocked_out None) or without (layer, head, how)."""
    return E.val_loss(_ckpt.model, _x, _y, _edits(_ckpt, _x, *knocked_out) if knocked_out else None)


def knock_out(ckpt: Checkpoint, x: torch.Tensor, y: torch.Tensor) -> None:
    cfg = ckpt.model.config
    left, middle, right = st.columns([1, 1, 2])
    layer = left.selectbox("Layer", range(cfg.n_layer), key="exp_layer")
    head = middle.selectbox("Head", range(cfg.n_head), key="exp_head")
    how = right.radio("Its output is", list(HOW), horizontal=True, key="exp_how", format_func=HOW.get)
    key = widgets.model_key(ckpt.model)
    base, without = _val_loss(key, None, ckpt, x, y), _val_loss(key, (layer, head, how), ckpt, x, y)
    a, b, c = st.columns(3)
    a.metric("val loss", f"{base:.4f}")
    b.metric(f"without layer {layer}, head {head}", f"{without:.4f}")
    c.metric("Δ val loss", f"{without - base:+.4f}", delta=f"{without - base:+.4f}", delta_color="inverse")
    prompt = widgets.prompt_box(ckpt)
    if prompt is None:
        return
    edits = _edits(ckpt, x, layer, head, how)
    if prompt.T >= 2:
        st.subheader("What it changes on the prompt")
        clean, ablated = E.char_losses(ckpt.model, prompt.ids), E.char_losses(ckpt.model, prompt.ids, edits)
        delta = (ablated.loss - clean.loss).numpy()
        chars = [ckpt.tokenizer.itos[i] for i in prompt.ids[1:]]
        tips = [f"{visible(ch)}: loss {c:.2f} → {a:.2f} without the head" for ch, c, a in
                zip(chars, clean.loss.tolist(), ablated.loss.tolist())]
        st.html(figures.coloured_text(chars, delta, tips, vmax=max(float(np.abs(delta).max()), 1e-6), signed=True))
        st.caption(f"Each character on the change in its loss without the head: red, harder to predict; blue, "
                   f"easier (hover for the losses). On the prompt: {float(clean.loss.mean()):.3f} → "
                   f"{float(ablated.loss.mean()):.3f}.")
    st.subheader("The same seed, with and without the head")
    seed = int(st.number_input("Seed", value=0, step=1, key="exp_seed"))
    start = tuple(prompt.ids[-cfg.block_size:])
    with_head, without_head = st.columns(2)
    with_head.markdown("**With every head**")
    with_head.code(_sample(key, start, seed, None, ckpt, x), language=None, wrap_lines=True)
    without_head.markdown(f"**Without layer {layer}, head {head}**")
    without_head.code(_sample(key, start, seed, (layer, head, how), ckpt, x), language=None, wrap_lines=True)


@st.cache_resource(max_entries=64, show_spinner="Writing…")
def _sample(key: str, start: tuple, seed: int, knocked_out: tuple | None, _ckpt: Checkpoint, _x: torch.Tensor) -> str:
    edits = _edits(_ckpt, _x, *knocked_out) if knocked_out else None
    with E.evaluating(_ckpt.model):
        out = _ckpt.model.generate(torch.tensor([start]), SAMPLE_CHARS, generator=torch.Generator().manual_seed(seed),
                                   edits=edits)
    return _ckpt.tokenizer.decode(out[0, len(start):].tolist())


@st.cache_resource(max_entries=8, show_spinner="Knocking out every head, one at a time…")
def _ranking(key: str, how: str, _ckpt: Checkpoint, _x: torch.Tensor, _y: torch.Tensor) -> E.Ranking:
    means = _means(key, _ckpt.model, _x) if how == "mean" else None
    return E.rank_ablations(_ckpt.model, _x, _y, means)


def _pick_head() -> None:
    """A click on the ranking selects that head in the selectors above."""
    points = st.session_state[RANK_CHART].selection.points
    if points and "customdata" in points[0]:
        st.session_state["exp_layer"], st.session_state["exp_head"] = (int(v) for v in points[0]["customdata"])


def ranking(ckpt: Checkpoint, x: torch.Tensor, y: torch.Tensor) -> None:
    how = st.session_state.get("exp_how", "zero")
    key = widgets.model_key(ckpt.model)
    ranked = st.session_state.setdefault(RANKED, set())
    st.markdown(f"Each head alone knocked out (its output {HOW[how]}), and each layer's MLP: how much the "
                "validation loss rises without it.")
    if st.button("Rank every head", key="exp_rank", type="primary"):
        ranked.add((key, how))
    if (key, how) not in ranked:
        return
    result = _ranking(key, how, ckpt, x, y)
    widgets.shared_chart(figures.ablation_grid, result.heads.numpy(), result.mlps.numpy(),
                         f"Δ val loss without each part (val loss {result.base:.4f})", name="ablation_ranking",
                         select=dict(on_select=_pick_head, selection_mode="points", key=RANK_CHART))
    st.caption("Click a head to knock it out in the first tab.")
    cfg = ckpt.model.config
    frame = pd.DataFrame({"layer": np.repeat(np.arange(cfg.n_layer), cfg.n_head),
                          "head": np.tile(np.arange(cfg.n_head), cfg.n_layer),
                          "Δ val loss": result.heads.flatten().numpy()}).sort_values("Δ val loss", ascending=False)
    widgets.csv_download(frame, "ablation_ranking")


@st.cache_resource(max_entries=8, show_spinner="Scoring every head…")
def _head_types(key: str, _model: GPT, _x: torch.Tensor) -> tuple[pd.DataFrame, E.InContext]:
    types = E.head_types(_model, _x)
    L, H = types["induction"].shape
    frame = pd.DataFrame({name: t.flatten().numpy() for name, t in types.items()},
                         index=pd.MultiIndex.from_product([range(L), range(H)], names=["layer", "head"]))
    return frame, E.icl_gap(_model)


def head_types(ckpt: Checkpoint, x: torch.Tensor) -> None:
    frame, icl = _head_types(widgets.model_key(ckpt.model), ckpt.model, x)
    st.dataframe(frame, column_config={name: st.column_config.NumberColumn(format="%.3f") for name in frame})
    st.caption("previous_token, first_token: the attention weight on the previous and on the first character, "
               "on validation text. induction: on random characters repeated once, the weight a character of "
               "the second copy puts on what followed the same character in the first copy (1: an induction "
               "head, which lets a model copy from its context).")
    a, b, c = st.columns(3)
    a.metric("loss on the first copy", f"{icl.first:.3f}")
    b.metric("loss on the second copy", f"{icl.second:.3f}")
    c.metric("in-context learning", f"{icl.gap:+.3f}")
    st.caption("Nothing predicts random characters the first time; a model that copies from its context "
               "predicts them the second time. A gap near 0: this model does not copy yet.")
    widgets.csv_download(frame, "head_types")


def _default_text() -> str:
    try:
        text = load_shakespeare()
    except DataError:
        return widgets.DEFAULT_PROMPT
    return text[int(TRAIN_FRACTION * len(text)):][:LOSS_TEXT_CHARS]


def loss_per_character(ckpt: Checkpoint) -> None:
    text = st.text_area("Text", value=_default_text(), key="exp_loss_text", height=160)
    if len(text) > MAX_LOSS_CHARS:
        st.info(f"The text has {len(text):,} characters; the first {MAX_LOSS_CHARS:,} are scored.")
        text = text[:MAX_LOSS_CHARS]
    tokenizer = ckpt.tokenizer
    if tokenizer.unknown(text):
        st.info(f"Not in this model's vocabulary, left out: {widgets.name_chars(tokenizer.unknown(text))}.")
    ids = tokenizer.encode(text, errors="drop")
    if len(ids) < 2:
        st.warning("Type at least two characters the model knows: one to read and one to predict.")
        return
    result = _char_losses(widgets.model_key(ckpt.model), tuple(ids), ckpt)
    chars = [tokenizer.itos[i] for i in ids[1:]]
    guesses = [", ".join(f"{visible(tokenizer.itos[i])} {p:.0%}" for i, p in zip(top, probs))
               for top, probs in zip(result.top_ids.tolist(), result.top_probs.tolist())]
    losses = result.loss.numpy()
    tips = [f"{visible(ch)}: loss {loss:.2f}; the model guessed {g}" for ch, loss, g in zip(chars, losses, guesses)]
    st.metric("mean loss per character", f"{float(losses.mean()):.3f}")
    st.html(figures.coloured_text(chars, losses, tips, vmax=5.0))
    st.caption("Each character on its loss: white, predicted with confidence; red, a surprise (5 nats or more). "
               "Hover for the model's top guesses there. The first character has nothing to be predicted from.")
    hardest = np.argsort(-losses)[:HARDEST]
    context = ["".join(visible(tokenizer.itos[i]) for i in ids[max(0, j - 11): j + 1]) for j in hardest]  # before chars[j]
    st.dataframe(pd.DataFrame({"position": hardest + 1, "character": [visible(chars[j]) for j in hardest],
                               "after": context, "loss": losses[hardest], "the model guessed": [guesses[j] for j in hardest]}),
                 hide_index=True, column_config={"loss": st.column_config.NumberColumn(format="%.2f")})


@st.cache_resource(max_entries=16, show_spinner="Scoring every character…")
def _char_losses(key: str, ids: tuple, _ckpt: Checkpoint) -> E.CharLosses:
    return E.char_losses(_ckpt.model, list(ids))


experiments_view()
