"""GradFix figures: where sign(tau) agrees with the target's gradient vote (layers x blocks), where the vote
agrees with the oracle sign sign(tau_B) when the target's own fine-tune is known, one weight matrix entry by
entry, the vote-margin histogram, and keep-rate / first-order decrease per layer.

Inputs are the method's ``diagnostics()`` dict and, for the drill-down, an entry map (+1 agree, -1
disagree, 0 tie) of one tensor.
"""
from __future__ import annotations

from typing import Mapping, Optional

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from viz.common import AGREE_SCALE, block_mean, empty_figure, finish, log_axis

LAYER_BLOCKS = ("Q", "K", "V", "O", "fc1", "fc2", "ln1", "ln2")
GLOBAL_BLOCKS = ("embed", "ln_pre", "ln_post", "proj")
STATS = {"agreement": "sign agreement", "keep_rate": "keep-rate", "ties": "tie rate"}


def block_table(diag: Mapping, stat: str = "agreement") -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """(row labels, column labels, values [rows, cols], numel [rows, cols]) of ``stat`` per layer x block.

    Rows are layers 0..L-1 then ``global``; columns the per-layer blocks then the global ones. Several
    entries for one cell (weight and bias) are averaged weighted by their number of entries; ``ties`` is
    a count (as the method records it) and turned into a rate. Cells with no entry are NaN.
    """
    if stat not in STATS:
        raise ValueError(f"unknown statistic '{stat}' (known: {', '.join(STATS)})")
    blocks = list(diag.get("blocks") or [])
    layers = sorted({int(b["layer"]) for b in blocks if int(b["layer"]) >= 0})
    has_global = any(int(b["layer"]) < 0 for b in blocks)
    present = {b["block"] for b in blocks}
    cols = [c for c in LAYER_BLOCKS if c in present] + [c for c in GLOBAL_BLOCKS if c in present]
    cols += sorted(c for c in present if c not in cols)
    rows = [str(l) for l in layers] + (["global"] if has_global else [])
    r_of = {l: i for i, l in enumerate(layers)}
    acc = np.zeros((len(rows), len(cols)))
    num = np.zeros((len(rows), len(cols)))
    for b in blocks:
        l = int(b["layer"])
        r = r_of[l] if l >= 0 else len(rows) - 1
        c = cols.index(b["block"])
        n = float(b.get("numel") or 0)
        v = b.get(stat)
        if v is None or n <= 0:
            continue
        v = float(v)
        if stat == "ties":  # the method records a count: make it a rate (a count of 1 included)
            v = v / n
        acc[r, c] += v * n
        num[r, c] += n
    with np.errstate(invalid="ignore", divide="ignore"):
        val = np.where(num > 0, acc / np.maximum(num, 1), np.nan)
    return rows, cols, val, num


#: the one definition of agreement used by the heatmap and the drill-down
AGREEMENT_DEFINITION = ("agreement = share of the voted entries (ties excluded) where sign(tau) equals the vote; "
                        "0.5 = chance. Ties (the K votes cancel, no sign) are counted apart: the tie share is of all "
                        "entries.")


def _pct(v: float) -> str:
    return "" if np.isnan(v) else f"{100 * v:.0f}%"


#: what the oracle heatmap shows (the same statistic with the target's own task vector tau_B in tau's place)
ORACLE_DEFINITION = ("oracle agreement = share of the voted entries where the vote equals sign(tau_B), the sign of "
                     "the target's own fine-tune; 0.5 = the vote knows nothing of where the target's fine-tuning "
                     "goes, 1 = GradFix's mask is the oracle mask.")


