"""Plotly figures for the explorer: pure functions, numpy arrays and labels in, go.Figure out.

No Streamlit and no model in here, so every figure can be built and checked in a test.
Matrices go in as numpy float32 (Plotly then sends them base64-encoded; Python lists made a
256-character grid take 2.5 s to build) and characters as core.tokenizer.visible labels.
Rows run top to bottom, as in a printed matrix: row i of an attention matrix is query i.
Each figure is built in one go: its traces as plain dicts and its whole layout handed to one
go.Figure, which validates them once (every update_* call validated the figure again: figures
took 2-7x as long: benchmarks/README.md, the server's script runs).
"""

import functools
import html
import math
import textwrap

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative, sequential
from plotly.subplots import make_subplots

WEIGHTS = "Blues"  # attention weights and probabilities, 0 (white) to 1 (dark blue)
SIGNED = "RdBu_r"  # scores and activations, blue below 0 and red above
MAX_TICKS = 64  # with more characters than this on an axis, label every k-th
GRID_TILE = 128  # the largest side of one head in the all-heads grid (figure size: benchmarks/README.md)
GAP = "#d9d9d9"  # the grey between the tiles of the grid
CHOSEN = "#d62728"  # the chosen bar or character
# A title line at most this long fits beside the toolbar on a phone (358 px) and in half a laptop's page.
TITLE_CHARS = 42
TITLE_LINE_PX = 26  # each further line of a title widens the top margin by this
TOP_AXIS_PX = 30  # what the labels of an x axis drawn above the plot add to the top margin


def position_labels(chars: list[str]) -> list[str]:
    """One category per position ("3 e"), so a character that occurs twice keeps two columns."""
    return [f"{i} {c}" for i, c in enumerate(chars)]


def _char_ticks(chars: list[str]) -> dict:
    """Axis settings that print the characters themselves under the position categories."""
    step = math.ceil(len(chars) / MAX_TICKS)
    return dict(tickmode="array", tickvals=position_labels(chars)[::step], ticktext=chars[::step], tickangle=0)


def _frame(title: str, height: int | None, top_axis: bool = False) -> dict:
    """What every figure's layout shares. A vertical toolbar at the right edge keeps Plotly's buttons
    off the title. Plotly never wraps a title, so a long one is broken into lines here; Plotly
    centres them in the top margin, which each line widens, as does an x axis drawn above the plot
    (a printed matrix's column headings, its labels under the title)."""
    lines = _title_lines(title)
    top = 60 + TITLE_LINE_PX * (len(lines) - 1) + (TOP_AXIS_PX if top_axis else 0)
    return dict(title="<br>".join(lines), height=height, modebar=dict(orientation="v"), margin=dict(l=10, r=40, t=top, b=10))


def _figure(data: list, title: str = "", height: int | None = None, *, top_axis: bool = False, **layout) -> go.Figure:
    """A figure from its traces (dicts with their type) and its layout, in one constructor call."""
    if top_axis:
        layout["xaxis"] = dict(layout.get("xaxis", {}), side="top")
    return go.Figure(data, dict(layout, **_frame(title, height, top_axis)))


def _title_lines(title: str) -> list[str]:
    """Lines of at most TITLE_CHARS characters, as few as can be; a closing remark in parentheses
    gets a line of its own where that costs no extra line."""
    wrapped = textwrap.wrap(title, TITLE_CHARS) or [""]
    head, _, remark = title.rpartition(" (")
    if head and len(remark) < TITLE_CHARS and remark.endswith(")") and ")" not in remark[:-1]:
        apart = textwrap.wrap(head, TITLE_CHARS) + [f"({remark}"]
        return apart if len(apart) <= len(wrapped) else wrapped
    return wrapped


def plot_aspect(fig: go.Figure) -> float | None:
    """Width over height of a figure's plot when its cells are square (the y axis anchored to x):
    its first trace's columns over its rows. None when the plot may take any shape."""
    if fig.layout.yaxis.scaleanchor != "x":
        return None
    rows, columns = np.shape(fig.data[0].z)
    return columns / rows


