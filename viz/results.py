"""Figures of transfer outcomes: accuracy vs alpha, accuracy bars, agreement between methods, layer ablation."""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import plotly.graph_objects as go
import torch

from viz.common import accuracy_axis, color_of, empty_figure, finish, label_of, ordered

PAIR_COLORS = ("#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666")


def _sweep_dict(sweep: Any) -> Optional[dict]:
    if sweep is None:
        return None
    return sweep if isinstance(sweep, Mapping) else sweep.to_dict()


def alpha_curves(sweeps: Mapping[str, Any], chosen: Optional[Mapping[str, float]] = None,
                 zero_shot: Optional[float] = None, split: str = "validation",
                 picked: Optional[float] = None) -> go.Figure:
    """Accuracy (%, on a fixed 0-100 axis) vs alpha, one line per method, the chosen alpha of each marked
    with a star.

    sweeps: method -> AlphaSweep (or its ``to_dict()``, accuracies in [0, 1]); chosen: method -> alpha to
    mark (default: best_alpha); picked: an alpha drawn as a dotted vertical line (e.g. the one picked on
    validation when the star shows a user's slider); zero_shot: in [0, 1], drawn as a dashed line.
    """
    fig = go.Figure()
    chosen = dict(chosen or {})
    drawn = 0
    for i, (name, sweep) in enumerate(sweeps.items()):
        s = _sweep_dict(sweep)
        if not s or not s.get("alphas"):
            continue
        c = color_of(name, i)
        val = [100.0 * float(v) for v in s["val"]]
        fig.add_trace(go.Scatter(x=list(s["alphas"]), y=val, mode="lines+markers", name=label_of(name),
                                 line=dict(color=c), marker=dict(size=5), legendgroup=name,
                                 hovertemplate="alpha %{x:.2f}<br>accuracy %{y:.1f} %<extra>" + label_of(name) + "</extra>"))
        a = float(chosen.get(name, s["best_alpha"]))
        # the accuracy at the marked alpha is read off the sweep (nearest grid point)
        j = min(range(len(s["alphas"])), key=lambda k: abs(s["alphas"][k] - a))
        fig.add_trace(go.Scatter(x=[a], y=[val[j]], mode="markers", name=f"{label_of(name)}: alpha = {a:.2f}",
                                 marker=dict(symbol="star", size=16, color=c, line=dict(color="black", width=1)),
                                 legendgroup=name, showlegend=True,
                                 hovertemplate="chosen alpha %{x:.2f}<br>accuracy %{y:.1f} %<extra></extra>"))
        drawn += 1
    if not drawn:
        return empty_figure("no alpha sweep (alpha was fixed, or no task was given)", "Accuracy vs alpha")
    if picked is not None:
        fig.add_vline(x=float(picked), line=dict(color="#555555", dash="dot"),
                      annotation_text=f"picked on validation: {float(picked):.2f}", annotation_position="top")
    if zero_shot is not None and not math.isnan(zero_shot):
        fig.add_hline(y=100.0 * zero_shot, line=dict(color=color_of("zero_shot_target"), dash="dash"),
                      annotation_text="target zero-shot (test)", annotation_position="bottom right")
    accuracy_axis(fig)
    return finish(fig, "Accuracy vs alpha", "alpha (scale of the transported task vector)", f"{split} accuracy (%)",
                  height=420)


def accuracy_rows(accuracies: Mapping[str, float]) -> list[dict]:
    """Table rows (what, accuracy in %) in reading order; NaN/missing entries are left out."""
    rows = []
    for k in ordered(accuracies):
        v = accuracies[k]
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        rows.append({"model": label_of(k), "key": k, "test accuracy (%)": round(100.0 * float(v), 2)})
    return rows


def accuracy_bars(accuracies: Mapping[str, float], title: str = "Test accuracy") -> go.Figure:
    """One bar per row of :func:`accuracy_rows` (target zero-shot, naive, methods, source fine-tuned, oracle)."""
    rows = accuracy_rows(accuracies)
    if not rows:
        return empty_figure("no accuracies yet", title)
    fig = go.Figure(go.Bar(x=[r["model"] for r in rows], y=[r["test accuracy (%)"] for r in rows],
                           marker_color=[color_of(r["key"], i) for i, r in enumerate(rows)],
                           text=[f"{r['test accuracy (%)']:.1f}" for r in rows], textposition="outside",
                           cliponaxis=False, hovertemplate="%{x}: %{y:.1f} %<extra></extra>"))
    accuracy_axis(fig)
    return finish(fig, title, "model", "test accuracy (%)", height=380)


