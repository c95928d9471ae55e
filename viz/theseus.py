"""Theseus figures: target activations vs source activations before and after the Procrustes map (PCA),
the Procrustes residual per layer, singular values of a cross-covariance, and update norms."""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from viz.common import THIN, empty_figure, finish, log_axis

CLASS_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                "#bcbd22", "#17becf")


def _np(x) -> np.ndarray:
    return np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x, dtype=np.float64)


def fit_to_width(x: np.ndarray, d: int) -> np.ndarray:
    """Zero-pad or truncate the columns of ``x`` [n, d_A] to ``d``: the map the naive baseline assumes."""
    if x.shape[1] == d:
        return x
    if x.shape[1] > d:
        return x[:, :d]
    return np.concatenate([x, np.zeros((x.shape[0], d - x.shape[1]))], axis=1)


def pca_basis(target: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean [d], top-k principal directions [d, k]) of the target activations; a sign convention makes it
    deterministic (largest-|.| entry of each direction positive)."""
    mu = target.mean(0)
    _, _, vt = np.linalg.svd(target - mu, full_matrices=False)
    v = vt[:k].T
    if v.shape[1] < k:  # fewer samples / dims than requested components
        v = np.concatenate([v, np.zeros((v.shape[0], k - v.shape[1]))], axis=1)
    idx = np.abs(v).argmax(0)
    signs = np.sign(v[idx, np.arange(v.shape[1])])
    signs[signs == 0] = 1
    return mu, v * signs


def pca_figure(target, source, mapped, labels: Optional[Sequence[int]], classnames: Optional[Sequence[str]] = None,
               dims: int = 2, space: str = "", before=None, sample: str = "image") -> go.Figure:
    """Target activations (circles) and source activations (crosses), coloured by class, in the target's
    principal axes: left, source zero-padded / truncated to the target width (before alignment; ``before``
    if given, else computed); right, the mapped source X_A T (after). Overlapping clouds per class = the map
    lines the two models up.

    target [n, d_B], source [n, d_A], mapped [n, d_B], labels [n] or None (one colour); one trace per
    (panel, model, class). ``sample``: what one point is drawn from (``"image"``, or ``"text"`` on a language
    model), in the legend.
    """
    if dims not in (2, 3):
        raise ValueError("dims must be 2 or 3")
    xb, xa, xm = _np(target), _np(source), _np(mapped)
    if len(xb) == 0:
        return empty_figure("no activation sample", "PCA of activations")
    y = np.zeros(len(xb), dtype=int) if labels is None else _np(labels).astype(int)
    if labels is None:
        classnames = [f"all {sample}s"]
    mu, v = pca_basis(xb, dims)
    xn = fit_to_width(xa, xb.shape[1]) if before is None else _np(before)
    panels = {"before: source zero-padded/truncated": xn, "after: mapped source X_A T": xm}
    proj_t = (xb - mu) @ v
    spec = {"type": "scene"} if dims == 3 else {}
    fig = make_subplots(rows=1, cols=2, subplot_titles=list(panels), specs=[[spec, spec]], horizontal_spacing=0.06)
    classes = sorted(set(y.tolist()))
    names = list(classnames) if classnames else []
    for col, (panel, xs) in enumerate(panels.items(), start=1):
        proj_s = (xs - mu) @ v
        # one segment per image (text) from its source point to its target point: shorter after the map
        seg = _segments(proj_s, proj_t)
        line = dict(name=f"source -> target, same {sample}", legendgroup="segments", showlegend=(col == 1),
                    mode="lines", line=dict(color="rgba(80,80,80,0.35)", width=1), hoverinfo="skip", meta=THIN)
        if dims == 3:
            fig.add_trace(go.Scatter3d(x=seg[0], y=seg[1], z=seg[2], **line), row=1, col=col)
        else:
            fig.add_trace(go.Scatter(x=seg[0], y=seg[1], **line), row=1, col=col)
        for who, pts, symbol in (("target", proj_t, "circle"), ("source", proj_s, "x")):
            for c in classes:
                m = y == c
                cname = names[c] if c < len(names) else str(c)
                # one legend entry per class (its colour); circles / crosses tell the models apart
                common = dict(name=cname, legendgroup=f"class-{c}", showlegend=(col == 1 and who == "target"),
                              mode="markers", hovertemplate=f"{who}, class {cname}<extra></extra>")
                marker = dict(color=CLASS_COLORS[c % len(CLASS_COLORS)], symbol=symbol,
                              size=(4 if dims == 3 else 7), opacity=0.75,
                              line=dict(width=0.5, color="white") if symbol == "circle" else None)
                if dims == 3:
                    fig.add_trace(go.Scatter3d(x=pts[m, 0], y=pts[m, 1], z=pts[m, 2], marker=marker, **common),
                                  row=1, col=col)
                else:
                    fig.add_trace(go.Scatter(x=pts[m, 0], y=pts[m, 1], marker=marker, **common), row=1, col=col)
    if dims == 3:
        for s in ("scene", "scene2"):
            fig.layout[s].update(xaxis_title="PC 1", yaxis_title="PC 2", zaxis_title="PC 3")
    else:
        fig.update_xaxes(title_text="PC 1 of target activations")
        fig.update_yaxes(title_text="PC 2 of target activations", row=1, col=1)  # once: it would sit on panel 1
    gap_before, gap_after = (float(np.linalg.norm((x - mu) @ v - proj_t, axis=1).mean()) for x in (xn, xm))
    fig.layout.annotations[0].text += f"<br><sup>mean source-target distance {gap_before:.3g}</sup>"
    fig.layout.annotations[1].text += f"<br><sup>mean source-target distance {gap_after:.3g}</sup>"
    title = f"PCA of activations{f' at {space}' if space else ''}: target (o) vs source (x)"
    finish(fig, title, height=580)
    fig.update_layout(margin=dict(t=110))  # room for the panel titles under the figure title
    return fig


def pca_caption(n: int, text: bool = False) -> str:
    """What one point of :func:`pca_figure` is: an image's class token, or a text prompt's last token (the one
    that predicts the label word; a text's sample is the first calibration texts, which also fit the maps)."""
    if text:
        return (f"Each point is one text's activation at the last token of its prompt (the token that predicts the "
                f"label word), coloured by its label: circles from the target, crosses from the source, a grey line "
                f"joins the two of the same text. {n} texts: the first of the calibration texts, which also fit "
                "the maps (every token of a text is a row there; only the last one is drawn). Both panels use the "
                "target's main directions (PCA); after the map the lines should be short and the crosses sit on "
                "the circles of the same colour.")
    return (f"Each point is one image's class-token activation, coloured by its class: circles from the target, "
            f"crosses from the source, a grey line joins the two of the same image. {n} display images taken "
            "class by class (not the calibration images, which fit the maps). Both panels use the target's main "
            "directions (PCA); after the map the lines should be short and the crosses sit on the circles of the "
            "same colour.")


def _segments(a: np.ndarray, b: np.ndarray) -> list[list]:
    """Per coordinate, a_i, b_i, None for every row i: one line segment per pair, in one trace."""
    out = []
    for k in range(a.shape[1]):
        col: list = []
        for u, w in zip(a[:, k].tolist(), b[:, k].tolist()):
            col += [u, w, None]
        out.append(col)
    return out


#: what the Theseus space names mean (L = block index, counted from 0)
SPACE_LEGEND = {
    "embed": "patch + position embeddings, before ln_pre",
    "res:0": "residual stream entering block 0",
    "ln1:L": "block L: LayerNorm 1 output (attention input)",
    "q:L": "block L: queries", "k:L": "block L: keys", "v:L": "block L: values",
    "ctx:L": "block L: attention context (heads' weighted values, input of the output projection)",
    "o:L": "block L: attention output projection",
    "res:La": "residual stream in block L after the attention branch",
    "ln2:L": "block L: LayerNorm 2 output (MLP input)",
    "fc1:L": "block L: MLP hidden pre-activation (only with hidden = separate)",
    "act:L": "block L: MLP hidden activation (input of fc2)",
    "fc2:L": "block L: MLP output",
    "res:Lm": "residual stream after block L's MLP (block L's output)",
    "ln_post": "final LayerNorm output (class token feature)",
    "proj": "projection into the shared image-text space",
}


#: what differs on a language model (tokens, no class token; ``ln_post`` is read at every token)
TEXT_SPACE_LEGEND = {
    "embed": "token embeddings (one row per real token)",
    "ln1:L": "block L: norm 1 output (attention input)",
    "ln2:L": "block L: norm 2 output (MLP input)",
    "ln_post": "final norm output (every token; the last one predicts the label word)",
    "proj": "projection output",
}


def space_legend(text: bool = False) -> dict[str, str]:
    """:data:`SPACE_LEGEND`, or its wording for a language model (``text``)."""
    return {**SPACE_LEGEND, **TEXT_SPACE_LEGEND} if text else dict(SPACE_LEGEND)


def describe_space(space: str, text: bool = False) -> str:
    """One line saying what a Theseus activation space is, e.g. ``res:2m`` -> residual stream after block 2's MLP
    (``text``: worded for a language model)."""
    legend = space_legend(text)
    if space in legend:
        return legend[space]
    kind, _, where = space.partition(":")
    digits = "".join(ch for ch in where if ch.isdigit())
    if not digits:
        return space
    key = f"{kind}:L{where[len(digits):]}"
    return legend[key].replace("block L", f"block {digits}") if key in legend else space


#: where each kind of Theseus space sits inside a block, in forward order (``res`` with suffix a / m)
_IN_BLOCK = {"ln1": 0, "q": 1, "k": 2, "v": 3, "ctx": 4, "o": 5, "res:a": 6, "ln2": 7, "fc1": 8, "act": 9,
             "fc2": 10, "res:m": 11}
_OUTSIDE = {"embed": (-2, 0), "res:0": (-1, 0), "ln_post": (10 ** 6, 0), "proj": (10 ** 6, 1)}


def _space_order(space: str) -> tuple:
    """Theseus spaces in forward order: embeddings, block 0 input, each block's spaces, final LayerNorm, projection."""
    if space in _OUTSIDE:
        return (*_OUTSIDE[space], space)
    kind, _, where = space.partition(":")
    digits = "".join(ch for ch in where if ch.isdigit())
    if not digits:
        return (10 ** 6 - 1, 0, space)  # unknown names: after the blocks, alphabetically
    suffix = where[len(digits):]
    return (int(digits), _IN_BLOCK.get(f"{kind}:{suffix}" if suffix else kind, len(_IN_BLOCK)), space)


def procrustes_residual(diag: Mapping) -> go.Figure:
    """Per activation space, ||X_A T - X_B|| / ||X_B|| before (zero-pad/truncate) and after the Procrustes map
    (spaces described for a language model when the maps were fitted on texts)."""
    maps = list(diag.get("maps") or [])
    text = (diag.get("calibration") or {}).get("kind") == "texts"
    if not maps:
        return empty_figure("this alignment has no maps", "Procrustes residual")
    maps = sorted(maps, key=lambda m: _space_order(str(m["space"])))
    x = [str(m["space"]) for m in maps]
    fig = go.Figure()
    for key, name, color in (("residual_before", "before (identity / zero-pad)", "#7f7f7f"),
                             ("residual_after", "after Procrustes map T", "#2ca02c")):
        ys = [m.get(key) for m in maps]
        if all(v is None for v in ys):
            continue
        fig.add_trace(go.Scatter(x=x, y=[np.nan if v is None else float(v) for v in ys], mode="lines+markers",
                                 name=name, line=dict(color=color), customdata=[describe_space(sp, text) for sp in x],
                                 hovertemplate="%{x}: %{y:.3f}<br>%{customdata}<extra>" + name + "</extra>"))
    fig.update_xaxes(type="category", tickangle=-45)
    fig.update_yaxes(rangemode="tozero")
    return finish(fig, "Procrustes residual per activation space", "activation space (in layer order)",
                  "||X_A T - X_B|| / ||X_B||", height=380)


def singular_values(diag: Mapping, space: str) -> go.Figure:
    """Singular values of the cross-covariance X_A^T X_B of one space (a flat spectrum = well-conditioned map)."""
    m = next((m for m in diag.get("maps") or [] if str(m["space"]) == space), None)
    sv = [] if m is None else list(m.get("singular_values") or [])
    if not sv:
        return empty_figure(f"no singular values for {space}", "Cross-covariance spectrum")
    fig = go.Figure(go.Scatter(x=list(range(1, len(sv) + 1)), y=sv, mode="lines", line=dict(color="#2ca02c"),
                               name=space, hovertemplate="#%{x}: %{y:.4g}<extra></extra>"))
    log_axis(fig)
    return finish(fig, f"Cross-covariance singular values at {space}", "index", "singular value", height=320)


def update_norms(diag: Mapping) -> go.Figure:
    """||dW_A|| (source update) vs ||dW_B|| (mapped update) per tensor; on the diagonal = norm preserved."""
    ups = list(diag.get("updates") or [])
    if not ups:
        return empty_figure("no updates recorded", "Update norms")
    a = [float(u.get("norm_source") or 0) for u in ups]
    b = [float(u.get("norm_target") or 0) for u in ups]
    names = [str(u.get("name")) for u in ups]
    hi = max(a + b + [1e-12])
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[0, hi], y=[0, hi], mode="lines", line=dict(color="#aaaaaa", dash="dot"),
                             name="norm preserved", hoverinfo="skip"))
    fig.add_trace(go.Scatter(x=a, y=b, mode="markers", text=names, name="tensors", marker=dict(color="#2ca02c"),
                             hovertemplate="%{text}<br>source %{x:.3g} -> target %{y:.3g}<extra></extra>"))
    return finish(fig, "Update norms before and after the map", "||dW_A|| (source)", "||dW_B|| (mapped)",
                  height=380)