def heatmap(z: np.ndarray, x: list[str], y: list[str], title: str = "", *, x_title: str = "",
            y_title: str = "", value: str = "value", colorscale=SIGNED, zmin=None, zmax=None, zmid=None,
            text: np.ndarray | None = None, cell_format: str | None = None, height: int | None = None,
            xaxis: dict | None = None, yaxis: dict | None = None, more: tuple = (), **layout) -> go.Figure:
    """A matrix on categorical axes. text writes a string in every cell (hover shows it too);
    cell_format (a d3 format such as ".2f") writes the values instead. xaxis and yaxis change the
    axes' settings; more traces go over the matrix; layout as go.Layout's."""
    hover = f"{y_title} %{{y}}<br>{x_title} %{{x}}<br>{value} %{{z:.3f}}"
    cells = {}
    if text is not None:
        cells = dict(text=text, texttemplate="%{text}")
        hover += "<br>%{text}"
    elif cell_format:
        cells = dict(texttemplate=f"%{{z:{cell_format}}}")
    trace = dict(type="heatmap", z=np.asarray(z, dtype=np.float32), x=x, y=y, colorscale=colorscale, zmin=zmin, zmax=zmax,
                 zmid=zmid, hoverongaps=False, colorbar=dict(thickness=12), hovertemplate=hover + "<extra></extra>",
                 **cells)
    return _figure([trace, *more], title, height,
                   xaxis={"type": "category", "title": x_title, "showgrid": False, **(xaxis or {})},
                   yaxis={"type": "category", "title": y_title, "autorange": "reversed", "showgrid": False, **(yaxis or {})},
                   **layout)


def by_position(z: np.ndarray, rows: list[str], chars: list[str], title: str = "", *, row_title: str = "",
                **style) -> go.Figure:
    """A (rows, T) matrix with one column per prompt position, labelled by its character."""
    return heatmap(z, position_labels(chars), rows, title, x_title="position", y_title=row_title,
                   xaxis=_char_ticks(chars), **style)


def attention_heatmap(scores: np.ndarray, chars: list[str], step: str, title: str = "") -> go.Figure:
    """One head's (T, T) matrix at one step of attention (raw, scaled, masked or softmax).
    Masked cells (-inf) are drawn empty: NaN is Plotly's "no value"."""
    masked = np.isneginf(scores)
    style = dict(colorscale=WEIGHTS, zmin=0, zmax=1) if step == "softmax" else dict(colorscale=SIGNED, zmid=0)
    labels = position_labels(chars)
    # The masked cells fill the upper right triangle, so the note sits there.
    note = [dict(text="empty cells: −inf (masked)<br>a character may not look ahead", xref="paper", yref="paper",
                 x=0.98, y=0.98, xanchor="right", yanchor="top", showarrow=False, align="right")] if masked.any() else []
    # The axes are named in the title (and in the hover): "key" above the top axis ran into the title on a phone.
    return heatmap(np.where(masked, np.nan, scores), labels, labels, f"{title} (rows: queries, columns: keys)".strip(),
                   x_title="key", y_title="query", value="weight" if step == "softmax" else "score", height=620,
                   xaxis=dict(_char_ticks(chars), title=""), yaxis=dict(_char_ticks(chars), title="", scaleanchor="x"),
                   top_axis=True, annotations=note, **style)


