"""Shared look of every figure: one template, one colour per method, names for accuracy rows."""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

TEMPLATE = "plotly_white"

METHOD_COLORS: dict[str, str] = {
    "naive": "#7f7f7f",
    "naive_resize": "#a0a0a0",
    "transfusion": "#1f77b4",
    "gradfix": "#d62728",
    "theseus": "#2ca02c",
    "zero_shot_target": "#bcbd22",
    "source_finetuned": "#9467bd",
    "source_zero_shot": "#c5b0d5",
    "oracle": "#ff7f0e",
}

ACCURACY_LABELS: dict[str, str] = {
    "zero_shot_target": "target zero-shot",
    "naive": "naive (theta_B + alpha tau)",
    "naive_resize": "naive (tau zero-padded / truncated)",
    "transfusion": "TransFusion",
    "gradfix": "GradFix",
    "theseus": "Theseus",
    "source_finetuned": "source fine-tuned",
    "source_zero_shot": "source zero-shot",
    "oracle": "oracle (target fine-tuned)",
}

# Rows of an accuracy table, in reading order: the floor, the baseline, the methods, the ceilings.
ACCURACY_ORDER = ("zero_shot_target", "naive", "naive_resize", "transfusion", "gradfix", "theseus", "source_finetuned",
                  "source_zero_shot", "oracle")

# Agreement maps: +1 agree (blue), 0 tie (grey), -1 disagree (red).
AGREE_SCALE = [[0.0, "#d62728"], [0.5, "#e6e6e6"], [1.0, "#1f77b4"]]


def color_of(name: str, i: int = 0) -> str:
    base = name.split("+")[0].split(":")[0]
    if base in METHOD_COLORS:
        return METHOD_COLORS[base]
    palette = ("#17becf", "#8c564b", "#e377c2", "#393b79", "#637939", "#8c6d31")
    return palette[i % len(palette)]


def label_of(name: str) -> str:
    return ACCURACY_LABELS.get(name, name)


def ordered(names) -> list[str]:
    """Accuracy / method names in the table order; unknown names after the known ones, as given."""
    names = list(names)
    known = [n for n in ACCURACY_ORDER if n in names]
    return known + [n for n in names if n not in known]


#: every accuracy axis of every figure: 0-100 % (an autoscaled axis makes noise look like a peak)
ACCURACY_RANGE = (0.0, 100.0)


def accuracy_axis(fig: go.Figure, **where) -> go.Figure:
    """Fix a y-axis (``row``/``col`` select a subplot) to 0-100 % with ticks every 20 %."""
    fig.update_yaxes(range=list(ACCURACY_RANGE), dtick=20, ticksuffix=" %", **where)
    return fig


#: ``meta`` of traces that must stay thin in presentation mode (e.g. hundreds of connecting segments)
THIN = "thin"

# Presentation mode: sizes for a projector at the back of a lecture hall.
PRESENT_FONT = 20
PRESENT_TICK = 18
PRESENT_TITLE = 22
PRESENT_LINE = 4.0


