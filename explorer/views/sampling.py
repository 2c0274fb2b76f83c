"""Sample: the model writes one character at a time; for each one, see its odds and what it looked at."""

import numpy as np
import streamlit as st

from core import lens, visible
from core.checkpoint import Checkpoint
from explorer.glue import sidebar, widgets
from explorer.glue.engines import engine_for
from explorer.glue.session import session_threads
from explorer.offpage import figures
from explorer.offpage.sample_job import Sample, SampleJob

TOP_CHARS = 15
PICK, CLICK = "sample_pick", "sample_text_click"  # the slider's key, the clickable text's
WINDOWS = {"fast": "Fast: slide by half a block", "lecture": "The lecture's: slide by one character"}


def sample_view() -> None:
    st.title("Sample")
    ckpt = sidebar.require_checkpoint()
    prompt = widgets.prompt_box(ckpt, key="sample_prompt", default="ROMEO:", height=70)
    length_col, temperature_col, k_col, p_col, seed_col = st.columns(5)
    length = length_col.slider("Length", 1, 500, 200, key="sample_length")
    temperature = temperature_col.slider("Temperature", 0.0, 2.0, 1.0, step=0.05, key="sample_temperature",
                                         help="0 always takes the most likely character")
    top_k = k_col.number_input("Top-k (0: off)", 0, ckpt.model.config.vocab_size, 0, key="sample_top_k")
    top_p = p_col.slider("Top-p (1: off)", 0.05, 1.0, 1.0, step=0.05, key="sample_top_p")
    seed = int(seed_col.number_input("Seed", value=0, step=1, key="sample_seed"))
    window = st.radio("Window", list(WINDOWS), format_func=WINDOWS.get, horizontal=True, key="sample_window",
                      help=f"Once the text is longer than the model's context ({ckpt.model.config.block_size} "
                           "characters), the fast window runs by default: it drops half a block at once, so the "
                           "model reuses what it computed for every character but one recompute per half block; "
                           "the lecture's drops one character at a time and recomputes the whole context for "
                           "every character, slower, and from then on writes other characters.")
    threads = session_threads()
    if prompt is not None and st.button("Generate", type="primary", key="sample_generate"):
        if threads.sample is not None:
            threads.sample.stop()  # a new Generate replaces one still writing
        settings = dict(temperature=temperature, top_k=int(top_k) or None, top_p=top_p, seed=seed, window=window)
        threads.sample = SampleJob(engine_for(ckpt), st.session_state.get(sidebar.MODEL), prompt.ids, length,
                                   settings)
    job = threads.sample
    if job is None or job.label != st.session_state.get(sidebar.MODEL):
        return
    if job.alive:
        writing(job, ckpt)
        return
    if job.error:
        st.error(job.error)
        return
    result = job.result()
    show_text(ckpt, result)
    if result.new_ids:
        inspect_character(ckpt, result)


def writing(job: SampleJob, ckpt: Checkpoint) -> None:
    """The text so far, polled while the job writes; one full rerun when it ends."""

    @st.fragment(run_every=SampleJob.poll_seconds())
    def poll() -> None:
        if not job.alive:
            st.rerun(scope="app")
        st.button("Stop", key="sample_stop", on_click=job.stop)
        show_text(ckpt, job.result())

    poll()


def show_text(ckpt: Checkpoint, result: Sample) -> None:
    st.code(ckpt.tokenizer.decode(result.prompt_ids + result.new_ids), language=None, wrap_lines=True)


def _clicked() -> int | None:
    """The character clicked in the text since the last run, if any (each click counts once)."""
    event = st.session_state.get(CLICK)
    points = event.selection.points if event is not None else []
    if not points or points == st.session_state.get(CLICK + "_seen"):
        return None
    st.session_state[CLICK + "_seen"] = points
    return int(points[0]["point_index"])


def inspect_character(ckpt: Checkpoint, result: Sample) -> None:
    """The odds one written character was drawn from, and what the model looked at to write it.
    Its run and figures are shared (widgets): the page runs again whenever the sidebar does."""
    itos = ckpt.tokenizer.itos
    chars = [visible(itos[i]) for i in result.new_ids]
    clicked = _clicked()
    if clicked is not None and clicked < len(chars):
        st.session_state[PICK] = clicked  # a click in the text moves the slider there
    chosen = st.session_state.get(PICK, len(chars) - 1)
    widgets.shared_chart(figures.clickable_text, chars, chosen if chosen < len(chars) else None, name="sample_text",
                         select=dict(on_select="rerun", selection_mode="points", key=CLICK))
    i = widgets.pick_position("Generated character", chars, key=PICK)
    probs = result.probs[i]
    top = np.argsort(probs)[::-1][:TOP_CHARS]
    chosen = result.new_ids[i]
    highlight = int(np.flatnonzero(top == chosen)[0]) if chosen in top else None
    widgets.shared_chart(figures.bar_chart, probs[top], [visible(itos[j]) for j in top],
                         f"Character {i}: '{chars[i]}' (red) was drawn from these odds "
                         "(after temperature, top-k and top-p)", x_title="next character",
                         y_title="probability", highlight=highlight, name=f"sample_odds_{i}")
    if not ckpt.model.config.attention:
        st.info("The bigram model has no attention: it wrote this character from the previous one alone.")
        return
    block_size = ckpt.model.config.block_size
    context = (result.prompt_ids + result.new_ids[:i])[-block_size:]  # what the model saw
    seen = widgets.Prompt(context, [visible(itos[j]) for j in context])
    _, cache = widgets.run_prompt(ckpt, seen)
    cfg = ckpt.model.config
    rows = lens.patterns(cache)[:, :, -1]
    labels = [f"layer {layer} head {h}" for layer in range(cfg.n_layer) for h in range(cfg.n_head)]
    widgets.shared_chart(figures.by_position, rows.reshape(len(labels), -1).numpy(), labels, seen.chars,
                         f"What the last character of the context looked at to write '{chars[i]}'",
                         row_title="head", value="weight", colorscale=figures.WEIGHTS, zmin=0, zmax=1,
                         height=160 + 28 * len(labels), name=f"sample_attention_{i}")


sample_view()
