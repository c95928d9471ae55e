"""Figures of what versions of a language model do with one prompt (a :class:`transport.prompt.PromptReport`):
the label words' probabilities, the top next tokens, and token-level colouring of where a version's
predictions differ from the reference (KL per prompt position) and of where its continuation differs."""
from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from viz.common import THIN, color_of, empty_figure, finish, label_of


def _visible(tok: str) -> str:
    """A token as drawn in a cell: whitespace made visible."""
    return tok.replace(" ", "·").replace("\n", "\\n").replace("\t", "\\t") or "(empty)"


def label_figure(report) -> go.Figure:
    """Grouped bars: each version's probability of each label word (renormalised over the label words)."""
    if not report.labels:
        return empty_figure("the task has no label words: see the next-token distributions", "Predicted label")
    names = list(report.labels)
    classes = list(next(iter(report.labels.values())))
    fig = go.Figure()
    for i, c in enumerate(classes):
        fig.add_bar(name=c, x=[label_of(n) for n in names], y=[100 * report.labels[n][c] for n in names],
                    marker_color=("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")[i % 6])
    fig.update_layout(barmode="group", legend_title_text="label word")
    fig.update_yaxes(range=[0, 100])
    return finish(fig, "Predicted label: p(label word | prompt), over the label words", "version", "probability (%)",
                  height=360)


def next_token_figure(report, k: int = 8) -> go.Figure:
    """One panel per version: its ``k`` most likely next tokens."""
    names = list(report.top)
    if not names:
        return empty_figure("no versions to show", "Next token")
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=[label_of(n) for n in names], shared_yaxes=False,
                        horizontal_spacing=0.04)
    for j, n in enumerate(names):
        top = report.top[n][:k][::-1]
        fig.add_bar(x=[100 * p for _, p in top], y=[f"{_visible(t)} " for t, _ in top], orientation="h",
                    marker_color=color_of(n, j), showlegend=False, row=1, col=j + 1)
        fig.update_xaxes(range=[0, 100], row=1, col=j + 1, title_text="p (%)")
    return finish(fig, "Next token after the prompt (top tokens of each version)", height=340)


def divergence_figure(report) -> go.Figure:
    """Rows = versions, columns = prompt tokens; colour = KL(version || reference) of the next-token
    distribution after that token (0: the same prediction as the reference there)."""
    names = [n for n in report.divergence if n != report.reference]
    if not names or not report.tokens:
        return empty_figure("nothing to compare with the reference", "Where the predictions differ")
    z = [report.divergence[n] for n in names]
    fig = go.Figure(go.Heatmap(z=z, x=list(range(len(report.tokens))), y=[label_of(n) for n in names],
                               text=[[_visible(t) for t in report.tokens] for _ in names], texttemplate="%{text}",
                               colorscale="Reds", zmin=0, colorbar=dict(title="KL (nats)"),
                               hovertemplate="token %{x} %{text}<br>%{y}: KL %{z:.3f} nats<extra></extra>",
                               xgap=1, ygap=1))
    fig.update_xaxes(title_text="prompt token (the prediction after it)", showgrid=False)
    fig.update_yaxes(autorange="reversed", showgrid=False)
    return finish(fig, f"Where each version's next-token prediction differs from {label_of(report.reference)}",
                  height=120 + 40 * len(names))


def continuation_figure(report) -> go.Figure:
    """Rows = versions, columns = generated tokens (greedy); a cell is coloured where the token differs from
    the reference's continuation at that position."""
    names = list(report.continuation)
    ref = report.continuation.get(report.reference, [])
    if not names or not ref:
        return empty_figure("no continuation", "Greedy continuation")
    n = max(len(report.continuation[m]) for m in names)
    z = [[float(i >= len(ref) or i >= len(report.continuation[m]) or report.continuation[m][i] != ref[i])
          for i in range(n)] for m in names]
    text = [[_visible(t) for t in report.continuation[m]] + [""] * (n - len(report.continuation[m])) for m in names]
    fig = go.Figure(go.Heatmap(z=z, text=text, texttemplate="%{text}", x=list(range(n)),
                               y=[label_of(m) for m in names], zmin=0, zmax=1, showscale=False,
                               colorscale=[[0, "#f2f2f2"], [1, "#fdd0a2"]], xgap=1, ygap=1,
                               hovertemplate="%{y}, token %{x}: %{text}<extra></extra>"))
    fig.update_xaxes(title_text="generated token", showgrid=False)
    fig.update_yaxes(autorange="reversed", showgrid=False)
    return finish(fig, f"Greedy continuation (orange: differs from {label_of(report.reference)})",
                  height=120 + 40 * len(names))


__all__ = ["label_figure", "next_token_figure", "divergence_figure", "continuation_figure", "THIN"]
