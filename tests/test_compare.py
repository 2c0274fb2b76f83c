"""The Compare view through AppTest: two models on one prompt, and what it says when they differ
in vocabulary or context. What it shows is core.experiments' and core.lens' own."""

import shutil

import numpy as np
import pytest
import streamlit as st
from test_app import start, texts

from core import CharTokenizer
from core import experiments as E
from core.checkpoint import load_checkpoint, save_checkpoint
from core.data import Corpus
from explorer.glue.sidebar import PRETRAINED_ENV
from helpers import figure, tiny_model


@pytest.fixture
def two(tiny_checkpoint, tmp_path, monkeypatch, shakespeare):
    """The tiny model and a second one: "other" (untrained, the same vocabulary and context) or
    "hamlet" (another vocabulary and a shorter context)."""
    def folder(kind: str):
        for path in tiny_checkpoint.parent.iterdir():
            shutil.copy(path, tmp_path / path.name)
        tiny = load_checkpoint(tiny_checkpoint)
        if kind == "other":
            save_checkpoint(tmp_path / "other", tiny_model(vocab_size=tiny.model.config.vocab_size, n_layer=2,
                                                           n_head=2, n_embd=32, block_size=32, seed=1), tiny.tokenizer)
        else:
            tok = CharTokenizer.from_text("To be, or not to be, that is the question:\n")
            save_checkpoint(tmp_path / "hamlet", tiny_model(vocab_size=tok.vocab_size, block_size=16), tok)
        monkeypatch.setenv(PRETRAINED_ENV, str(tmp_path))
        st.cache_resource.clear()
        return tiny, load_checkpoint(tmp_path / f"{kind}.json")
    yield folder
    st.cache_resource.clear()


def open_compare(a: str, b: str):
    at = start("compare")
    at.selectbox(key="cmp_a").set_value(f"{a} (pretrained)").run()
    at.selectbox(key="cmp_b").set_value(f"{b} (pretrained)").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_two_models_on_one_prompt_side_by_side_with_their_difference(two, shakespeare):
    tiny, other = two("other")
    at = open_compare("other", "tiny")
    prompt = at.text_area(key="cmp_prompt").value
    ids = tiny.tokenizer.encode(prompt)
    assert not at.info  # nothing to explain: same vocabulary, context and shape
    titles = [figure(at, i)["layout"]["title"]["text"].replace("<br>", " ") for i in range(len(at.get("plotly_chart")))]
    assert titles.count("Attention weights of every head (rows: queries, columns: keys)") == 2
    assert "Layer 0, head 0: B's weights minus A's" in titles
    assert titles.count("The most likely next character, read after each block") == 2
    shown = {m.label: float(m.value) for m in at.metric}
    a_loss, b_loss = (E.char_losses(c.model, ids).loss.mean() for c in (other, tiny))
    assert shown["Model A: mean loss per character"] == pytest.approx(float(a_loss), abs=1e-3)
    assert shown["Model B: mean loss per character"] == pytest.approx(float(b_loss), abs=1e-3)
    x, y = E.val_windows(Corpus(shakespeare, 32, tiny.tokenizer), 32)
    assert shown["Model B: val loss"] == pytest.approx(E.val_loss(tiny.model, x, y), abs=1e-4)
    assert shown["Model A: val loss"] > shown["Model B: val loss"]  # untrained against trained
    at.selectbox(key="cmp_head").set_value(1).run()
    difference = next(figure(at, i) for i in range(len(at.get("plotly_chart")))
                      if figure(at, i)["layout"]["title"]["text"].startswith("Layer 0, head 1"))
    z = np.array(difference["data"][0]["z"], dtype=np.float64)
    assert np.isnan(z[0, 1]) and np.nanmax(np.abs(z)) <= 1  # the future is masked in both


def test_other_vocabularies_and_contexts_are_said_not_a_traceback(two):
    two("hamlet")
    at = open_compare("tiny", "hamlet")
    said = texts(at.info)
    assert "vocabularies differ" in said and "contexts differ" in said
    assert "Model B does not know" in texts(at.warning)  # the default prompt's 'F', for one
    at.text_area(key="cmp_prompt").set_value("to be, or not to be, that is").run()
    assert not at.exception
    said = texts(at.info)
    assert "both read the last 16" in said and "no val loss is compared" in said
    assert len([m for m in at.metric if "mean loss per character" in m.label]) == 2


def test_with_one_model_it_says_what_it_needs(pretrained):
    at = start("compare")
    assert "needs two models" in texts(at.info)