def agreement_heatmap(diag: Mapping, stat: str = "agreement", title: Optional[str] = None) -> go.Figure:
    """Layers x blocks heatmap of ``stat`` (default: :data:`AGREEMENT_DEFINITION`); every cell also shows its
    tie share, so the heatmap and the drill-down read the same numbers. ``title`` replaces the default one."""
    rows, cols, val, num = block_table(diag, stat)
    if not rows:
        return empty_figure("no blocks in the sign vote", title or "Sign agreement")
    _, _, ties, _ = block_table(diag, "ties")
    if stat == "agreement":
        text = [[("" if np.isnan(v) else f"{v:.2f}<br>tie {_pct(t)}") for v, t in zip(row, trow)]
                for row, trow in zip(val, ties)]
    else:
        text = [[("" if np.isnan(v) else f"{v:.2f}") for v in row] for row in val]
    hover = [[f"layer {r}, {c}<br>{STATS[stat]} {'' if np.isnan(v) else f'{v:.3f}'}<br>tie share {_pct(t)}"
              f"<br>{int(n)} entries" for c, v, t, n in zip(cols, vrow, trow, nrow)]
             for r, vrow, trow, nrow in zip(rows, val, ties, num)]
    scale = AGREE_SCALE if stat == "agreement" else "Blues"
    fig = go.Figure(go.Heatmap(z=val, x=cols, y=rows, colorscale=scale, zmin=0.0, zmax=1.0, text=text,
                               texttemplate="%{text}", hovertext=hover, hoverinfo="text",
                               colorbar=dict(title=STATS[stat]), xgap=2, ygap=2, name=stat))
    # invisible markers on the filled cells, so a click on a cell can be picked up as a point selection
    cells = [(c, r) for i, r in enumerate(rows) for j, c in enumerate(cols) if not np.isnan(val[i, j])]
    fig.add_trace(go.Scatter(x=[c for c, _ in cells], y=[r for _, r in cells], mode="markers", name="cells",
                             marker=dict(symbol="square", size=28, opacity=0.0), hoverinfo="none",
                             showlegend=False))
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(type="category", side="top")
    what = " (of voted entries; ties shown)" if stat == "agreement" else ""
    finish(fig, title or f"{STATS[stat].capitalize()} per layer and block{what}", "block", "layer",
           height=max(340, 44 * len(rows) + 170))
    fig.update_layout(margin=dict(t=110))  # the block axis sits on top: room between it and the title
    return fig


def oracle_heatmap(oracle_diag: Mapping) -> go.Figure:
    """Layers x blocks: where the vote agrees with the oracle sign sign(tau_B) (:data:`ORACLE_DEFINITION`);
    ``oracle_diag`` is GradFix's diagnostics computed with tau_B in the place of tau."""
    total = oracle_diag.get("agreement_total")
    head = "Vote vs the oracle sign sign(tau_B)"  # short: the map sits in a half-width column
    return agreement_heatmap(oracle_diag, "agreement", head if total is None else f"{head}: {total:.2f} overall")


def entry_counts(entries) -> tuple[int, int, int]:
    """(agree, disagree, tie) counts of an entry map (+1 / -1 / 0)."""
    a = np.asarray(entries.detach().cpu().numpy() if hasattr(entries, "detach") else entries)
    agree, disagree = int((a > 0).sum()), int((a < 0).sum())
    return agree, disagree, int(a.size - agree - disagree)


def entry_title(name: str, shape: tuple, agree: int, disagree: int, ties: int) -> str:
    """The drill-down's headline in the heatmap's terms (:data:`AGREEMENT_DEFINITION`)."""
    voted, n = agree + disagree, max(1, agree + disagree + ties)
    share = f"{agree / voted:.2f}" if voted else "-"
    return (f"{name} {tuple(shape)}<br>agreement {share} ({agree} of {voted} voted entries), "
            f"tie {ties / n:.0%} ({ties} of {n})")


def entry_map_image(entries, name: str, max_side: int = 192, max_strip: int = 768) -> go.Figure:
    """One tensor's entry map (+1: sign(tau) agrees with the vote, -1: disagrees, 0: tie).

    A matrix is an image (larger than ``max_side`` on a side: averaged over k x k tiles, colour = mean in
    [-1, 1]); a vector (bias, LayerNorm) is a one-row strip over its entries (averaged over runs of k entries
    beyond ``max_strip``), with no meaningless second axis.
    """
    a = np.asarray(entries.detach().cpu().numpy() if hasattr(entries, "detach") else entries, dtype=np.float64)
    shape = a.shape
    agree, disagree, ties = entry_counts(a)
    title = entry_title(name, shape, agree, disagree, ties)
    bar = dict(tickvals=[-1, 0, 1], ticktext=["disagree", "tie", "agree"])
    if a.ndim <= 1:
        v = a.reshape(1, -1)
        img, _, k = block_mean(v, max_strip) if v.shape[1] > max_strip else (v, 1, 1)
        x = (np.arange(img.shape[1]) * k).tolist()
        fig = go.Figure(go.Heatmap(z=img, x=x, colorscale=AGREE_SCALE, zmin=-1, zmax=1,
                                   colorbar=dict(title="mean" if k > 1 else "", **bar, len=1.2),
                                   hovertemplate=("entry %{x}" + (f" (+{k - 1})" if k > 1 else "") +
                                                  "<br>%{z:.2f}<extra></extra>")))
        fig.update_yaxes(visible=False)
        note = f", each cell = mean of {k} entries" if k > 1 else ""
        return finish(fig, title + note, "entry index", None, height=230)
    if a.ndim > 2:
        a = a.reshape(a.shape[0], -1)
    img, kr, kc = block_mean(a, max_side)
    down = kr > 1 or kc > 1
    fig = go.Figure(go.Heatmap(z=img, colorscale=AGREE_SCALE, zmin=-1, zmax=1,
                               colorbar=dict(title="mean" if down else "", **bar),
                               hovertemplate=("row %{y}, col %{x}<br>" + ("mean " if down else "") +
                                              "%{z:.2f}<extra></extra>")))
    fig.update_yaxes(autorange="reversed")
    note = f", each cell = mean of {kr}x{kc} entries" if down else ""
    row_t = "output row" + (f" (/{kr})" if kr > 1 else "")
    col_t = "input column" + (f" (/{kc})" if kc > 1 else "")
    return finish(fig, title + note, col_t, row_t, height=460)


