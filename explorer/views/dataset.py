"""Data: Tiny Shakespeare as the model reads it: the vocabulary, the split, and get_batch."""

from collections import Counter

import pandas as pd
import streamlit as st
import torch

from core import CharTokenizer, visible
from core.averages import context_target_pairs
from core.data import Corpus, DataError, load_shakespeare
from explorer.glue import sidebar


@st.cache_resource(show_spinner="Reading Tiny Shakespeare…")
def shakespeare() -> Corpus:
    """Encoded once for every session; get_batch only reads it."""
    return Corpus(load_shakespeare(), block_size=8)


@st.cache_resource
def character_counts() -> Counter:
    return Counter(shakespeare().text)


def data_view() -> None:
    st.title("Data")
    try:
        corpus = shakespeare()
    except DataError as e:
        st.error(f"Tiny Shakespeare is not available: {e}")
        return
    vocabulary(corpus)
    splits(corpus)
    batches(corpus)


def vocabulary(corpus: Corpus) -> None:
    tok = corpus.tokenizer
    st.subheader(f"The vocabulary: {tok.vocab_size} characters")
    st.markdown("`chars = sorted(set(text))`: every distinct character is a token; `stoi` maps it to its "
                "index, `itos` back.")
    counts = character_counts()
    table = pd.DataFrame({"character": [visible(ch) for ch in tok.itos],
                          "code point": [f"U+{ord(ch):04X}" for ch in tok.itos],
                          "count in the text": [counts[ch] for ch in tok.itos]})
    table.index.name = "id (stoi)"
    st.dataframe(table, height=280)
    ckpt = sidebar.checkpoint()
    if ckpt is not None and ckpt.tokenizer.itos != tok.itos:
        st.caption("The model chosen in the sidebar has another vocabulary: it was trained on other text.")
    text = st.text_input("Encode", "hii there", key="data_encode")
    unknown = tok.unknown(text)
    if unknown:
        st.warning(f"Not in the vocabulary: {', '.join(repr(ch) for ch in unknown)}.")
    else:
        ids = tok.encode(text)
        st.markdown(f"`encode` → `{ids}` → `decode` → `{tok.decode(ids)!r}`")


def splits(corpus: Corpus) -> None:
    st.subheader("Train and validation")
    train, val = (len(corpus.splits[name]) for name in ("train", "val"))
    left, right = st.columns(2)
    left.metric("train: the first 90%", f"{train:,} characters")
    right.metric("val: the last 10%", f"{val:,} characters")
    st.caption("The model never trains on the validation split, so its loss there shows how well it "
               "generalises rather than how well it memorised.")


def batches(corpus: Corpus) -> None:
    st.subheader("get_batch")
    cols = st.columns(4)
    batch_size = cols[0].slider("batch_size (B)", 1, 8, 4, key="data_B")
    block_size = cols[1].slider("block_size (T)", 1, 32, 8, key="data_T")
    split = cols[2].radio("split", ["train", "val"], horizontal=True, key="data_split")
    seed = int(cols[3].number_input("seed", value=1337, step=1, key="data_seed"))
    x, y = corpus.get_batch(split, batch_size, block_size, generator=torch.Generator().manual_seed(seed))
    show_ids = st.toggle("Show ids instead of characters", key="data_ids")
    left, right = st.columns(2)
    left.markdown("**inputs x** (B, T)")
    left.dataframe(_batch_frame(x, corpus.tokenizer, show_ids))
    right.markdown("**targets y**: x shifted left by one")
    right.dataframe(_batch_frame(y, corpus.tokenizer, show_ids))
    b = st.selectbox("Row of the batch", range(batch_size), key="data_row")
    st.markdown(f"One row holds {block_size} examples, one per context length:")
    itos = corpus.tokenizer.itos
    lines = [f"when input is {[visible(itos[i]) for i in context]} the target is {visible(itos[target])!r}"
             for context, target in context_target_pairs(x[b].tolist(), y[b].tolist())]
    st.code("\n".join(lines), language=None, wrap_lines=True)


def _batch_frame(batch: torch.Tensor, tok: CharTokenizer, show_ids: bool) -> pd.DataFrame:
    cells = batch.tolist() if show_ids else [[visible(tok.itos[i]) for i in row] for row in batch.tolist()]
    return pd.DataFrame(cells).rename_axis(index="b", columns="t")


data_view()
