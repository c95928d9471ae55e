"""Which test examples a transfer changes: a grid of inputs with every model's prediction, per-class accuracy
and confusion matrices.

Inputs are plain arrays: images [N, C, H, W] in [0, 1], labels [N] and, per model, its predictions [N].
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
import plotly.graph_objects as go

from viz.common import THIN, accuracy_axis, color_of, empty_figure, finish, label_of

#: how a test example can relate the method to the naive baseline
FLIP_KINDS = {
    "fixed": "fixed by the method (naive wrong, method right)",
    "broken": "broken by the method (naive right, method wrong)",
    "changed": "every example where the method's prediction differs from the target's",
    "all": "the first test examples, whatever happened",
}

RIGHT, WRONG = "#1a7f37", "#c62828"


def _np(x) -> np.ndarray:
    return np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x)


def flip_indices(labels, preds: Mapping[str, Sequence[int]], method: str, kind: str, baseline: str = "naive",
                 reference: str = "target") -> list[int]:
    """Test indices of ``kind`` (:data:`FLIP_KINDS`), in test order: the method against ``baseline`` (fixed /
    broken), or against the untouched ``reference`` (changed)."""
    if kind not in FLIP_KINDS:
        raise ValueError(f"unknown kind '{kind}' (known: {', '.join(FLIP_KINDS)})")
    y = _np(labels).astype(int)
    m = _np(preds[method]).astype(int) == y
    if kind == "all":
        return list(range(len(y)))
    if kind == "changed":
        return np.nonzero(_np(preds[method]) != _np(preds[reference]))[0].tolist()
    b = _np(preds[baseline]).astype(int) == y
    hit = (m & ~b) if kind == "fixed" else (~m & b)
    return np.nonzero(hit)[0].tolist()


def _rgb(image: np.ndarray, scale: int) -> np.ndarray:
    """[C, H, W] in [0, 1] -> RGB uint8 [H * scale, W * scale, 3] (nearest-neighbour enlarged)."""
    c = image.shape[0]
    rgb = np.repeat(image, 3, axis=0) if c == 1 else image[:3]
    rgb = (np.clip(rgb, 0.0, 1.0) * 255).round().astype(np.uint8).transpose(1, 2, 0)
    return np.kron(rgb, np.ones((scale, scale, 1), dtype=np.uint8)) if scale > 1 else rgb


def flip_grid(images, labels, preds: Mapping[str, Sequence[int]], indices: Sequence[int],
              classnames: Optional[Sequence[str]] = None, cols: int = 8, title: str = "",
              font: int = 11) -> go.Figure:
    """A grid of test inputs; under each, the true class and every model's prediction (green = right, red =
    wrong). ``preds``: model label -> predictions over the whole split; ``indices``: which examples to show;
    ``font``: caption size in px (the rows are spaced for it; fewer ``cols`` for a larger font)."""
    from plotly.subplots import make_subplots

    idx = [int(i) for i in indices]
    if not idx:
        return empty_figure("no test example of this kind", title or "Which examples flip")
    x, y = _np(images).astype(np.float64)[idx], _np(labels).astype(int)[idx]
    n, _, h, w = x.shape
    cols = max(1, min(cols, n))
    rows = -(-n // cols)
    scale = max(1, int(round(64 / max(h, w))))  # small images (8x8 digits) drawn enlarged
    names = list(classnames or [])
    cname = (lambda c: names[c] if 0 <= c < len(names) else str(c))
    models = list(preds)
    # fixed pixels per row: the image, then its caption lines
    tile_px, text_px = 110 + 4 * max(0, font - 11), int(1.5 * font) * (len(models) + 1) + 8
    height = rows * (tile_px + text_px) + 70
    fig = make_subplots(rows=rows, cols=cols, horizontal_spacing=0.02,
                        vertical_spacing=(text_px / height) if rows > 1 else 0.0)
    for i, (j, truth) in enumerate(zip(idx, y)):
        r, q = divmod(i, cols)
        fig.add_trace(go.Image(z=_rgb(x[i], scale), hoverinfo="skip", name=f"#{j}"), row=r + 1, col=q + 1)
    for i, (j, truth) in enumerate(zip(idx, y)):
        n_ax = "" if i == 0 else str(i + 1)
        xd, yd = fig.layout[f"xaxis{n_ax}"].domain, fig.layout[f"yaxis{n_ax}"].domain
        lines = [f"<b>#{j}: {cname(truth)}</b>"]
        for mname in models:
            p = int(_np(preds[mname])[j])
            lines.append(f"<span style='color:{RIGHT if p == truth else WRONG}'>{mname}: {cname(p)}</span>")
        fig.add_annotation(x=(xd[0] + xd[1]) / 2, y=yd[0], xref="paper", yref="paper", yshift=-2,
                           text="<br>".join(lines), showarrow=False, xanchor="center", yanchor="top",
                           font=dict(size=font), align="center", name=THIN)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    finish(fig, title or f"{n} test examples: true class, then each model's prediction", height=height)
    fig.update_layout(margin=dict(l=10, r=10, t=50, b=text_px))
    return fig


def per_class_accuracy(labels, preds: Mapping[str, Sequence[int]], classnames: Optional[Sequence[str]] = None,
                       keys: Optional[Mapping[str, str]] = None) -> go.Figure:
    """Grouped bars: test accuracy (%) of every model on each class (a fixed 0-100 % axis)."""
    y = _np(labels).astype(int)
    if len(y) == 0 or not preds:
        return empty_figure("no test examples", "Per-class accuracy")
    k = int(max(y.max(), *(int(_np(p).max()) for p in preds.values()))) + 1
    k = max(k, len(classnames or []))
    names = [(classnames[c] if classnames and c < len(classnames) else str(c)) for c in range(k)]
    fig = go.Figure()
    for i, (mname, p) in enumerate(preds.items()):
        p = _np(p).astype(int)
        acc = [100.0 * float((p[y == c] == c).mean()) if (y == c).any() else np.nan for c in range(k)]
        key = (keys or {}).get(mname, mname)
        fig.add_trace(go.Bar(x=names, y=acc, name=mname, marker_color=color_of(key, i),
                             hovertemplate="%{x}: %{y:.1f} %<extra>" + mname + "</extra>"))
    fig.update_layout(barmode="group")
    fig.update_xaxes(type="category")
    accuracy_axis(fig)
    return finish(fig, "Per-class test accuracy", "true class", "test accuracy (%)", height=380)


def confusion_matrix(labels, pred, k: int) -> np.ndarray:
    """Counts [k, k]: row = true class, column = predicted class."""
    m = np.zeros((k, k), dtype=np.int64)
    np.add.at(m, (_np(labels).astype(int), _np(pred).astype(int)), 1)
    return m


def confusion_figure(labels, pred, classnames: Optional[Sequence[str]] = None, model: str = "") -> go.Figure:
    """One model's confusion matrix, each row normalised to the share of that class (fixed 0-1 colour scale)."""
    y = _np(labels).astype(int)
    if len(y) == 0:
        return empty_figure("no test examples", "Confusion matrix")
    k = max(int(y.max()), int(_np(pred).max())) + 1
    k = max(k, len(classnames or []))
    names = [(classnames[c] if classnames and c < len(classnames) else str(c)) for c in range(k)]
    m = confusion_matrix(y, pred, k)
    share = m / np.maximum(1, m.sum(1, keepdims=True))
    fig = go.Figure(go.Heatmap(z=share, x=names, y=names, zmin=0, zmax=1, colorscale="Blues", customdata=m,
                               text=[[f"{v:.0%}" if v >= 0.005 else "" for v in row] for row in share],
                               texttemplate="%{text}", colorbar=dict(title="share of class"), xgap=1, ygap=1,
                               hovertemplate="true %{y}, predicted %{x}: %{customdata} (%{z:.0%})<extra></extra>"))
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(type="category", side="bottom")
    acc = float(np.trace(m)) / max(1, int(m.sum()))
    return finish(fig, f"Confusion matrix: {label_of(model) if model else ''} ({100 * acc:.1f} % right)",
                  "predicted class", "true class", height=460)