def presentation(fig: go.Figure) -> go.Figure:
    """A copy of ``fig`` for projection: larger fonts, thicker lines and markers, black text and axes."""
    fig = go.Figure(fig)
    ink = "#000000"
    height = fig.layout.height
    can = [t for t in fig.data if "showlegend" in t]  # an image trace has no legend entry at all
    shown = [t for t in can if t.showlegend is not False]
    legend = fig.layout.showlegend is not False and (len(shown) >= 2 or any(t.showlegend for t in can))
    m = fig.layout.margin
    top = max(100, m.t or 0)
    if any(fig.layout[k].side == "top" for k in fig.layout if k.startswith("xaxis")):
        top += 90  # an axis on top (tick labels and its title) sits between the plot and the title
    bottom = max(m.b or 0, 170 if legend else 90)
    # the plot area keeps (1.2 x) its height: the larger margins are added to the figure, not taken from it
    grow = max(0, top - (m.t or 60)) + max(0, bottom - (m.b or 50))
    # the legend goes under the plot: at the side it takes half the width of a projected chart
    fig.update_layout(font=dict(size=PRESENT_FONT, color=ink),
                      title=dict(font=dict(size=PRESENT_TITLE, color=ink), yref="container", y=1.0, yanchor="top",
                                 pad=dict(t=12)),
                      legend=dict(font=dict(size=PRESENT_TICK, color=ink), orientation="h", x=0, xanchor="left",
                                  yref="container", y=0.0, yanchor="bottom"),
                      hoverlabel=dict(font_size=PRESENT_TICK), margin=dict(l=105, r=30, t=top, b=bottom),
                      **({"height": int(height * 1.2) + grow} if height else {}))
    axis = dict(tickfont=dict(size=PRESENT_TICK, color=ink), title_font=dict(size=PRESENT_FONT + 2, color=ink),
                linecolor=ink, linewidth=2, showline=True, gridcolor="#9e9e9e", zerolinecolor="#616161",
                ticks="outside", tickcolor=ink, tickwidth=2)
    fig.update_xaxes(**axis)
    fig.update_yaxes(**axis)
    for scene in [k for k in fig.layout if k.startswith("scene")]:
        for ax in ("xaxis", "yaxis", "zaxis"):
            fig.layout[scene][ax].update(tickfont=dict(size=PRESENT_TICK - 4, color=ink),
                                         title_font=dict(size=PRESENT_FONT, color=ink))
    for a in fig.layout.annotations or []:  # subplot titles and reference-line labels
        if a.name != THIN:  # annotations laid out to their size (a grid's captions) keep it
            a.font = dict(size=max(PRESENT_TICK, (a.font.size or 0)), color=ink)
    for t in fig.data:
        kind = t.type
        if getattr(t, "meta", None) == THIN:
            continue
        if kind in ("scatter", "scattergl", "scatter3d"):
            mode = t.mode or "lines+markers"
            if "lines" in mode:
                t.line.width = max(PRESENT_LINE, 2 * float(t.line.width or 2))
            if "markers" in mode and t.marker.size is not None and not isinstance(t.marker.size, (list, tuple)):
                t.marker.size = float(t.marker.size) * 1.4
        elif kind == "bar":
            t.marker.line = dict(color=ink, width=1.5)
            t.textfont = dict(size=PRESENT_TICK, color=ink)
        elif kind == "heatmap":
            # cell text: larger but still inside a cell; colour left to plotly (readable on dark and light cells)
            t.textfont = dict(size=PRESENT_TICK - 4)
        if kind in ("heatmap", "histogram2d") or (kind in ("scatter", "bar") and t.marker.showscale):
            cb = t.colorbar if kind == "heatmap" else t.marker.colorbar
            cb.tickfont = dict(size=PRESENT_TICK, color=ink)
            cb.title.font = dict(size=PRESENT_TICK, color=ink)
    return fig


def log_axis(fig: go.Figure, **where) -> go.Figure:
    """A log y-axis with one labelled tick per decade (1, 10, 100, 1k, ...): no 2 / 5 clutter."""
    fig.update_yaxes(type="log", dtick=1, tickformat="~s", minor=dict(showgrid=False), **where)
    return fig


def finish(fig: go.Figure, title: str, x: str | None = None, y: str | None = None, height: int | None = None) -> go.Figure:
    """Template, title and axis titles (every figure names its axes)."""
    fig.update_layout(template=TEMPLATE, title=dict(text=title, x=0.0, xanchor="left"),
                      margin=dict(l=60, r=20, t=60, b=50))
    if x is not None:
        fig.update_xaxes(title_text=x)
    if y is not None:
        fig.update_yaxes(title_text=y)
    if height is not None:
        fig.update_layout(height=height)
    return fig


def empty_figure(message: str, title: str = "") -> go.Figure:
    """A figure that says why there is nothing to draw (never fake data)."""
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                       font=dict(size=14))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return finish(fig, title, height=240)


def block_mean(a: np.ndarray, max_side: int) -> tuple[np.ndarray, int, int]:
    """Average ``a`` [R, C] over k_r x k_c blocks so neither side exceeds ``max_side``; returns (image, k_r, k_c).

    Edge blocks that do not fill a whole k x k tile are averaged over what they hold (NaN-padding), so a
    downsampled agreement map keeps each entry's weight equal.
    """
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D array, got shape {a.shape}")
    r, c = a.shape
    kr, kc = max(1, -(-r // max_side)), max(1, -(-c // max_side))
    if kr == 1 and kc == 1:
        return a, 1, 1
    rr, cc = -(-r // kr) * kr, -(-c // kc) * kc
    pad = np.full((rr, cc), np.nan)
    pad[:r, :c] = a
    tiles = pad.reshape(rr // kr, kr, cc // kc, kc)
    return np.nanmean(tiles, axis=(1, 3)), kr, kc
