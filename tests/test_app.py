"""The explorer through Streamlit's AppTest: every view renders, the controls change what is
shown, the figures hold what they claim, and bad input gets a message, never a traceback."""

import math
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import streamlit as st
import torch
from streamlit.runtime import caching
from streamlit.testing.v1 import AppTest

from core import GPT, engine, visible
from core.checkpoint import checkpoint_bytes, load_checkpoint, save_checkpoint
from core.data import DATA_ENV
from core.lens import ATTENTION_STEPS, attention_step, run_with_cache
from explorer.app import GIL_SWITCH_S, PAGES
from explorer.glue.sidebar import PRETRAINED_ENV
from explorer.glue.widgets import DEFAULT_PROMPT, fitting
from explorer.offpage import figures
from helpers import figure, rerun_until, tiny_model, wait_for

APP = Path(__file__).resolve().parent.parent / "explorer" / "app.py"
TICK, CROSS = ":green[:material/check_circle:]", ":red[:material/cancel:]"


@pytest.fixture
def stages(tiny_checkpoint, tmp_path, monkeypatch):
    """Untrained bigram and one_head models, with the tiny model's vocabulary, as the only checkpoints."""
    tokenizer = load_checkpoint(tiny_checkpoint).tokenizer
    for preset in ("bigram", "one_head"):
        save_checkpoint(tmp_path / preset, tiny_model(preset, vocab_size=tokenizer.vocab_size), tokenizer)
    monkeypatch.setenv(PRETRAINED_ENV, str(tmp_path))


