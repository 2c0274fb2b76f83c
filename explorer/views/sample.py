"""Sample: the model writes one character at a time; for each one, see its odds and what it looked at."""

from dataclasses import dataclass

import numpy as np
import streamlit as st
import torch

from core import visible
from core.checkpoint import Checkpoint
from core.lens import run_with_cache
from explorer import figures, state, ui
from explorer.ui import Prompt

RESULT = "sample_result"  # session key: the last Sample
TOP_CHARS = 15


@dataclass
class Sample:
    model: str  # the picker's label of the model that wrote it
    prompt_ids: list[int]
    new_ids: list[int]
    probs: np.ndarray  # (n, vocab): the distribution each new character was drawn from


def sample_view() -> None:
    st.title("Sample")
    ckpt = state.require_checkpoint()
    prompt = ui.prompt_box(ckpt, key="sample_prompt", default="ROMEO:", height=70)
    length_col, temperature_col, k_col, p_col, seed_col = st.columns(5)
    length = length_col.slider("Length", 1, 500, 200, key="sample_length")
    temperature = temperature_col.slider("Temperature", 0.0, 2.0, 1.0, step=0.05, key="sample_temperature",
                                         help="0 always takes the most likely character")
    top_k = k_col.number_input("Top-k (0: off)", 0, ckpt.model.config.vocab_size, 0, key="sample_top_k")
    top_p = p_col.slider("Top-p (1: off)", 0.05, 1.0, 1.0, step=0.05, key="sample_top_p")
    seed = int(seed_col.number_input("Seed", value=0, step=1, key="sample_seed"))
    out = st.empty()  # the text streams in here
    if prompt is not None and st.button("Generate", type="primary", key="sample_generate"):
        settings = dict(temperature=temperature, top_k=int(top_k) or None, top_p=top_p,
                        generator=torch.Generator().manual_seed(seed))
        st.session_state[RESULT] = generate(ckpt, prompt, length, settings, out)
    result = st.session_state.get(RESULT)
    if result is None or result.model != st.session_state.get(state.MODEL):
        return
    out.code(ckpt.tokenizer.decode(result.prompt_ids + result.new_ids), language=None, wrap_lines=True)
    inspect_character(ckpt, result)


def generate(ckpt: Checkpoint, prompt: Prompt, length: int, settings: dict, out) -> Sample:
    """Sample with model.generate_stream, writing each character into `out` as it arrives."""
    text = ckpt.tokenizer.decode(prompt.ids)
    new, probs = [], []
    for token, p in ckpt.model.generate_stream(torch.tensor([prompt.ids]), length, **settings):
        new.append(int(token))
        probs.append(p[0].numpy())
        text += ckpt.tokenizer.itos[new[-1]]
        out.code(text, language=None, wrap_lines=True)
    return Sample(st.session_state.get(state.MODEL), prompt.ids, new, np.stack(probs))


def inspect_character(ckpt: Checkpoint, result: Sample) -> None:
    """The odds one written character was drawn from, and what the model looked at to write it."""
    itos = ckpt.tokenizer.itos
    chars = [visible(itos[i]) for i in result.new_ids]
    i = ui.pick_position("Generated character", chars, key="sample_pick")
    probs = result.probs[i]
    top = np.argsort(probs)[::-1][:TOP_CHARS]
    chosen = result.new_ids[i]
    highlight = int(np.flatnonzero(top == chosen)[0]) if chosen in top else None
    ui.chart(figures.bar_chart(probs[top], [visible(itos[j]) for j in top],
                               f"Character {i}: '{chars[i]}' (red) was drawn from these odds "
                               "(after temperature, top-k and top-p)", x_title="next character",
                               y_title="probability", highlight=highlight), f"sample_odds_{i}")
    if not ckpt.model.config.attention:
        st.info("The bigram model has no attention: it wrote this character from the previous one alone.")
        return
    block_size = ckpt.model.config.block_size
    context = (result.prompt_ids + result.new_ids[:i])[-block_size:]  # what the model saw
    _, cache = run_with_cache(ckpt.model, torch.tensor([context]))
    cfg = ckpt.model.config
    rows = torch.stack([cache[f"blocks.{layer}.attn.hook_pattern"][0, :, -1] for layer in range(cfg.n_layer)])
    labels = [f"layer {layer} head {h}" for layer in range(cfg.n_layer) for h in range(cfg.n_head)]
    fig = figures.by_position(rows.reshape(len(labels), -1).numpy(), labels, [visible(itos[j]) for j in context],
                              f"What the last character of the context looked at to write '{chars[i]}'",
                              row_title="head", value="weight", colorscale=figures.WEIGHTS, zmin=0, zmax=1,
                              height=160 + 28 * len(labels))
    ui.chart(fig, f"sample_attention_{i}")


sample_view()