def margin_histogram(diag: Mapping) -> go.Figure:
    """Histogram of the vote margin |sum of gradient signs| / K over entries (0 = split vote, 1 = unanimous)."""
    h = diag.get("margin_hist") or {}
    edges, counts = list(h.get("edges") or []), list(h.get("counts") or [])
    if not counts or len(edges) != len(counts) + 1:
        return empty_figure("no vote-margin histogram in this alignment", "Vote margin")
    centers = [(edges[i] + edges[i + 1]) / 2 for i in range(len(counts))]
    widths = [edges[i + 1] - edges[i] for i in range(len(counts))]
    fig = go.Figure(go.Bar(x=centers, y=counts, width=widths, marker_color="#9467bd", name="entries",
                           hovertemplate="margin %{x:.2f}: %{y} entries<extra></extra>"))
    positive = [c for c in counts if c > 0]
    if positive and max(positive) > 100 * min(positive):  # counts over orders of magnitude: log scale,
        log_axis(fig)  # one tick per decade
    return finish(fig, "Vote margin over all entries", "vote margin (0 = split, 1 = unanimous)", "number of entries",
                  height=320)


def per_layer(diag: Mapping) -> tuple[list[str], list[float], list[float]]:
    """(layer labels, keep-rate per layer (numel-weighted), first-order decrease per layer (sum over blocks))."""
    blocks = list(diag.get("blocks") or [])
    keys = sorted({int(b["layer"]) for b in blocks}, key=lambda l: (l < 0, l))
    keep, fo = [], []
    for l in keys:
        bs = [b for b in blocks if int(b["layer"]) == l]
        n = sum(float(b.get("numel") or 0) for b in bs)
        keep.append(sum(float(b.get("keep_rate") or 0) * float(b.get("numel") or 0) for b in bs) / n if n else np.nan)
        fo.append(sum(float(b.get("first_order") or 0) for b in bs))
    return ["global" if l < 0 else str(l) for l in keys], keep, fo


def keep_rate_per_layer(diag: Mapping) -> go.Figure:
    """Two panels per layer: the fraction of tau's entries the mask keeps, and the first-order change of the
    target's loss <g, m * tau> (negative = the masked update goes downhill)."""
    labels, keep, fo = per_layer(diag)
    if not labels:
        return empty_figure("no blocks in the sign vote", "Keep-rate and first-order decrease")
    fig = make_subplots(rows=1, cols=2, subplot_titles=("keep-rate", "first-order loss change (< 0: descent)"),
                        horizontal_spacing=0.2)
    fig.add_trace(go.Bar(x=labels, y=keep, marker_color="#1f77b4", name="keep-rate",
                         hovertemplate="layer %{x}: keeps %{y:.1%}<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Bar(x=labels, y=fo, marker_color=["#2ca02c" if v <= 0 else "#d62728" for v in fo],
                         name="first order", hovertemplate="layer %{x}: %{y:.4g}<extra></extra>"), row=1, col=2)
    fig.update_xaxes(type="category", title_text="layer")
    fig.update_yaxes(range=[0, 1], tickformat=".0%", title_text="fraction of entries kept", row=1, col=1)
    fig.update_yaxes(title_text="<g, m*tau>", row=1, col=2)
    fig.update_layout(showlegend=False)
    return finish(fig, "Keep-rate and first-order decrease per layer", height=360)