def start(view: str | None = None, **state) -> AppTest:
    """The app after its first run (on `view` if given), with no exception on the page."""
    at = AppTest.from_file(str(APP), default_timeout=30)
    for key, value in state.items():
        at.session_state[key] = value
    at.run()
    if view:
        at.switch_page(f"views/{view}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def heat(at: AppTest, i: int = 0) -> np.ndarray:
    """The matrix of the first trace of chart i (None cells, Plotly's 'no value', as NaN)."""
    z = figure(at, i)["data"][0]["z"]
    return np.array(z, dtype=np.float64)


def texts(elements) -> str:
    return "\n".join(e.value for e in elements)


def set_prompt(at: AppTest, text: str, key: str = "prompt") -> AppTest:
    return at.text_area(key=key).set_value(text).run()


@pytest.mark.parametrize("file", [file for file, _, _ in PAGES])
def test_every_view_renders(pretrained, file):
    at = start(Path(file).stem)
    assert at.main.title and not at.error, texts(at.error)


def test_layer_head_and_step_each_change_the_figure(pretrained):
    at = start("attention")
    seen = [heat(at)]
    at.selectbox(key="attn_layer").set_value(1).run()
    seen.append(heat(at))
    at.selectbox(key="attn_head").set_value(1).run()
    seen.append(heat(at))
    at.radio(key="attn_step").set_value("scaled").run()
    seen.append(heat(at))
    assert figure(at)["layout"]["title"]["text"].split("<br>")[0] == "Layer 1, head 1: scaled"  # then the axes' names
    for before, after in zip(seen, seen[1:]):
        assert not np.allclose(np.nan_to_num(before), np.nan_to_num(after))


def test_the_server_hands_the_gil_over_quickly(pretrained):
    sys.setswitchinterval(0.005)  # Python's default
    start()
    assert sys.getswitchinterval() == GIL_SWITCH_S


def test_sessions_share_a_figure_and_another_model_gets_its_own(pretrained, monkeypatch):
    built = []
    heatmap = figures.attention_heatmap
    monkeypatch.setattr(figures, "attention_heatmap", lambda *args, **kw: built.append(args) or heatmap(*args, **kw))
    st.cache_resource.clear()  # the figures earlier tests drew
    first = heat(start("attention"))
    np.testing.assert_array_equal(heat(start("attention")), first)  # another session: drawn once
    assert len(built) == 1
    ckpt = load_checkpoint(pretrained)
    torch.manual_seed(1)
    weights, meta = checkpoint_bytes(GPT(ckpt.model.config), ckpt.tokenizer)  # same names and shapes
    at = start("attention")
    at.file_uploader(key="upload").set_value([("other.safetensors", weights, "application/octet-stream"),
                                              ("other.json", meta, "application/json")]).run()
    assert at.selectbox(key="model").value == "other (uploaded)" and len(built) == 2
    assert not np.allclose(np.nan_to_num(heat(at)), np.nan_to_num(first))
    st.cache_resource.clear()


@pytest.mark.parametrize("step", ATTENTION_STEPS)
def test_attention_figure_is_the_models_own_and_causal(pretrained, step):
    at = start("attention")
    at.radio(key="attn_step").set_value(step).run()
    z = heat(at)
    # What the figure shows is core's cache for the last block_size characters of the prompt.
    ckpt = load_checkpoint(pretrained)
    ids = ckpt.tokenizer.encode(fitting(DEFAULT_PROMPT, ckpt.model.config.block_size))
    _, cache = run_with_cache(ckpt.model, torch.tensor([ids]))
    expected = attention_step(cache, 0, step)[0, 0].numpy()
    np.testing.assert_allclose(z, np.where(np.isneginf(expected), np.nan, expected), rtol=1e-5, atol=1e-6)
    above = np.triu_indices(len(z), 1)
    if step == "softmax":
        np.testing.assert_allclose(z.sum(1), 1, atol=1e-5)
        assert (z[above] == 0).all()
    elif step == "masked":
        assert not np.isfinite(z[above]).any() and np.isfinite(z[np.tril_indices(len(z))]).all()
        assert "−inf" in figure(at)["layout"]["annotations"][0]["text"]
    else:
        assert np.isfinite(z).all()  # before the mask, the future has scores too


def test_scaled_is_raw_over_sqrt_head_size(pretrained):
    at = start("attention")
    at.radio(key="attn_step").set_value("raw").run()
    raw = heat(at)
    at.radio(key="attn_step").set_value("scaled").run()
    head_size = load_checkpoint(pretrained).model.config.head_size
    np.testing.assert_allclose(heat(at), raw / math.sqrt(head_size), rtol=1e-5, atol=1e-6)


def test_one_query_weighted_sum_and_head_statistics(pretrained):
    at = start("attention")
    at.select_slider(key="attn_query").set_value(5).run()
    bars = figure(at, 2)["data"][0]
    assert len(bars["x"]) == 6 and math.isclose(float(np.sum(bars["y"])), 1, abs_tol=1e-5)
    assert TICK in texts(at.markdown) and CROSS not in texts(at.markdown)
    cfg = load_checkpoint(pretrained).model.config
    stats = at.dataframe[0].value
    assert len(stats) == cfg.n_layer * cfg.n_head
    assert ((stats["prev_char"] >= 0) & (stats["prev_char"] <= 1)).all()


def test_all_heads_grid_is_one_uint8_trace(pretrained):
    at = start("attention")
    grid = figure(at, 1)["data"]
    assert len(grid) == 1 and grid[0]["z"].dtype == np.uint8


def test_long_prompt_is_cropped_and_says_so(pretrained):
    at = start("attention")
    assert not at.info and heat(at).shape == (len(fitting(DEFAULT_PROMPT, 32)),) * 2  # the default fits the model
    set_prompt(at, DEFAULT_PROMPT)
    assert "cropped to the last 32" in texts(at.info)
    assert heat(at).shape == (32, 32)
    ticks = figure(at)["layout"]["yaxis"]["ticktext"]
    assert ticks == [visible(ch) for ch in DEFAULT_PROMPT[-32:]]
    set_prompt(at, "To be, or not")
    assert not at.info and heat(at).shape == (13, 13)


def test_unknown_characters_are_named_and_can_be_dropped(pretrained):
    at = set_prompt(start("attention"), "Tö be ¤")
    assert "'ö'" in texts(at.warning) and "'¤'" in texts(at.warning)
    assert not at.get("plotly_chart")
    at.checkbox(key="prompt_drop").check().run()
    assert not at.exception and heat(at).shape == (5, 5)  # "T be "


def test_empty_prompt_gets_a_message(pretrained):
    at = set_prompt(start("activations"), "")
    assert "empty" in texts(at.warning) and not at.get("plotly_chart")


def test_prompt_is_shared_between_views(pretrained):
    at = set_prompt(start("attention"), "To be, or not")
    at.switch_page("views/export.py").run()
    assert at.text_area(key="prompt").value == "To be, or not"


def test_invalid_upload_shows_an_error_and_the_app_stays_usable(pretrained):
    at = start("attention")
    at.file_uploader(key="upload").set_value([("x.safetensors", b"not tensors", "application/octet-stream"),
                                              ("x.json", b"{}", "application/json")]).run()
    assert not at.exception and "Not a valid checkpoint" in texts(at.error)
    assert at.selectbox(key="model").value == "tiny (pretrained)" and at.get("plotly_chart")
    at.file_uploader(key="upload").set_value(("x.json", b"{}", "application/json")).run()
    assert "one .safetensors file and one .json file" in texts(at.error)


def test_valid_upload_is_listed_and_chosen(pretrained):
    at = start("attention")
    at.file_uploader(key="upload").set_value([
        ("tiny.safetensors", pretrained.with_suffix(".safetensors").read_bytes(), "application/octet-stream"),
        ("tiny.json", pretrained.read_bytes(), "application/json")]).run()
    picker = at.selectbox(key="model")
    assert picker.value == "tiny (uploaded)" and "tiny (pretrained)" in picker.options
    assert not at.error and at.get("plotly_chart")


def test_model_trained_in_this_session_is_listed(pretrained):
    at = start(trained_models={"mine": load_checkpoint(pretrained)})
    assert at.selectbox(key="model").options == ["mine (trained here)", "tiny (pretrained)"]  # its own first


def test_no_checkpoints_says_where_to_get_one(tmp_path, monkeypatch):
    monkeypatch.setenv(PRETRAINED_ENV, str(tmp_path))
    at = start("attention")
    assert "No checkpoints" in texts(at.sidebar.info) and "Choose a model" in texts(at.info)
    at.switch_page("views/trick.py").run()  # the lecture's trick needs no model
    assert not at.exception and at.get("plotly_chart")


def test_stages_without_a_component_say_what_they_lack(stages):
    at = start("attention")
    assert at.selectbox(key="model").value == "bigram (pretrained)"
    assert "no attention" in texts(at.info)
    at.switch_page("views/activations.py").run()
    assert "bigram" in texts(at.info) and at.get("plotly_chart")  # its lookup table, in 2-D
    at.selectbox(key="model").set_value("one_head (pretrained)").run()
    info = texts(at.info)
    assert "no feed-forward layer" in info and "no LayerNorm" in info
    assert not at.exception and at.get("plotly_chart")


def generate(at: AppTest) -> AppTest:
    """Click Generate, then rerun until the sample is written (the page polls a thread)."""
    at.button(key="sample_generate").click().run()
    assert rerun_until(at, lambda at: "sample_stop" not in keys(at.button)), "the sample never finished"
    return at


def keys(widgets) -> list[str]:
    return [w.key for w in widgets]


def test_sample_streams_then_shows_odds_and_attention(pretrained):
    at = start("sampling")
    at.slider(key="sample_length").set_value(20).run()
    at.slider(key="sample_temperature").set_value(0.0).run()
    text = generate(at).code[0].value
    ckpt = load_checkpoint(pretrained)
    prompt = torch.tensor([ckpt.tokenizer.encode("ROMEO:")])
    assert text == ckpt.tokenizer.decode(ckpt.model.generate(prompt, 20, temperature=0)[0].tolist())  # greedy
    written = figure(at, 0)["data"][0]  # the text as characters to click, the last one marked
    assert len(written["text"]) == 20 and written["marker"]["color"][-1] != written["marker"]["color"][0]
    odds = figure(at, 1)["data"][0]
    assert odds["marker"]["color"][0] != odds["marker"]["color"][1]  # greedy: the top bar was drawn
    np.testing.assert_allclose(heat(at, 2).sum(1), 1, atol=1e-5)  # each head's row of weights
    at.select_slider(key="sample_pick").set_value(0).run()
    assert figure(at, 1)["layout"]["title"]["text"].startswith("Character 0")
    assert figure(at, 0)["data"][0]["marker"]["color"][0] != "rgba(0,0,0,0)"  # the picked one is marked
    assert at.code[0].value == text  # picking a character does not sample again


def test_the_lecture_window_is_an_option(pretrained):
    at = start("sampling")
    at.slider(key="sample_length").set_value(60).run()  # past the window of 32: the two windows part
    at.radio(key="sample_window").set_value("lecture").run()
    text = generate(at).code[0].value
    ckpt = load_checkpoint(pretrained)
    ids = ckpt.tokenizer.encode("ROMEO:")
    lecture = [t for t, _ in engine.stream(ckpt.model, ids, 60, seed=0, window="lecture")]
    assert text == ckpt.tokenizer.decode(ids + lecture)


@pytest.fixture
def slow_sampling(monkeypatch):
    """Every character takes 50 ms in the sampling engine, so a sample outlasts a script run."""
    sample_next = engine.sample_rows

    def slow(*args, **kwargs):
        time.sleep(0.05)
        return sample_next(*args, **kwargs)

    monkeypatch.setattr(engine, "sample_rows", slow)


def test_a_sample_is_written_by_a_thread_and_can_be_stopped(pretrained, slow_sampling):
    at = start("sampling")
    at.slider(key="sample_length").set_value(200).run()  # 10 s at 50 ms a character
    began = time.monotonic()
    at.button(key="sample_generate").click().run()
    assert time.monotonic() - began < 5 and "sample_stop" in keys(at.button)  # the run did not wait for it
    at.slider(key="sample_temperature").set_value(0.5).run()  # another click: the sample goes on
    assert rerun_until(at, lambda at: len(at.code[0].value) > len("ROMEO:") + 5)
    at.button(key="sample_stop").click().run()
    assert rerun_until(at, lambda at: "sample_pick" in keys(at.select_slider))
    written = len(at.code[0].value) - len("ROMEO:")
    assert 5 < written < 200 and not at.exception


def test_a_closed_tab_stops_its_sample(pretrained, slow_sampling):
    def sampling() -> bool:
        return any(t.name == "gpt-explorer-sample" for t in threading.enumerate())

    at = start("sampling")
    at.button(key="sample_generate").click().run()
    assert sampling()
    caching.clear_session_resource_cache("test session id")  # what the server does when a tab closes
    assert wait_for(lambda: not sampling(), timeout=5)


def test_a_sample_that_fails_shows_why_and_the_app_stays_up(pretrained, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(engine, "sample_rows", broken)
    at = generate(start("sampling"))
    assert "Sampling failed: RuntimeError: out of memory" in texts(at.error)
    at.switch_page("views/attention.py").run()
    assert not at.exception and at.get("plotly_chart")


def test_trick_versions_agree(pretrained):
    at = start("trick")
    for T, C, seed in ((8, 2, 1337), (5, 8, 0), (16, 1, 7)):  # the first is what a visitor sees first
        at.slider(key="trick_T").set_value(T)
        at.slider(key="trick_C").set_value(C)
        at.number_input(key="trick_seed").set_value(seed).run()
        marks = texts(at.markdown)
        assert marks.count(TICK) == 5 and CROSS not in marks, (T, C, seed)
        assert heat(at, 1).shape == (T, T)


def test_data_view_shows_the_split_and_a_batch(pretrained, shakespeare):
    at = start("dataset")
    train, val = (int(m.value.split()[0].replace(",", "")) for m in at.metric)
    assert train + val == len(shakespeare)
    at.slider(key="data_T").set_value(5).run()
    lines = at.code[0].value.splitlines()
    assert len(lines) == 5 and all(line.startswith("when input is") for line in lines)


def test_data_view_without_the_text_says_how_to_get_it(pretrained, tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "missing.txt"))
    st.cache_resource.clear()  # forget the corpus an earlier test loaded
    at = start("dataset")
    assert "Tiny Shakespeare is not available" in texts(at.error) and "missing.txt" in texts(at.error)
    st.cache_resource.clear()


def test_export_shows_any_matrix(pretrained):
    at = start("export")
    assert {b.label for b in at.get("download_button")} >= {"Download cache (.npz)", "Download CSV"}
    at.selectbox(key="export_name").set_value("blocks.1.attn.hook_pattern").run()
    at.selectbox(key="export_head").set_value(1).run()
    frame = at.dataframe[0].value
    assert frame.shape == (len(fitting(DEFAULT_PROMPT, 32)),) * 2
    np.testing.assert_allclose(frame.sum(axis=1), 1, atol=1e-5)


def test_the_app_opens_from_a_relative_path_as_streamlits_docs_write_it(pretrained):
    at = AppTest.from_file("../explorer/app.py", default_timeout=60).run()  # relative to this file
    assert not at.exception and at.sidebar.selectbox(key="model").value == "tiny (pretrained)"


def test_the_lecture_table_leads_with_the_losses_in_the_lecture_order(stages, tmp_path):
    for path in tmp_path.glob("*.json"):  # named as the shipped ones, alphabetical order the reverse of the lecture's
        for old in (path, path.with_suffix(".safetensors")):
            old.rename(old.with_name(old.name.replace("bigram", "stage-z-bigram").replace("one_head", "stage-a-one_head")))
    at = start("lecture")
    table = at.dataframe[0].value
    assert list(table.columns[:4]) == ["name", "stage", "val loss", "lecture val loss"]
    assert list(table["stage"]) == ["bigram", "one_head"]
    assert "None" not in table.astype(str).to_numpy()  # an untrained model's missing losses are blanks
    names = [m.value.strip("*") for m in at.markdown if m.value.startswith("**stage-")]
    assert names[-2:] == list(table["name"])  # the samples (last on the page) follow the table, not the file names