def layer_cosines(taus: Mapping[str, Any]) -> dict[str, dict[int, float]]:
    """Cosine similarity per layer between every pair of transported task vectors (same target architecture).

    Layer -1 holds the global tensors (embeddings, final LayerNorm, projection). NaN where either is zero.
    Returns ``{"a vs b": {layer: cosine}}``.
    """
    from transport.core.layout import param_axes

    names = list(taus)
    out: dict[str, dict[int, float]] = {}
    if len(names) < 2:
        return out
    info = param_axes(taus[names[0]].arch)
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            a, b = taus[names[i]], taus[names[j]]
            dot: dict[int, float] = {}
            na: dict[int, float] = {}
            nb: dict[int, float] = {}
            for k, ta in a.items():
                if k not in b.tensors:
                    continue
                l = info[k].layer
                x, y = ta.double().flatten(), b.tensors[k].double().flatten()
                dot[l] = dot.get(l, 0.0) + float(x @ y)
                na[l] = na.get(l, 0.0) + float(x @ x)
                nb[l] = nb.get(l, 0.0) + float(y @ y)
            out[f"{names[i]} vs {names[j]}"] = {
                l: (dot[l] / math.sqrt(na[l] * nb[l]) if na[l] > 0 and nb[l] > 0 else float("nan"))
                for l in sorted(dot)}
    return out


def _layer_label(l: int) -> str:
    return "global" if l < 0 else str(l)


def layer_cosine_figure(cosines: Mapping[str, Mapping[int, float]]) -> go.Figure:
    """Lines of per-layer cosine between methods' transported taus (1 = same direction, 0 = unrelated)."""
    if not cosines:
        return empty_figure("needs at least two methods' transported task vectors", "Agreement between methods")
    fig = go.Figure()
    for i, (pair, per_layer) in enumerate(cosines.items()):
        layers = sorted(per_layer, key=lambda l: (l < 0, l))  # global tensors last
        fig.add_trace(go.Scatter(x=[_layer_label(l) for l in layers], y=[per_layer[l] for l in layers],
                                 mode="lines+markers", name=pair, line=dict(color=PAIR_COLORS[i % len(PAIR_COLORS)]),
                                 hovertemplate="layer %{x}<br>cosine %{y:.3f}<extra>" + pair + "</extra>"))
    fig.update_yaxes(range=[-1.05, 1.05])
    fig.update_xaxes(type="category")
    return finish(fig, "Agreement between methods' transported task vectors", "layer",
                  "cosine similarity per layer", height=380)


def layer_ablation_figure(layers: Sequence[int], only: Sequence[float], without: Sequence[float],
                          full: float, zero_shot: float, split: str = "validation") -> go.Figure:
    """Grouped bars: accuracy when transporting ONLY layer l, and ALL BUT layer l, against full and none.

    A bar of "all but l" far below "full" means layer l carries the transfer; an "only l" bar below
    "none" means that layer alone hurts.
    """
    if not len(layers):
        return empty_figure("no layers", "Layer ablation")
    x = [_layer_label(l) for l in layers]
    fig = go.Figure()
    fig.add_trace(go.Bar(x=x, y=[100 * v for v in only], name="only this layer transported",
                         marker_color="#1f77b4", hovertemplate="layer %{x} only: %{y:.1f}%<extra></extra>"))
    fig.add_trace(go.Bar(x=x, y=[100 * v for v in without], name="all layers but this one",
                         marker_color="#ff7f0e", hovertemplate="all but layer %{x}: %{y:.1f}%<extra></extra>"))
    # reference levels as legend entries (annotations would sit on the bars)
    fig.add_trace(go.Scatter(x=x, y=[100 * full] * len(x), mode="lines", name=f"all layers transported ({split})",
                             line=dict(color="black"), hovertemplate="all layers: %{y:.1f}%<extra></extra>"))
    fig.add_trace(go.Scatter(x=x, y=[100 * zero_shot] * len(x), mode="lines",
                             name=f"no layer (target zero-shot, {split})",
                             line=dict(color=color_of("zero_shot_target"), dash="dash"),
                             hovertemplate="no layer: %{y:.1f}%<extra></extra>"))
    fig.update_layout(barmode="group")
    fig.update_xaxes(type="category")
    accuracy_axis(fig)
    return finish(fig, "Which layers carry the transfer", "layer (global = embeddings, final norm, projection)",
                  f"{split} accuracy (%)", height=420)


def layer_norms_figure(norms: Mapping[str, Mapping[int, float]]) -> go.Figure:
    """Frobenius norm of each transported task vector per layer (one line per method or source tau)."""
    if not norms:
        return empty_figure("no task vectors", "Update size per layer")
    fig = go.Figure()
    for i, (name, per_layer) in enumerate(norms.items()):
        layers = sorted(per_layer, key=lambda l: (l < 0, l))
        fig.add_trace(go.Bar(x=[_layer_label(l) for l in layers], y=[per_layer[l] for l in layers],
                             name=label_of(name), marker_color=color_of(name, i)))
    fig.update_layout(barmode="group")
    fig.update_xaxes(type="category")
    return finish(fig, "Update size per layer", "layer", "||delta|| (Frobenius)", height=340)


def tau_layer_norms(tau: Any) -> dict[int, float]:
    """Per-layer norms of a TaskVector (thin wrapper so pages need no torch)."""
    with torch.no_grad():
        return tau.per_layer_norms()
