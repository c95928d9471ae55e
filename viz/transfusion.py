"""TransFusion figures: head assignment over its cost matrix, query heads inside matched key/value groups,
within-head permutations, how far the permutations move from identity per layer, and the weight-matching
objective per sweep.

Inputs are the method's ``diagnostics()`` dict (or one of its ``layers`` entries).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from viz.common import empty_figure, finish


def head_confidence(cost: np.ndarray, perm: Sequence[int], margin: Sequence[float]) -> list[float]:
    """Per target head i, margin_i / (margin_i + C[i, perm[i]]) in [0, 1], scale-free so pairs compare.

    margin_i: how much the total assignment cost rises when head i may not take its chosen source head.
    1 = the chosen source head matches exactly and every alternative is worse; 0 = an alternative is as
    good (a toss-up). NaN where nothing can be said (a single head: infinite margin).
    """
    out = []
    for i, (j, m) in enumerate(zip(perm, margin)):
        m = float(m)
        if not np.isfinite(m):
            out.append(float("nan"))
            continue
        chosen = max(0.0, float(cost[i, j])) if cost.size else 0.0
        out.append(0.0 if m + chosen <= 0 else m / (m + chosen))
    return out


def head_permutation(layer: Mapping, title: str | None = None) -> go.Figure:
    """The H x H head cost matrix (row: target head i, column: source head j) with the chosen assignment
    drawn as markers, and beside it each target head's confidence on a fixed 0-1 scale
    (:func:`head_confidence`).

    ``layer["head_perm"][i] = j`` means source head j is moved onto target head i.
    """
    perm = [int(j) for j in layer["head_perm"]]
    cost = np.asarray(layer.get("head_cost") or np.zeros((len(perm), len(perm))), dtype=np.float64)
    raw = [float(m) for m in layer.get("head_margin") or [np.nan] * len(perm)]
    conf = head_confidence(cost, perm, raw)
    H = len(perm)
    heads = list(range(H))
    # the cost colour bar sits between the panels, next to the cost matrix it belongs to
    fig = make_subplots(rows=1, cols=2, column_widths=[0.7, 0.3], shared_yaxes=True, horizontal_spacing=0.14,
                        subplot_titles=("cost (lower = more alike)", "confidence"))
    fig.add_trace(go.Heatmap(z=cost, x=heads, y=heads, colorscale="Viridis_r", name="cost",
                             colorbar=dict(title=dict(text="cost", side="right"), x=0.615, xanchor="left", len=0.9,
                                           thickness=14),
                             hovertemplate="target head %{y} vs source head %{x}<br>cost %{z:.4g}<extra></extra>"),
                  row=1, col=1)
    fig.add_trace(go.Scatter(x=perm, y=heads, mode="markers", name="chosen assignment",
                             marker=dict(symbol="square-open", size=max(8, min(28, 320 // max(H, 1))),
                                         color="#d62728", line=dict(width=3)),
                             hovertemplate="target head %{y} <- source head %{x}<extra></extra>"), row=1, col=1)
    chosen = [float(cost[i, j]) if cost.size else float("nan") for i, j in enumerate(perm)]
    fig.add_trace(go.Bar(x=conf, y=heads, orientation="h", name="confidence", marker_color="#1f77b4",
                         customdata=list(zip(raw, chosen)),
                         hovertemplate="target head %{y}: confidence %{x:.2f}<br>cost margin %{customdata[0]:.4g}, "
                                       "chosen cost %{customdata[1]:.4g}<extra></extra>"), row=1, col=2)
    fig.update_yaxes(autorange="reversed", title_text="target head i", dtick=1 if H <= 32 else None, row=1, col=1)
    fig.update_xaxes(title_text="source head j", dtick=1 if H <= 32 else None, row=1, col=1)
    # a fixed scale: a toss-up must look like one on every pair
    fig.update_xaxes(title_text="confidence (0 = toss-up, 1 = certain)", range=[0, 1], dtick=0.5, row=1, col=2)
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


def query_heads(layer: Mapping) -> list[int]:
    """Per target query head t (global index, group t // r), the source query head moved onto it:
    ``kv[g] * r + query_perm[g][a]`` for t = g * r + a (``layer`` is one entry of the diagnostics' layers)."""
    kv = [int(g) for g in layer["head_perm"]]
    q = [[int(a) for a in row] for row in layer.get("query_perm") or [[0] for _ in kv]]
    r = len(q[0]) if q else 1
    return [kv[g] * r + q[g][a] for g in range(len(kv)) for a in range(r)]


def query_head_permutation(layer: Mapping, title: str | None = None) -> go.Figure:
    """Grouped-query attention: which source query head went to which target query head (row: target query
    head, column: source query head; P[t, s] = 1). A query head never leaves its key/value group, so the ones
    sit in the blocks of the matched groups (outlined: target group g <- source group ``head_perm[g]``)."""
    kv = [int(g) for g in layer["head_perm"]]
    src = query_heads(layer)
    H, G = len(src), len(kv)
    r = H // max(G, 1)
    P = permutation_matrix(src)
    heads = list(range(H))
    group_of = [t // r for t in heads]
    hover = [[f"target query head {t} (group {t // r}) vs source query head {s} (group {s // r})"
              + ("<br><b>moved here</b>" if P[t, s] else "") for s in heads] for t in heads]
    fig = go.Figure(go.Heatmap(z=P, x=heads, y=heads, showscale=False, zmin=0, zmax=1, name="P",
                               colorscale=[[0, "#f7f7f7"], [1, "#d62728"]], text=hover,
                               hovertemplate="%{text}<extra></extra>"))
    for g, sg in enumerate(kv):  # the matched key/value groups
        fig.add_shape(type="rect", x0=sg * r - 0.5, x1=sg * r + r - 0.5, y0=g * r - 0.5, y1=g * r + r - 0.5,
                      line=dict(color="#1f77b4", width=2), fillcolor="rgba(0,0,0,0)")
    fixed = sum(1 for t, s in enumerate(src) if t == s)
    fig.update_yaxes(autorange="reversed", dtick=1 if H <= 32 else None, scaleanchor="x", constrain="domain")
    fig.update_xaxes(dtick=1 if H <= 32 else None, constrain="domain")
    fig.update_layout(showlegend=False, meta={"group_of_target": group_of, "group_size": r})
    lay = layer.get("layer", "?")
    return finish(fig, title or f"Layer {lay}: query heads inside the matched key/value groups ({fixed}/{H} stay)",
                  "source query head", "target query head", height=max(360, min(700, 36 * H + 140)))


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
    """The weight-matching objective after each sweep over the residual / MLP permutations (should rise then flatten).

    Activation matching solves each permutation once (no sweeps): the figure says so instead of drawing a
    one-point curve.
    """
    obj = [float(v) for v in diag.get("objective_per_sweep") or []]
    if diag.get("matching") == "activation":
        value = f" Weight-matching objective of its permutations: {obj[-1]:.6g}." if obj else ""
        return empty_figure("Activation matching solves each permutation once on the activation<br>correlations: "
                            "there are no sweeps to plot." + value, "Activation matching: one solve, no sweeps")
    if not obj:
        return empty_figure("this alignment records no sweeps", "Objective per sweep")
    fig = go.Figure(go.Scatter(x=list(range(1, len(obj) + 1)), y=obj, mode="lines+markers", name="objective",
                               line=dict(color="#1f77b4"),
                               hovertemplate="sweep %{x}: %{y:.6g}<extra></extra>"))
    fig.update_xaxes(dtick=1 if len(obj) <= 30 else None)
    return finish(fig, "Weight-matching objective per sweep" + _order_note(diag), "sweep",
                  "objective (sum of similarities)", height=320)


def _order_note(diag: Mapping) -> str:
    """A subtitle line: the visiting order, and for 'auto' the match confidence that chose it."""
    order = diag.get("order")
    if not order:
        return ""
    conf = diag.get("match_confidence")
    if diag.get("order_option") != "auto" or not conf:
        return f"<br><sup>{order} order</sup>"
    sign = ">" if order == "chain" else "<="
    return f"<br><sup>{order} order (auto: match confidence {conf['value']:.1f} {sign} {conf['threshold']:.1f})</sup>"


#: the groups of units compared with a known shuffle, in drawing order
RECOVERY_GROUPS = {"res_attn": "residual after attention", "res_mlp": "residual after MLP", "heads": "heads",
                   "head_dims": "dims within heads", "mlp": "MLP units"}


def recovery_figure(recovery: Mapping) -> go.Figure:
    """Per layer, the share of units whose recovered permutation equals the hidden shuffle (0-100 %).

    ``recovery``: ``{"layers": [0, 1, ...], "groups": {group: [share per layer]}, "overall": share,
    "res_0": share}`` with group keys from :data:`RECOVERY_GROUPS` (shares in [0, 1]).
    """
    layers = list(recovery.get("layers") or [])
    if not layers:
        return empty_figure("no hidden shuffle to compare with", "Recovered vs hidden shuffle")
    colors = {"res_attn": "#1f77b4", "res_mlp": "#17becf", "heads": "#d62728", "head_dims": "#ff9896",
              "mlp": "#2ca02c"}
    fig = go.Figure()
    for key, name in RECOVERY_GROUPS.items():
        ys = recovery["groups"].get(key)
        if ys is None:
            continue
        fig.add_trace(go.Bar(x=[str(l) for l in layers], y=[100.0 * v for v in ys], name=name,
                             marker_color=colors[key], hovertemplate="layer %{x}: %{y:.1f} % of " + name +
                             " matched<extra></extra>"))
    fig.update_layout(barmode="group")
    fig.update_xaxes(type="category")
    fig.update_yaxes(range=[0, 100], dtick=20, ticksuffix=" %")
    res0 = recovery.get("res_0")
    extra = "" if res0 is None else f", residual input {100 * res0:.0f} %"
    return finish(fig, f"Recovered vs hidden shuffle: {100 * float(recovery.get('overall', 0)):.1f} % of all units "
                       f"matched{extra}", "layer", "units matched (%)", height=380)
