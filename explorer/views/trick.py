"""The trick: the lecture's "mathematical trick in self-attention", one average computed four ways."""

import inspect

import streamlit as st
import torch

from core.averages import toy_input, version1_loops, version2_weights, version3_weights, version4_head
from explorer.glue import widgets
from explorer.offpage import figures


def trick_view() -> None:
    st.title("The mathematical trick")
    st.markdown("Before attention, the lecture asks each position t to **average the positions 0..t**: the "
                "past may talk to the present, the future may not. The same result, four ways; the last "
                "one lets the data choose the weights, and that is self-attention.")
    left, middle, right, far = st.columns(4)
    T = left.slider("T (positions)", 2, 16, 8, key="trick_T")
    C = middle.slider("C (channels)", 1, 8, 2, key="trick_C")
    seed = int(right.number_input("Seed", value=1337, step=1, key="trick_seed"))
    b = far.selectbox("Sequence shown", range(4), key="trick_b")
    x = toy_input(4, T, C, seed)  # (B, T, C)
    positions = [str(t) for t in range(T)]

    xbow = version1_loops(x)
    _version("Version 1: loops", version1_loops,
             _matrix(xbow[b], positions, "xbow[b]: row t is the mean of x[b, 0..t]", "channel"))

    wei2 = version2_weights(T)
    _version("Version 2: a matrix multiply", version2_weights,
             _matrix(wei2, positions, "wei: lower triangular, rows sum to 1", "key", weights=True))
    _same("xbow2 = wei @ x", xbow, wei2 @ x)

    wei3 = version3_weights(T)
    _version("Version 3: softmax", version3_weights,
             _matrix(wei3, positions, "softmax(zeros, −inf above the diagonal)", "key", weights=True))
    _same("xbow3 = softmax(wei) @ x", xbow, wei3 @ x)

    wei4, _ = version4_head(x, head_size=16, seed=seed)
    _version("Version 4: self-attention", version4_head,
             _matrix(wei4[b], positions, f"wei for sequence {b}: chosen by q · k", "key", weights=True))
    widgets.check(bool(torch.allclose(wei4.sum(-1), torch.ones(4, T))), "every row sums to 1")
    widgets.check(bool((wei4.triu(1) == 0).all()), "no weight above the diagonal")
    other = (b + 1) % 4
    widgets.check(not torch.allclose(wei4[b], wei4[other]),
             f"sequence {b} and sequence {other} get different weights: they come from the data")


def _version(title: str, fn, fig) -> None:
    st.subheader(title)
    code, picture = st.columns([1, 1])
    code.code(inspect.getsource(fn), language="python", wrap_lines=True)  # the code that just ran; no line cut off
    with picture:
        widgets.chart(fig, title.split(":")[0].lower().replace(" ", "_"))


def _matrix(m: torch.Tensor, positions: list[str], title: str, x_title: str, weights: bool = False):
    columns = positions if weights else [str(c) for c in range(m.shape[1])]
    style = dict(colorscale=figures.WEIGHTS, zmin=0, zmax=1) if weights else dict(zmid=0)
    return figures.heatmap(m.numpy(), columns, positions, title, x_title=x_title, y_title="position",
                           cell_format=".2f" if m.numel() <= 256 else None, height=380, **style)


def _same(label: str, expected: torch.Tensor, got: torch.Tensor) -> None:
    # Summing in another order changes float32 results in the last bits; the default atol (1e-8)
    # would call that a difference for values near 0.
    diff = float((expected - got).abs().max())
    widgets.check(torch.allclose(expected, got, atol=1e-6),
             f"torch.allclose(xbow, {label}, atol=1e-6) (largest difference {diff:.1e})")


trick_view()
