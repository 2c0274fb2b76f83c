"""The explorer's pure figure builders and table helpers: what each figure holds, and its size."""

import io

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from explorer.glue import widgets
from explorer.offpage import figures


def causal_softmax(T: int, seed: int = 0, heads: tuple[int, ...] = ()) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(*heads, T, T))
    scores[..., np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]] = -np.inf
    e = np.exp(scores - scores.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def test_position_labels_keep_repeated_characters_apart():
    labels = figures.position_labels(list("aab"))
    assert labels == ["0 a", "1 a", "2 b"] and len(set(labels)) == 3


def test_masked_cells_are_empty_and_annotated():
    scores = np.array([[1.0, -np.inf], [2.0, 3.0]], dtype=np.float32)
    fig = figures.attention_heatmap(scores, ["a", "a"], "masked")
    z = fig.data[0].z
    assert np.isnan(z[0, 1]) and z[1, 0] == 2.0
    assert "−inf" in fig.layout.annotations[0].text
    assert list(fig.data[0].x) == ["0 a", "1 a"]  # two columns, though the character repeats
    assert list(fig.layout.xaxis.ticktext) == ["a", "a"]


def test_softmax_heatmap_is_on_a_0_to_1_scale_without_a_mask_note():
    fig = figures.attention_heatmap(causal_softmax(4), list("abcd"), "softmax")
    assert (fig.data[0].zmin, fig.data[0].zmax) == (0, 1)
    assert not fig.layout.annotations


def test_long_axes_label_every_kth_character():
    chars = [chr(97 + i % 26) for i in range(256)]
    fig = figures.attention_heatmap(causal_softmax(256), chars, "softmax")
    assert len(fig.layout.xaxis.tickvals) <= figures.MAX_TICKS


@pytest.mark.parametrize("T", [1, 5, 128])
def test_head_grid_tiles_hold_the_weights(T):
    patterns = causal_softmax(T, heads=(2, 3))
    fig = figures.head_grid(patterns)
    canvas = fig.data[0].z
    assert len(fig.data) == 1 and canvas.dtype == np.uint8
    gap = max(1, T // 12)
    for layer in range(2):
        for head in range(3):
            r, c = layer * (T + gap), head * (T + gap)
            tile = (canvas[r:r + T, c:c + T].astype(np.float32) - 1) / 254
            np.testing.assert_allclose(tile, patterns[layer, head], atol=0.5 / 254 + 1e-6)
    assert (canvas == 0).sum() == canvas.size - 6 * T * T  # the gaps, and only they, are 0


def test_head_grid_stays_small_at_long_prompts_and_keeps_sharp_weights():
    patterns = causal_softmax(256, heads=(6, 6))
    patterns[0, 0] = np.eye(256)  # a head that looks only at itself
    fig = figures.head_grid(patterns)
    assert len(fig.to_json()) <= 2_000_000  # the whole-model grid for 6 x 6 heads at 256 characters
    tile = fig.data[0].z[:128, :128]
    assert (np.diag(tile) == 255).all()  # max-pooling kept the diagonal at full weight


def test_a_long_title_is_broken_into_lines_that_fit_beside_the_toolbar_and_a_short_one_is_not():
    grid = figures.head_grid(causal_softmax(4, heads=(1, 1)))
    assert grid.layout.title.text == "Attention weights of every head<br>(rows: queries, columns: keys)"
    words = figures.bar_chart(np.ones(2), ["a", "b"], "Length ‖x‖ of the residual stream after each block").layout.title.text
    assert words == "Length ‖x‖ of the residual stream after<br>each block"
    assert max(len(line) for line in words.split("<br>")) <= figures.TITLE_CHARS
    assert grid.layout.margin.t == 60 + figures.TITLE_LINE_PX + figures.TOP_AXIS_PX  # room for a line and the heads' names
    assert figures.loss_curve([], []).layout.title.text == "Loss"


def test_square_cells_give_the_plot_its_shape_and_other_figures_none():
    assert figures.plot_aspect(figures.attention_heatmap(causal_softmax(5), list("abcde"), "softmax")) == 1
    grid = figures.head_grid(causal_softmax(8, heads=(2, 4)))
    rows, columns = grid.data[0].z.shape
    assert figures.plot_aspect(grid) == columns / rows and 1.9 < columns / rows < 2.1  # 4 heads across, 2 layers down
    assert figures.plot_aspect(figures.line_chart({"a": np.zeros(3)}, list("abc"))) is None
    assert figures.plot_aspect(figures.heatmap(np.eye(3), list("abc"), list("abc"))) is None


def test_bar_chart_highlights_one_bar():
    fig = figures.bar_chart(np.array([0.5, 0.3, 0.2]), ["a", "b", "c"], highlight=1)
    colors = fig.data[0].marker.color
    assert colors[1] != colors[0] == colors[2]


def test_weighted_sum_panels_add_up():
    rng = np.random.default_rng(0)
    w = np.array([0.2, 0.3, 0.5], dtype=np.float32)
    v = rng.normal(size=(3, 4)).astype(np.float32)
    fig = figures.weighted_sum(w, v, w @ v, list("abc"))
    weights, values, contributions, z = (trace.z for trace in fig.data)
    np.testing.assert_allclose(contributions, w[:, None] * v, rtol=1e-6)
    np.testing.assert_allclose(contributions.sum(0), z[0], rtol=1e-5)
    np.testing.assert_allclose(weights[:, 0], w)


def test_bipartite_draws_one_line_per_weight_above_the_threshold():
    w = causal_softmax(6)
    fig = figures.bipartite(w, list("abcdef"), min_weight=0.05)
    lines = [t for t in fig.data if t.mode == "lines"]
    assert sum(int(np.isnan(t.y).sum()) for t in lines) == int((w[np.tril_indices(6)] >= 0.05).sum())
    opacities = [t.opacity for t in lines]
    assert opacities == sorted(opacities) and max(opacities) <= 1


def test_by_position_and_line_chart_put_characters_on_x():
    chars = list("hello")
    fig = figures.by_position(np.ones((2, 5)), ["x", "y"], chars, text=np.full((2, 5), "e"))
    assert list(fig.layout.xaxis.ticktext) == chars and fig.data[0].texttemplate == "%{text}"
    lines = figures.line_chart({"mean": np.zeros(5), "std": np.ones(5)}, chars, dashed=("std",))
    assert [t.name for t in lines.data] == ["mean", "std"] and lines.data[1].line.dash == "dash"


def test_scatter_labels_every_point():
    fig = figures.scatter_2d(np.zeros((3, 2)), ["a", "b", "⏎"])
    assert isinstance(fig, go.Figure) and list(fig.data[0].text) == ["a", "b", "⏎"]


def test_npz_and_csv_round_trip():
    arrays = {"blocks.0.attn.hook_pattern": causal_softmax(3), "tokens": np.array([1, 2, 3])}
    loaded = np.load(io.BytesIO(widgets.npz_bytes(arrays)))
    for name, a in arrays.items():
        np.testing.assert_array_equal(loaded[name], a)
    frame = widgets.matrix_frame(np.eye(2), ["0 a", "1 a"], ["0 a", "1 a"])
    back = pd.read_csv(io.StringIO(frame.to_csv()), index_col=0)
    np.testing.assert_array_equal(back.to_numpy(), np.eye(2))


def test_a_default_prompt_is_cut_to_fit_the_context_at_a_line_or_a_word():
    from explorer.glue.widgets import DEFAULT_PROMPT, fitting
    assert fitting("ab cd", 8) == "ab cd"
    assert fitting("First Citizen:\nBefore we proceed", 20) == "First Citizen:"
    assert fitting("one two three", 9) == "one two"
    assert fitting("abcdefghij", 4) == "abcd"  # no break to cut at
    for block in (8, 32, 64, 128, 256):
        cut = fitting(DEFAULT_PROMPT, block)
        assert len(cut) <= block and DEFAULT_PROMPT.startswith(cut)
        assert cut == DEFAULT_PROMPT or DEFAULT_PROMPT[len(cut)] in "\n "


def test_ablation_grid_has_an_mlp_column_and_a_clickable_point_per_head():
    heads = np.array([[0.1, -0.2, 0.0], [0.3, 0.0, 0.05]], dtype=np.float32)
    fig = figures.ablation_grid(heads, np.array([1.0, 2.0], dtype=np.float32))
    grid, points = fig.data
    assert list(grid.x) == ["head 0", "head 1", "head 2", "MLP"] and grid.z.shape == (2, 4)
    np.testing.assert_allclose(grid.z[:, :3], heads)
    assert grid.zmin == -grid.zmax == -2.0 and grid.zmid == 0
    assert len(points.x) == 6 and points.marker.opacity == 0
    assert points.customdata[4].tolist() == [1, 1] and (points.x[4], points.y[4]) == ("head 1", "layer 1")
    assert list(figures.ablation_grid(heads, np.array([])).data[0].x) == ["head 0", "head 1", "head 2"]


def test_coloured_text_escapes_markup_and_shows_newlines():
    chars = list("<b>*x*</b>\n$")
    html = figures.coloured_text(chars, np.linspace(-1, 2, len(chars)), ['"tip" & <more>'] * len(chars), 2.0, signed=True)
    assert "<b>" not in html and "*" not in html and "$" not in html and '"tip"' not in html
    assert html.count("<span") == len(chars) and "&#9166;<br>" in html  # ⏎ then a line break
    assert "rgba(31,119,180,0.50)" in html and "rgba(214,39,40,1.00)" in html  # -1 half blue, 2 full red
    unsigned = figures.coloured_text(["a", "b"], np.array([-1.0, 1.0]), ["", ""], 1.0)
    assert "rgba(214,39,40,0.00)" in unsigned and "31,119,180" not in unsigned


def test_the_clickable_text_lays_out_every_character_and_marks_the_chosen_one():
    chars = list("To be, or not") + ["↵"] + list("<b>x</b>")
    fig = figures.clickable_text(chars, chosen=3, per_line=5)
    trace = fig.data[0]
    assert list(trace.x[:6]) == [0, 1, 2, 3, 4, 0] and list(trace.y[:6]) == [0, 0, 0, 0, 0, 1]
    assert list(trace.customdata) == list(range(len(chars)))  # a click's point index is the character's
    assert list(trace.marker.color) == [int(i == 3) for i in range(len(chars))]  # 1: the chosen one
    assert trace.marker.colorscale[0][1] == "rgba(0,0,0,0)" and trace.marker.colorscale[-1][1] == figures.CHOSEN
    assert (trace.marker.cmin, trace.marker.cmax) == (0, 1)  # a 1 is red even when no 0 is left
    assert list(figures.clickable_text(chars).data[0].marker.color) == [0] * len(chars)  # none chosen: none red
    assert "<b>" not in "".join(trace.text)  # Plotly renders tags in text: escaped


def test_the_loss_curve_marks_a_step_with_a_labelled_line():
    steps = [dict(iter=i, loss=3.0 - i / 100) for i in range(1, 101)]
    evals = [dict(iter=50, train_loss=2.5, val_loss=2.6)]
    plain = figures.loss_curve(steps, evals)
    assert not plain.layout.shapes and not plain.layout.annotations
    fig = figures.loss_curve(steps, evals, {"induction head": 60})
    (line,) = fig.layout.shapes
    assert line.x0 == line.x1 == 60 and line.line.dash == "dash"
    assert [a.text for a in fig.layout.annotations] == ["induction head"]
    assert len(fig.data) == len(plain.data)  # the mark is a shape, not another trace


def test_step_line_draws_one_quantity_over_training_with_zero_marked():
    fig = figures.step_line(np.array([0, 50, 100]), [0.0, -0.1, 0.8], "In-context learning", "nats", "gap")
    (trace,) = fig.data
    assert list(trace.x) == [0, 50, 100] and np.allclose(trace.y, [0.0, -0.1, 0.8])
    assert fig.layout.shapes[0].y0 == fig.layout.shapes[0].y1 == 0
