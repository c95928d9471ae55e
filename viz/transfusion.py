"""TransFusion figures: head assignment over its cost matrix, within-head permutations, how far the
permutations move from identity per layer, and the weight-matching objective per sweep.

Inputs are the method's ``diagnostics()`` dict (or one of its ``layers`` entries).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from viz.common import empty_figure, finish


def head_permutation(layer: Mapping, title: str | None = None) -> go.Figure:
    """The H x H head cost matrix (row: target head i, column: source head j) with the chosen assignment
    drawn as markers, and beside it each target head's confidence (margin to its best alternative).

    ``layer["head_perm"][i] = j`` means source head j is moved onto target head i.
    """
    perm = [int(j) for j in layer["head_perm"]]
    cost = np.asarray(layer.get("head_cost") or np.zeros((len(perm), len(perm))), dtype=np.float64)
    # an infinite margin (a single head: nothing to confuse it with) is drawn as missing
    margin = [float(m) if np.isfinite(float(m)) else np.nan for m in layer.get("head_margin") or [np.nan] * len(perm)]
    H = len(perm)
    heads = list(range(H))
    fig = make_subplots(rows=1, cols=2, column_widths=[0.72, 0.28], shared_yaxes=True, horizontal_spacing=0.05,
                        subplot_titles=("cost (lower = more alike)", "confidence"))
    fig.add_trace(go.Heatmap(z=cost, x=heads, y=heads, colorscale="Viridis_r", name="cost",
                             colorbar=dict(title=dict(text="cost", side="right"), x=1.01, xanchor="left", len=0.9,
                                           thickness=14),
                             hovertemplate="target head %{y} vs source head %{x}<br>cost %{z:.4g}<extra></extra>"),
                  row=1, col=1)
    fig.add_trace(go.Scatter(x=perm, y=heads, mode="markers", name="chosen assignment",
                             marker=dict(symbol="square-open", size=max(8, min(28, 320 // max(H, 1))),
                                         color="#d62728", line=dict(width=3)),
                             hovertemplate="target head %{y} <- source head %{x}<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Bar(x=margin, y=heads, orientation="h", name="margin", marker_color="#1f77b4",
                         hovertemplate="target head %{y}: margin %{x:.4g}<extra></extra>"), row=1, col=2)
    fig.update_yaxes(autorange="reversed", title_text="target head i", dtick=1 if H <= 32 else None, row=1, col=1)
    fig.update_xaxes(title_text="source head j", dtick=1 if H <= 32 else None, row=1, col=1)
    fig.update_xaxes(title_text="cost margin to 2nd best", row=1, col=2)
    fig.update_layout(showlegend=False)
    lay = layer.get("layer", "?")
    return finish(fig, title or f"Layer {lay}: head assignment", height=max(360, min(700, 40 * H + 140)))


def permutation_matrix(perm: Sequence[int]) -> np.ndarray:
    """P with P[i, perm[i]] = 1 (row: target index, column: source index)."""
    n = len(perm)
    p = np.zeros((n, n), dtype=np.int8)
    p[np.arange(n), np.asarray(perm, dtype=np.int64)] = 1
    return p


def within_head_permutation(perm: Sequence[int], target_head: int, source_head: int) -> go.Figure:
    """The d_h x d_h permutation shared by Q, K, V and O for one matched head pair (identity = diagonal)."""
    perm = [int(j) for j in perm]
    n = len(perm)
    fixed = sum(1 for i, j in enumerate(perm) if i == j)
    fig = go.Figure()
    fig.add_trace(go.Heatmap(z=permutation_matrix(perm), x=list(range(n)), y=list(range(n)), showscale=False,
                             colorscale=[[0, "#f7f7f7"], [1, "#1f77b4"]], zmin=0, zmax=1, name="P",
                             hovertemplate="target dim %{y} <- source dim %{x}<extra></extra>"))
    fig.add_trace(go.Scatter(x=perm, y=list(range(n)), mode="markers", name="matched dims",
                             marker=dict(size=max(3, min(10, 400 // max(n, 1))), color="#1f77b4"),
                             hovertemplate="target dim %{y} <- source dim %{x}<extra></extra>"))
    fig.add_trace(go.Scatter(x=[0, n - 1], y=[0, n - 1], mode="lines", name="identity",
                             line=dict(color="#aaaaaa", dash="dot"), hoverinfo="skip"))
    fig.update_yaxes(autorange="reversed", scaleanchor="x", constrain="domain")
    fig.update_xaxes(constrain="domain")
    fig.update_layout(showlegend=False)
    return finish(fig, f"Within-head permutation: target head {target_head} <- source head {source_head} "
                       f"({fixed}/{n} dims stay)", f"source dim (head {source_head})",
                  f"target dim (head {target_head})", height=420)


def _moved(fixed, size) -> float:
    return float("nan") if fixed is None or not size else 1.0 - float(fixed) / float(size)


def permutation_distance(diag: Mapping) -> go.Figure:
    """Per layer, the fraction of indices each permutation moves (0 = identity, 1 = every index moved):
    heads, MLP neurons, and the residual stream after attention and after the MLP."""
    layers = list(diag.get("layers") or [])
    if not layers:
        return empty_figure("no layers in the alignment", "Distance from identity")
    residual = diag.get("residual") or {}
    x = [int(l["layer"]) for l in layers]
    n_heads = [len(l.get("head_perm") or []) for l in layers]

    def res(space: str) -> float:
        r = residual.get(space)
        return _moved(r.get("fixed_points"), r.get("size")) if r else float("nan")

    series = {
        "heads": [_moved(l.get("head_fixed_points"), h) for l, h in zip(layers, n_heads)],
        "MLP neurons": [_moved(l.get("mlp_fixed_points"), l.get("mlp_size")) for l in layers],
        "residual after attention": [res(f"res:{i}a") for i in x],
        "residual after MLP": [res(f"res:{i}m") for i in x],
    }
    colors = {"heads": "#d62728", "MLP neurons": "#2ca02c", "residual after attention": "#1f77b4",
              "residual after MLP": "#17becf"}
    fig = go.Figure()
    for name, ys in series.items():
        if all(np.isnan(v) for v in ys):
            continue
        fig.add_trace(go.Scatter(x=x, y=ys, mode="lines+markers", name=name, line=dict(color=colors[name]),
                                 hovertemplate="layer %{x}: %{y:.1%} moved<extra>" + name + "</extra>"))
    if "res:0" in residual:
        fig.add_trace(go.Scatter(x=[x[0] - 0.5], y=[res("res:0")], mode="markers", name="residual input (res:0)",
                                 marker=dict(symbol="diamond", size=10, color="#1f77b4")))
    fig.update_yaxes(range=[-0.03, 1.03], tickformat=".0%")
    fig.update_xaxes(dtick=1)
    return finish(fig, "Distance from identity", "layer", "fraction of indices moved", height=380)


def objective_per_sweep(diag: Mapping) -> go.Figure:
    """The weight-matching objective after each sweep over the residual / MLP permutations (should rise then flatten)."""
    obj = [float(v) for v in diag.get("objective_per_sweep") or []]
    if not obj:
        return empty_figure("this alignment records no sweeps", "Objective per sweep")
    fig = go.Figure(go.Scatter(x=list(range(1, len(obj) + 1)), y=obj, mode="lines+markers", name="objective",
                               line=dict(color="#1f77b4"),
                               hovertemplate="sweep %{x}: %{y:.6g}<extra></extra>"))
    fig.update_xaxes(dtick=1 if len(obj) <= 30 else None)
    return finish(fig, "Weight-matching objective per sweep", "sweep", "objective (sum of matched similarities)",
                  height=320)