def head_grid(patterns: np.ndarray) -> go.Figure:
    """Every head's attention weights (L, H, T, T) as small multiples: one tiled uint8 trace.

    One trace of bytes instead of L*H float traces keeps the figure small (sizes in
    benchmarks/README.md). Above GRID_TILE positions each pixel shows the largest weight of a
    block of cells, so a sharp pattern stays visible.
    """
    L, H, T, _ = patterns.shape
    f = math.ceil(T / GRID_TILE)  # cells per pixel along each side
    t = math.ceil(T / f)
    padded = np.zeros((L, H, t * f, t * f), np.float32)
    padded[..., :T, :T] = patterns
    pooled = padded.reshape(L, H, t, f, t, f).max(axis=(3, 5))
    tiles = (1 + np.rint(pooled * 254)).astype(np.uint8)  # weights 0..1 -> 1..255; 0 marks the gaps
    gap = max(1, t // 12)
    tiles = np.pad(tiles, ((0, 0), (0, 0), (0, gap), (0, gap)))
    canvas = tiles.transpose(0, 2, 1, 3).reshape(L * (t + gap), H * (t + gap))[:-gap, :-gap]
    blues = sequential.Blues
    colorscale = [[0, GAP]] + [[1 / 255 + i / (len(blues) - 1) * 254 / 255, c] for i, c in enumerate(blues)]
    trace = dict(type="heatmap", z=canvas, colorscale=colorscale, zmin=0, zmax=255, hoverinfo="skip",
                 colorbar=dict(thickness=12, tickvals=[1, 128, 255], ticktext=["0", "0.5", "1"]))
    return _figure([trace], "Attention weights of every head (rows: queries, columns: keys)", 120 + 110 * L,
                   top_axis=True,
                   xaxis=dict(tickvals=np.arange(H) * (t + gap) + (t - 1) / 2, ticktext=[f"head {h}" for h in range(H)],
                              showgrid=False, zeroline=False),
                   yaxis=dict(tickvals=np.arange(L) * (t + gap) + (t - 1) / 2, ticktext=[f"layer {i}" for i in range(L)],
                              autorange="reversed", showgrid=False, zeroline=False, scaleanchor="x"))


def bar_chart(values: np.ndarray, labels: list[str], title: str = "", *, x_title: str = "",
              y_title: str = "", highlight: int | None = None, height: int = 320) -> go.Figure:
    """Bars in the given order; the bar at index highlight is drawn in another colour."""
    colors = [CHOSEN if i == highlight else "#1f77b4" for i in range(len(labels))]
    trace = dict(type="bar", x=labels, y=np.asarray(values, dtype=np.float32), marker_color=colors,
                 hovertemplate="%{x}: %{y:.3f}<extra></extra>")
    return _figure([trace], title, height, xaxis=dict(type="category", title=x_title), yaxis=dict(title=y_title))


@functools.cache
def _weighted_sum_panels() -> dict:
    """weighted_sum's axes (each one's domain and anchor) and its panels' titles, laid out once:
    make_subplots took most of the figure's time. Shared: copy before changing."""
    layout = make_subplots(rows=2, cols=3, column_widths=[0.12, 0.44, 0.44], row_heights=[0.85, 0.15],
                           specs=[[{}, {}, {}], [None, None, {}]], horizontal_spacing=0.05, vertical_spacing=0.08,
                           subplot_titles=["w (attention)", "v (hook_v)", "w · v", "z = Σ w · v (hook_z)"]).layout
    return {name: value for name, value in layout.to_plotly_json().items() if name != "template"}


def weighted_sum(weights: np.ndarray, values: np.ndarray, z: np.ndarray, chars: list[str]) -> go.Figure:
    """The lecture's weighted aggregation for one query: weights w (n,) times values v (n, hs),
    row by row, summed down the columns, give the head's output z (hs,). Panels w, v and w · v
    side by side (axes x, x2, x3), z under the last (x4)."""
    contributions = weights[:, None] * values
    rows, dims = position_labels(chars), [str(d) for d in range(values.shape[1])]
    cell = "%{y}, dim %{x}: %{z:.3f}<extra></extra>"
    traces = [dict(type="heatmap", z=weights[:, None].astype(np.float32), x=["w"], y=rows, colorscale=WEIGHTS, zmin=0,
                   zmax=1, showscale=False, hovertemplate="%{y}: w = %{z:.3f}<extra></extra>", xaxis="x", yaxis="y"),
              dict(type="heatmap", z=values.astype(np.float32), x=dims, y=rows, coloraxis="coloraxis", hovertemplate=cell,
                   xaxis="x2", yaxis="y2"),
              dict(type="heatmap", z=contributions.astype(np.float32), x=dims, y=rows, coloraxis="coloraxis",
                   hovertemplate=cell, xaxis="x3", yaxis="y3"),
              dict(type="heatmap", z=z[None, :].astype(np.float32), x=dims, y=["z"], coloraxis="coloraxis",
                   hovertemplate="z, dim %{x}: %{z:.3f}<extra></extra>", xaxis="x4", yaxis="y4")]
    layout = dict(_weighted_sum_panels())
    for name, axis in layout.items():
        if name.startswith("xaxis"):
            layout[name] = dict(axis, type="category", showgrid=False)
        elif name.startswith("yaxis"):
            layout[name] = dict(axis, type="category", autorange="reversed", showgrid=False)
    layout["xaxis3"]["showticklabels"] = False  # z below names the same dimensions, under its title
    for name in ("yaxis", "yaxis2", "yaxis3"):  # the first row's panels: a row a character
        layout[name].update(_char_ticks(chars))
    return _figure(traces, "", 240 + 16 * len(chars), coloraxis=dict(colorscale=SIGNED, cmid=0, colorbar=dict(thickness=12)),
                   **layout)


def bipartite(weights: np.ndarray, chars: list[str], min_weight: float = 0.02, levels: int = 8) -> go.Figure:
    """One head as lines from keys (left) to queries (right), more opaque for more weight.

    Lines are grouped into `levels` traces of equal opacity (a Plotly trace has one opacity);
    weights below min_weight are left out.
    """
    T = len(chars)
    query, key = np.tril_indices(T)
    w = weights[query, key]
    level = np.minimum((w * levels).astype(int), levels - 1)
    traces = []
    for b in range(levels):
        pick = (level == b) & (w >= min_weight)
        n = int(pick.sum())
        if n == 0:
            continue
        xs = np.tile([0.0, 1.0, np.nan], n)
        ys = np.stack([key[pick], query[pick], np.full(n, np.nan)], axis=1).ravel()
        traces.append(dict(type="scatter", x=xs, y=ys, mode="lines", opacity=(b + 1) / levels, hoverinfo="skip",
                           line=dict(color="#1f4e99", width=2), showlegend=False))
    sides = ((0, "keys", "middle left"), (1, "queries", "middle right"))
    traces += [dict(type="scatter", x=[x] * T, y=list(range(T)), mode="markers+text", text=chars, textposition=position,
                    marker=dict(size=5, color="#444"), showlegend=False,
                    hovertemplate=f"{side[:-1]} %{{y}}: %{{text}}<extra></extra>") for x, side, position in sides]
    return _figure(traces, "", 120 + 16 * T, xaxis=dict(visible=False, range=[-0.3, 1.3]),
                   yaxis=dict(visible=False, autorange="reversed"),
                   annotations=[dict(x=x, y=-1.5, text=side, showarrow=False) for x, side, _ in sides])


def line_chart(series: dict[str, np.ndarray], chars: list[str], title: str = "", *, y_title: str = "",
               dashed: tuple[str, ...] = ()) -> go.Figure:
    """One line per named series over the prompt's positions."""
    x = position_labels(chars)
    traces = [dict(type="scatter", x=x, y=np.asarray(y, dtype=np.float32), name=name, mode="lines+markers",
                   line=dict(dash="dash" if name in dashed else "solid")) for name, y in series.items()]
    return _figure(traces, title, 360, xaxis=dict(type="category", title="position", **_char_ticks(chars)),
                   yaxis=dict(title=y_title))


def scatter_2d(points: np.ndarray, labels: list[str], title: str = "", *, x_title: str = "",
               y_title: str = "") -> go.Figure:
    """Labelled points, e.g. the token embeddings projected on two directions."""
    trace = dict(type="scatter", x=points[:, 0], y=points[:, 1], mode="markers+text", text=labels, textposition="top center",
                 marker=dict(size=6), hovertemplate="%{text}: (%{x:.2f}, %{y:.2f})<extra></extra>")
    return _figure([trace], title, 520, xaxis=dict(title=x_title), yaxis=dict(title=y_title))


def loss_curve(steps: list[dict], evals: list[dict], marks: dict[str, int] | None = None) -> go.Figure:
    """Per-step training loss (thin) and the periodic train/val estimates (markers); marks
    (label -> step) draws a dashed vertical line at each step, labelled at the top."""
    traces = []
    if steps:
        traces.append(dict(type="scatter", x=np.array([r["iter"] for r in steps]), mode="lines", name="loss (each step)",
                           y=np.array([r["loss"] for r in steps], dtype=np.float32),
                           line=dict(width=1, color="#9ecae1")))
    for split, color in (("train", "#08519c"), ("val", "#e6550d")):
        if evals:
            traces.append(dict(type="scatter", x=np.array([e["iter"] for e in evals]), mode="lines+markers",
                               y=np.array([e[f"{split}_loss"] for e in evals], dtype=np.float32),
                               name=f"{split} loss (estimate)", line=dict(color=color)))
    marks = (marks or {}).items()  # a dashed line from the bottom of the plot to its top, at x = step
    return _figure(traces, "Loss", 360, xaxis=dict(title="step"), yaxis=dict(title="cross-entropy loss"),
                   shapes=[dict(type="line", xref="x", x0=step, x1=step, yref="y domain", y0=0, y1=1,
                                line=dict(dash="dash", color="#6a3d9a", width=1.5)) for _, step in marks],
                   annotations=[dict(text=label, showarrow=False, xref="x", x=step, xanchor="left", yref="y domain",
                                     y=1, yanchor="top") for label, step in marks])


def head_lines(iters: np.ndarray, values: np.ndarray, title: str, y_title: str) -> go.Figure:
    """One line per head over training: values is (snapshots, layers, heads)."""
    _, L, H = values.shape
    colours = qualitative.Dark24 if L * H > 10 else qualitative.Plotly  # a colour of its own for up to 24 heads
    traces = [dict(type="scatter", x=iters, y=values[:, layer, head].astype(np.float32), mode="lines", name=f"L{layer} H{head}",
                   line=dict(color=colours[(layer * H + head) % len(colours)]))
              for layer in range(L) for head in range(H)]
    return _figure(traces, title, 320, xaxis=dict(title="step"), yaxis=dict(title=y_title))


def step_line(iters: np.ndarray, values: np.ndarray, title: str, y_title: str, name: str) -> go.Figure:
    """One quantity over training, with a grey line at zero (e.g. the in-context learning gap)."""
    trace = dict(type="scatter", x=iters, y=np.asarray(values, dtype=np.float32), mode="lines+markers", name=name)
    zero = dict(type="line", xref="x domain", x0=0, x1=1, yref="y", y0=0, y1=0, line=dict(color="#bdbdbd", width=1))
    return _figure([trace], title, 320, xaxis=dict(title="step"), yaxis=dict(title=y_title), shapes=[zero])


def board_curves(curves: list[tuple[str, np.ndarray, np.ndarray]], own: set[int] = frozenset(),
                 leaders: int = 10) -> go.Figure:
    """The room's val losses, one curve per training, in board order: (label, steps, losses).
    The first `leaders` and the viewer's own (indices in `own`) are named lines; the rest share
    one grey trace (NaN-separated), which keeps a 200-training room one quick figure. Labels are
    participants' names: HTML-escaped, since Plotly renders tags in legends and hovers."""
    traces, rest_x, rest_y = [], [], []
    for i, (label, steps, losses) in enumerate(curves):
        if i < leaders or i in own:
            name = html.escape(label)
            traces.append(dict(type="scatter", x=steps, y=np.asarray(losses, dtype=np.float32), mode="lines+markers", name=name,
                               line=dict(width=4 if i in own else 2), hovertemplate=f"{name}<br>step %{{x}}<br>"
                               "val loss %{y:.3f}<extra></extra>"))
        else:
            rest_x += [steps, [np.nan]]
            rest_y += [np.asarray(losses, dtype=np.float32), [np.nan]]
    if rest_x:
        traces.append(dict(type="scatter", x=np.concatenate(rest_x).astype(np.float64), y=np.concatenate(rest_y).astype(np.float32),
                           mode="lines", name=f"the other {len(curves) - leaders - len([i for i in own if i >= leaders])}",
                           line=dict(width=1, color="#bdbdbd"), hoverinfo="skip"))
    return _figure(traces, "Val loss of every training", 420, xaxis=dict(title="step"),
                   yaxis=dict(title="val loss (the board's windows)"))


def ablation_grid(heads: np.ndarray, mlps: np.ndarray, title: str = "") -> go.Figure:
    """Δ loss of knocking out each head (L, H), and each layer's MLP (L,) in a last column, as a
    layer x head heatmap (red: the loss rose without it). Over it, an invisible scatter with a
    point on every head's cell, so that a click selects a head (Plotly heatmaps return no click
    selection in Streamlit): customdata holds (layer, head)."""
    L, H = heads.shape
    columns = [f"head {h}" for h in range(H)] + (["MLP"] if len(mlps) else [])
    z = np.concatenate([heads, np.asarray(mlps, np.float32).reshape(L, -1)], axis=1)
    rows = [f"layer {i}" for i in range(L)]
    bound = float(np.abs(z).max()) or 1.0
    layer, head = np.divmod(np.arange(L * H), H)
    clicks = dict(type="scatter", x=[columns[h] for h in head], y=[rows[i] for i in layer], mode="markers",
                  customdata=np.stack([layer, head], axis=1), marker=dict(symbol="square", size=36, opacity=0),
                  hoverinfo="skip", showlegend=False)
    return heatmap(z, columns, rows, title, x_title="knocked out", y_title="layer", value="Δ val loss", zmid=0,
                   zmin=-bound, zmax=bound, cell_format="+.3f", height=140 + 48 * L, more=(clicks,),
                   clickmode="event+select")


def coloured_text(chars: list[str], values: np.ndarray, tips: list[str], vmax: float, signed: bool = False) -> str:
    """HTML of a text with each character on a background by its value: white to red from 0 to
    vmax (a loss), or blue below 0 to red above (a change), with its tip on hover. Every character
    but letters, digits and spaces is written as an HTML entity, so neither HTML nor markdown
    reads the text as markup; a newline shows as ⏎ and breaks the line."""
    spans = []
    for ch, v, tip in zip(chars, np.asarray(values, dtype=np.float64), tips):
        share = float(np.clip(v / vmax, -1 if signed else 0, 1)) if vmax > 0 else 0.0
        colour = f"rgba(214,39,40,{share:.2f})" if share >= 0 else f"rgba(31,119,180,{-share:.2f})"
        shown = _entities("⏎" if ch == "\n" else ch) + ("<br>" if ch == "\n" else "")
        spans.append(f'<span title="{_entities(tip)}" style="background:{colour}">{shown}</span>')
    return ('<div style="font-family:monospace;white-space:pre-wrap;line-height:1.6">' + "".join(spans) + "</div>")


def _entities(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch == " " else f"&#{ord(ch)};" for ch in text)


def clickable_text(chars: list[str], chosen: int | None = None, per_line: int = 64) -> go.Figure:
    """Characters laid out as text, `per_line` to a line, each one a point a click selects
    (st.plotly_chart's on_select returns its point_index); the chosen one on a red square."""
    n = len(chars)
    x = np.arange(n) % per_line
    y = np.arange(n) // per_line
    # The highlight as 0/1 on a two-colour scale: a list of colour names is validated one by one.
    marked = (np.arange(n) == (chosen if chosen is not None else -1)).astype(np.int8)
    trace = dict(
        type="scatter", x=x, y=y, mode="markers+text", text=[html.escape(c) for c in chars], textfont=dict(family="monospace", size=15),
        marker=dict(symbol="square", size=18, color=marked, colorscale=[[0, "rgba(0,0,0,0)"], [1, CHOSEN]],
                    cmin=0, cmax=1),
        customdata=np.arange(n), hovertemplate="character %{customdata}: %{text}<extra></extra>")
    lines = int(y.max()) + 1 if n else 1
    return _figure([trace], "Click a written character to see how it was chosen", 80 + 26 * lines,
                   xaxis=dict(visible=False, range=[-1, per_line]),
                   yaxis=dict(visible=False, autorange="reversed", range=[lines, -1]),
                   showlegend=False, dragmode=False, clickmode="event+select", plot_bgcolor="white")
