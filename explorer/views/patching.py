"""Patching: which activations carry what a prompt needs? Run a clean and a corrupted prompt, copy
one activation of the clean run into the corrupted one, and see how much of the answer comes back."""

import streamlit as st

from core import experiments as E
from core import visible
from core.checkpoint import Checkpoint
from explorer.glue import sidebar, widgets
from explorer.offpage import figures

CLEAN, CORRUPT, TARGET = E.PATCHING_EXAMPLE


def patching_view() -> None:
    st.title("Patching")
    ckpt = sidebar.require_checkpoint()
    if not ckpt.model.config.attention:
        st.info("This is the bigram model: each character is predicted from itself alone, so there is nothing "
                "to carry from one position to another.")
        return
    st.markdown("Two prompts of the same length that differ in a few characters, and the character the clean "
                "one should be followed by. Each cell copies one activation of the clean run into the corrupted "
                "run and measures the **logit difference** (target's logit minus the foil's, at the last "
                "position) that comes back: 1, as in the clean run; 0, as in the corrupted one.")
    left, right = st.columns(2)
    clean = left.text_area("Clean prompt", value=CLEAN, key="patch_clean", height=90)
    corrupt = right.text_area("Corrupted prompt", value=CORRUPT, key="patch_corrupt", height=90)
    a, b = st.columns(2)
    target = a.text_input("Target: the clean prompt's next character", value=TARGET, key="patch_target", max_chars=1)
    foil = b.text_input("Foil (empty: the corrupted prompt's favourite)", value="", key="patch_foil", max_chars=1)
    ids = _check(ckpt, clean, corrupt, target, foil)
    if ids is None:
        return
    clean_ids, corrupt_ids, target_id, foil_id = ids
    try:
        result = _patching(widgets.model_key(ckpt.model), clean_ids, corrupt_ids, target_id, foil_id, ckpt)
    except ValueError as e:
        st.warning(widgets.escape_markdown(str(e)))
        return
    itos = ckpt.tokenizer.itos
    x, y, z = st.columns(3)
    x.metric("clean logit difference", f"{result.clean_diff:+.2f}")
    y.metric("corrupted logit difference", f"{result.corrupt_diff:+.2f}")
    z.metric("foil", visible(itos[result.foil]))
    chars = [visible(itos[i]) for i in clean_ids]
    cfg = ckpt.model.config
    widgets.shared_chart(figures.by_position, result.resid.numpy(), [f"into block {i}" for i in range(cfg.n_layer)],
                         chars, f"Residual stream patched at one position: logit difference recovered "
                         f"('{visible(itos[result.target])}' vs '{visible(itos[result.foil])}')", row_title="layer",
                         value="recovered", zmid=0, zmin=-1, zmax=1, cell_format=".2f", name="patching_resid")
    st.caption("Row i: the residual stream entering block i (hook_resid_pre), at one position. Where the two "
               "prompts differ, the early rows bring the answer back; from the layers where information has "
               "moved to the last position on, only the last column does.")
    widgets.shared_chart(figures.heatmap, result.heads.numpy(), [f"head {h}" for h in range(cfg.n_head)],
                         [f"layer {i}" for i in range(cfg.n_layer)], "One head's output patched at every position",
                         x_title="head", y_title="layer", value="recovered", zmid=0, zmin=-1, zmax=1, cell_format=".2f",
                         name="patching_heads")
    st.caption("Each head's output (hook_z) from the clean run, all positions at once: the heads that move "
               "what decides the answer.")


def _check(ckpt: Checkpoint, clean: str, corrupt: str, target: str, foil: str) -> tuple | None:
    """The prompts and characters as ids, or None with a message that says what to change."""
    tokenizer, block = ckpt.tokenizer, ckpt.model.config.block_size
    unknown = tokenizer.unknown(clean + corrupt + target + foil)
    if unknown:
        st.warning(f"Not in this model's vocabulary: {widgets.name_chars(unknown)}.")
        return None
    if not clean or not target:
        st.warning("Type a clean prompt and a target character.")
        return None
    if len(clean) != len(corrupt):
        st.warning(f"The prompts must have the same length: the clean one has {len(clean)} characters, "
                   f"the corrupted one {len(corrupt)}.")
        return None
    if len(clean) > block:
        st.warning(f"The prompts have {len(clean)} characters; this model sees at most {block}.")
        return None
    if foil == target:
        st.warning("The foil must differ from the target.")
        return None
    return (tuple(tokenizer.encode(clean)), tuple(tokenizer.encode(corrupt)), tokenizer.stoi[target],
            tokenizer.stoi[foil] if foil else None)


@st.cache_resource(max_entries=32, show_spinner="Patching every layer and position…")
def _patching(key: str, clean: tuple, corrupt: tuple, target: int, foil: int | None, _ckpt: Checkpoint) -> E.Patching:
    return E.patching(_ckpt.model, list(clean), list(corrupt), target, foil)


patching_view()
