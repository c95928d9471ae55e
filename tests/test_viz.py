"""viz: figures built from known inputs have the right traces, values, shapes and axis titles."""
from __future__ import annotations

import json
import math

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from transport.core.layout import param_axes
from transport.families.open_clip import tiny_arch
from transport.core.evaluate import AlphaSweep
from transport.core.task_vector import TaskVector
from transport.sources import load_task_vector, task_vector_bytes
from viz import export, gradfix, results, theseus, transfusion
from viz.common import block_mean


def _axis_titles(fig: go.Figure) -> list[str]:
    """Every axis title, in sorted axis order (xaxis, xaxis2, ..., yaxis, yaxis2, ...)."""
    out = []
    for k in sorted(k for k in fig.layout if k.startswith(("xaxis", "yaxis"))):
        if fig.layout[k].title.text:
            out.append(fig.layout[k].title.text)
    return out


def _xy(fig: go.Figure) -> tuple[str, str]:
    return fig.layout.xaxis.title.text, fig.layout.yaxis.title.text


# ----------------------------------------------------------------------------------------------
# TransFusion
# ----------------------------------------------------------------------------------------------
def _tf_layer(perm, cost=None, margin=None, layer=0):
    H = len(perm)
    return {"layer": layer, "head_perm": list(perm),
            "head_cost": cost if cost is not None else [[float(abs(i - j)) for j in range(H)] for i in range(H)],
            "head_margin": margin if margin is not None else [1.0] * H,
            "within_head_perms": [list(range(4)) for _ in range(H)], "mlp_fixed_points": 10, "mlp_size": 16,
            "res_attn_fixed_points": 8, "res_mlp_fixed_points": 4, "head_fixed_points": sum(
                1 for i, j in enumerate(perm) if i == j)}


def test_identity_head_permutation_draws_a_diagonal():
    fig = transfusion.head_permutation(_tf_layer([0, 1, 2, 3, 4]))
    marks = next(t for t in fig.data if t.type == "scatter")
    assert list(marks.x) == list(marks.y) == [0, 1, 2, 3, 4]
    heat = next(t for t in fig.data if t.type == "heatmap")
    assert np.asarray(heat.z).shape == (5, 5)
    assert np.allclose(np.diag(np.asarray(heat.z)), 0.0)
    bars = next(t for t in fig.data if t.type == "bar")
    # margin 1, chosen cost 0 (the diagonal): exact and unique -> confidence 1
    assert list(bars.x) == [1.0] * 5 and bars.orientation == "h"
    assert {"target head i", "source head j", "confidence (0 = toss-up, 1 = certain)"} <= set(_axis_titles(fig))
    assert tuple(fig.layout.xaxis2.range) == (0, 1)  # a fixed scale on every pair


def test_head_permutation_marks_follow_the_assignment():
    perm = [2, 0, 3, 1]
    fig = transfusion.head_permutation(_tf_layer(perm, margin=[0.5, 0.0, 2.0, 1.0]))
    marks = next(t for t in fig.data if t.type == "scatter")
    # target head i (y) takes source head perm[i] (x)
    assert list(zip(marks.y, marks.x)) == [(0, 2), (1, 0), (2, 3), (3, 1)]
    bars = next(t for t in fig.data if t.type == "bar")
    # confidence = margin / (margin + chosen cost); chosen costs |i - perm[i]| = 2, 1, 1, 2
    assert list(bars.x) == pytest.approx([0.5 / 2.5, 0.0, 2.0 / 3.0, 1.0 / 3.0])


def test_head_confidence_is_scale_free():
    """The same assignment on costs ten times larger gets the same confidence (pairs compare on one scale)."""
    cost = np.array([[1.0, 3.0], [3.0, 1.0]])
    a = transfusion.head_confidence(cost, [0, 1], [4.0, 4.0])
    b = transfusion.head_confidence(10 * cost, [0, 1], [40.0, 40.0])
    assert a == pytest.approx(b) and a == pytest.approx([0.8, 0.8])
    assert math.isnan(transfusion.head_confidence(cost[:1, :1], [0], [float("inf")])[0])


def test_query_head_permutation_inside_matched_groups():
    from transport.core.symmetry import HeadPermutation

    # 3 key/value groups of 2 query heads: target group g takes source group kv[g], its query slot a the
    # source slot q[g][a] of that group
    kv, q = [2, 0, 1], [[1, 0], [0, 1], [1, 0]]
    layer = {"layer": 1, "head_perm": kv, "query_perm": q}
    want = HeadPermutation(torch.tensor(kv), torch.tensor(q), torch.zeros(3, 4, dtype=torch.long),
                           torch.zeros(3, 4, dtype=torch.long)).query_heads().reshape(-1).tolist()
    assert transfusion.query_heads(layer) == want == [5, 4, 0, 1, 3, 2]
    fig = transfusion.query_head_permutation(layer)
    z = np.asarray(next(t for t in fig.data if t.type == "heatmap").z)
    expected = np.zeros((6, 6), dtype=int)
    expected[np.arange(6), want] = 1  # row: target query head, column: the source query head moved onto it
    assert np.array_equal(z, expected) and not np.array_equal(z, expected.T)
    # one outline per matched pair of groups, around target rows 2g..2g+1 and source columns 2kv[g]..
    boxes = [(s.x0 + 0.5, s.y0 + 0.5) for s in fig.layout.shapes]
    assert boxes == [(2 * kv[g], 2 * g) for g in range(3)]
    assert _xy(fig) == ("source query head", "target query head")
    assert fig.layout.title.text.startswith("Layer 1: query heads") and "(0/6 stay)" in fig.layout.title.text


def test_within_head_permutation_matrix():
    p = transfusion.permutation_matrix([1, 2, 0])
    assert p.tolist() == [[0, 1, 0], [0, 0, 1], [1, 0, 0]]
    fig = transfusion.within_head_permutation([0, 1, 2, 3], 2, 5)
    heat = next(t for t in fig.data if t.type == "heatmap")
    assert np.array_equal(np.asarray(heat.z), np.eye(4, dtype=np.int8))
    assert "4/4 dims stay" in fig.layout.title.text
    assert set(_axis_titles(fig)) == {"source dim (head 5)", "target dim (head 2)"}


def test_permutation_distance_values():
    diag = {"layers": [_tf_layer([0, 1, 2, 3], layer=0), _tf_layer([1, 0, 2, 3], layer=1)],
            "residual": {"res:0": {"fixed_points": 8, "size": 8}, "res:0a": {"fixed_points": 2, "size": 8},
                         "res:0m": {"fixed_points": 8, "size": 8}, "res:1a": {"fixed_points": 0, "size": 8},
                         "res:1m": {"fixed_points": 4, "size": 8}}}
    fig = transfusion.permutation_distance(diag)
    by = {t.name: list(t.y) for t in fig.data}
    assert by["heads"] == [0.0, 0.5]
    assert by["MLP neurons"] == [1 - 10 / 16] * 2
    assert by["residual after attention"] == [0.75, 1.0]
    assert by["residual after MLP"] == [0.0, 0.5]
    assert _xy(fig) == ("layer", "fraction of indices moved")


def test_objective_per_sweep_and_empty():
    fig = transfusion.objective_per_sweep({"objective_per_sweep": [1.0, 3.0, 3.5]})
    assert list(fig.data[0].x) == [1, 2, 3] and list(fig.data[0].y) == [1.0, 3.0, 3.5]
    assert _xy(fig)[0] == "sweep" and fig.layout.title.text == "Weight-matching objective per sweep"
    # the title says which visiting order ran, and for 'auto' the confidence that chose it
    auto = transfusion.objective_per_sweep({"objective_per_sweep": [1.0], "order": "chain", "order_option": "auto",
                                            "match_confidence": {"value": 13.87, "threshold": 7.29}})
    assert auto.layout.title.text == ("Weight-matching objective per sweep<br><sup>chain order (auto: match "
                                      "confidence 13.9 > 7.3)</sup>")
    fixed = transfusion.objective_per_sweep({"objective_per_sweep": [1.0], "order": "random",
                                             "order_option": "random"})
    assert fixed.layout.title.text == "Weight-matching objective per sweep<br><sup>random order</sup>"
    empty = transfusion.objective_per_sweep({"objective_per_sweep": []})
    assert len(empty.data) == 0 and "no sweeps" in empty.layout.annotations[0].text
    # activation matching solves once: no one-dot "per sweep" curve, a statement instead
    act = transfusion.objective_per_sweep({"matching": "activation", "objective_per_sweep": [12.5]})
    assert len(act.data) == 0 and "per sweep" not in act.layout.title.text
    assert act.layout.title.text == "Activation matching: one solve, no sweeps"
    assert "12.5" in act.layout.annotations[0].text


def test_recovery_figure_values():
    rec = {"layers": [0, 1], "groups": {"res_attn": [1.0, 0.5], "res_mlp": [1.0, 1.0], "heads": [1.0, 0.25],
                                        "head_dims": [1.0, 0.5], "mlp": [0.75, 1.0]}, "res_0": 1.0, "overall": 0.8}
    fig = transfusion.recovery_figure(rec)
    by = {t.name: list(t.y) for t in fig.data}
    assert by["heads"] == [100.0, 25.0] and by["MLP units"] == [75.0, 100.0]
    assert tuple(fig.layout.yaxis.range) == (0, 100)
    assert fig.layout.title.text.startswith("Recovered vs hidden shuffle: 80.0 % of all units matched")


# ----------------------------------------------------------------------------------------------
# GradFix
# ----------------------------------------------------------------------------------------------
def _gf_diag():
    return {"blocks": [
        {"layer": 0, "block": "Q", "numel": 100, "agreement": 0.8, "keep_rate": 0.7, "ties": 10, "first_order": -1.0},
        {"layer": 0, "block": "Q", "numel": 300, "agreement": 0.4, "keep_rate": 0.3, "ties": 30, "first_order": -2.0},
        {"layer": 1, "block": "fc1", "numel": 50, "agreement": 0.5, "keep_rate": 0.5, "ties": 0, "first_order": 0.5},
        {"layer": -1, "block": "embed", "numel": 10, "agreement": 1.0, "keep_rate": 0.9, "ties": 1,
         "first_order": -0.1},
    ], "margin_hist": {"edges": [0.0, 0.25, 0.75, 1.0], "counts": [5, 10, 1]}}


def test_agreement_heatmap_values():
    rows, cols, val, num = gradfix.block_table(_gf_diag(), "agreement")
    assert rows == ["0", "1", "global"] and cols == ["Q", "fc1", "embed"]
    # weight and bias of one block: averaged by their entry counts
    assert val[0, 0] == pytest.approx((0.8 * 100 + 0.4 * 300) / 400)
    assert val[1, 1] == 0.5 and val[2, 2] == 1.0 and num[0, 0] == 400
    assert math.isnan(val[0, 1]) and math.isnan(val[1, 0])
    fig = gradfix.agreement_heatmap(_gf_diag())
    assert np.allclose(np.asarray(fig.data[0].z, dtype=float)[0, 0], 0.5)
    assert list(fig.data[0].y) == rows and list(fig.data[0].x) == cols
    # a clickable marker on each filled cell, none on the empty ones
    cells = fig.data[1]
    assert list(zip(cells.x, cells.y)) == [("Q", "0"), ("fc1", "1"), ("embed", "global")]
    assert _xy(fig) == ("block", "layer")
    _, _, ties, _ = gradfix.block_table(_gf_diag(), "ties")
    assert ties[0, 0] == pytest.approx(40 / 400)  # counts -> rate


def test_oracle_heatmap_is_the_agreement_table_of_the_oracle_diagnostics():
    diag = {**_gf_diag(), "agreement_total": 0.6234}
    fig = gradfix.oracle_heatmap(diag)
    _, _, val, _ = gradfix.block_table(diag, "agreement")
    assert np.allclose(np.asarray(fig.data[0].z, dtype=float), val, equal_nan=True)
    assert fig.layout.title.text == "Vote vs the oracle sign sign(tau_B): 0.62 overall"
    assert fig.data[0].text[0][0] == "0.50<br>tie 10%"  # the same cells as the agreement map
    assert not fig.layout.title.text.startswith("Sign agreement")  # the page's own map keeps its title
    assert gradfix.oracle_heatmap({"blocks": []}).layout.title.text.startswith("Vote vs the oracle sign")


def test_entry_map_image_small_exact_and_large_downsampled():
    m = torch.tensor([[1, -1, 0], [1, 1, -1]], dtype=torch.int8)
    fig = gradfix.entry_map_image(m, "blocks.0.attn.q.weight")
    assert np.array_equal(np.asarray(fig.data[0].z), m.numpy().astype(float))
    # the heatmap's definition: 3 agree of 5 voted entries (ties excluded), 1 tie of 6 entries
    assert "agreement 0.60 (3 of 5 voted entries), tie 17% (1 of 6)" in fig.layout.title.text
    big = torch.ones(1000, 300, dtype=torch.int8)
    big[:500] = -1
    fig = gradfix.entry_map_image(big, "blocks.0.mlp.fc1.weight", max_side=100)
    z = np.asarray(fig.data[0].z, dtype=float)
    assert z.shape == (100, 100)  # at most max_side per side reaches the browser
    assert np.allclose(z[:50], -1) and np.allclose(z[50:], 1)
    assert "mean of 10x3 entries" in fig.layout.title.text


def test_entry_map_of_a_vector_is_a_strip():
    """A bias or LayerNorm vector is one row over its entries, not an image with a meaningless y-axis."""
    v = torch.tensor([1, -1, 0, 1], dtype=torch.int8)
    fig = gradfix.entry_map_image(v, "blocks.0.ln1.weight")
    z = np.asarray(fig.data[0].z, dtype=float)
    assert z.shape == (1, 4) and z.tolist() == [[1, -1, 0, 1]]
    assert fig.layout.yaxis.visible is False and fig.layout.xaxis.title.text == "entry index"
    assert fig.layout.height <= 260
    long = gradfix.entry_map_image(torch.ones(3000, dtype=torch.int8), "blocks.0.mlp.fc1.bias", max_strip=500)
    assert np.asarray(long.data[0].z).shape == (1, 500) and "mean of 6 entries" in long.layout.title.text


def test_heatmap_cells_show_ties_with_the_drill_down_definition():
    fig = gradfix.agreement_heatmap(_gf_diag())
    # layer 0, Q: agreement (0.8 * 100 + 0.4 * 300) / 400 = 0.5 of voted entries, ties 40 / 400 = 10 %
    assert fig.data[0].text[0][0] == "0.50<br>tie 10%"
    assert fig.data[0].text[2][2] == "1.00<br>tie 10%"  # a count of one tie is a count, not a rate of 100 %
    assert "ties shown" in fig.layout.title.text


def test_block_mean_keeps_edge_weights():
    a = np.arange(10, dtype=float).reshape(1, 10)
    img, kr, kc = block_mean(a, 4)
    assert (kr, kc) == (1, 3)
    assert img.tolist() == [[1.0, 4.0, 7.0, 9.0]]  # the last tile holds one entry


def test_margin_histogram_and_keep_rate():
    fig = gradfix.margin_histogram(_gf_diag())
    assert list(fig.data[0].y) == [5, 10, 1]
    assert list(fig.data[0].x) == [0.125, 0.5, 0.875]
    assert fig.layout.yaxis.type is None  # counts within two orders of magnitude: a linear axis
    wide = gradfix.margin_histogram({"margin_hist": {"edges": [0.0, 0.5, 1.0], "counts": [3, 50_000]}})
    assert wide.layout.yaxis.type == "log" and wide.layout.yaxis.dtick == 1  # one tick per decade, no clutter
    labels, keep, fo = gradfix.per_layer(_gf_diag())
    assert labels == ["0", "1", "global"]
    assert keep[0] == pytest.approx((0.7 * 100 + 0.3 * 300) / 400)
    assert fo == [-3.0, 0.5, -0.1]
    fig = gradfix.keep_rate_per_layer(_gf_diag())
    assert len(fig.data) == 2 and list(fig.data[1].y) == fo
    assert "fraction of entries kept" in _axis_titles(fig)


# ----------------------------------------------------------------------------------------------
# Theseus
# ----------------------------------------------------------------------------------------------
def test_pca_trace_counts_and_alignment():
    rng = np.random.default_rng(0)
    n, d = 60, 6
    labels = np.repeat(np.arange(3), n // 3)
    target = rng.normal(size=(n, d)) + 3 * labels[:, None]
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    source = target @ q.T  # a rotated copy: the perfect map is q
    fig = theseus.pca_figure(target, source, source @ q, labels, ["a", "b", "c"], dims=2, space="res:0")
    assert len(fig.data) == 2 * (1 + 2 * 3)  # panels x (segments + models x classes)
    after_t = [t for t in fig.data if t.xaxis == "x2" and t.marker.symbol == "circle"]
    after_s = [t for t in fig.data if t.xaxis == "x2" and t.marker.symbol == "x"]
    assert len(after_t) == len(after_s) == 3
    for t, s in zip(after_t, after_s):  # after the map, the crosses sit on the circles
        assert np.allclose(t.x, s.x) and np.allclose(t.y, s.y)
    assert [t.name for t in fig.data if t.showlegend] == ["source -> target, same image", "a", "b", "c"]
    # one segment per image from its source point to its target point: zero length after a perfect map
    seg_before, seg_after = [t for t in fig.data if t.mode == "lines"]
    assert len(seg_after.x) == 3 * n and seg_after.x[2] is None
    xs = np.asarray([v for v in seg_after.x if v is not None], dtype=float).reshape(n, 2)
    assert np.allclose(xs[:, 0], xs[:, 1])
    xb = np.asarray([v for v in seg_before.x if v is not None], dtype=float).reshape(n, 2)
    assert not np.allclose(xb[:, 0], xb[:, 1])
    assert "PC 1 of target activations" in _axis_titles(fig)
    fig3 = theseus.pca_figure(target, source[:, :4], source @ q, labels, dims=3)
    assert len(fig3.data) == 14 and all(t.type == "scatter3d" for t in fig3.data)
    assert fig3.layout.scene.xaxis.title.text == "PC 1"


def test_space_names_are_explained():
    assert theseus.describe_space("res:2m") == "residual stream after block 2's MLP (block 2's output)"
    assert theseus.describe_space("ctx:1").startswith("block 1: attention context")
    assert theseus.describe_space("res:0") == "residual stream entering block 0"
    assert theseus.describe_space("res:3a") == "residual stream in block 3 after the attention branch"
    fig = theseus.procrustes_residual({"maps": [{"space": "ctx:1", "residual_before": 1.0, "residual_after": 0.5}]})
    assert list(fig.data[0].customdata) == [theseus.describe_space("ctx:1")]
    # a language model: token embeddings, no class token, a text prompt's last token per point
    maps = [{"space": "embed", "residual_before": 1.0, "residual_after": 0.5},
            {"space": "ln_post", "residual_before": 1.0, "residual_after": 0.5}]
    fig = theseus.procrustes_residual({"maps": maps, "calibration": {"kind": "texts"}})
    said = " ".join(fig.data[0].customdata) + " " + " ".join(theseus.space_legend(text=True).values())
    assert "token embeddings" in said and "class token" not in said and "patch" not in said
    assert "class token" in " ".join(theseus.procrustes_residual({"maps": maps}).data[0].customdata)
    cap = theseus.pca_caption(12, text=True)
    assert "one text's activation at the last token of its prompt" in cap and "image" not in cap
    assert "class-token" in theseus.pca_caption(12) and "12 display images" in theseus.pca_caption(12)
    pca = theseus.pca_figure(np.eye(4), np.eye(4), np.eye(4), None, dims=2, sample="text")
    assert {t.name for t in pca.data} >= {"source -> target, same text", "all texts"}


def test_fit_to_width_pads_and_truncates():
    x = np.ones((2, 3))
    assert theseus.fit_to_width(x, 5).tolist() == [[1, 1, 1, 0, 0]] * 2
    assert theseus.fit_to_width(x, 2).shape == (2, 2)


def test_procrustes_residual_orders_spaces():
    order = ["embed", "res:0", "ln1:0", "q:0", "k:0", "v:0", "ctx:0", "o:0", "res:0a", "ln2:0", "act:0", "fc2:0",
             "res:0m", "ln1:1", "res:1a", "act:1", "res:1m", "ln1:10", "ln_post", "proj"]
    shuffled = order[::3] + order[1::3] + order[2::3]
    diag = {"maps": [{"space": s, "residual_before": 1.0, "residual_after": order.index(s) / 100} for s in shuffled]}
    fig = theseus.procrustes_residual(diag)
    assert list(fig.data[0].x) == order  # forward order, block 10 after block 1
    assert list(fig.data[1].y) == [i / 100 for i in range(len(order))]
    assert _xy(fig) == ("activation space (in layer order)", "||X_A T - X_B|| / ||X_B||")


# ----------------------------------------------------------------------------------------------
# results and export
# ----------------------------------------------------------------------------------------------
def test_alpha_curves_mark_the_chosen_alpha():
    s1 = AlphaSweep([0.0, 0.5, 1.0], [0.1, 0.6, 0.4], 0.5, 0.6)
    s2 = {"alphas": [0.0, 0.5, 1.0], "val": [0.1, 0.2, 0.3], "best_alpha": 1.0, "best_val": 0.3}
    fig = results.alpha_curves({"transfusion": s1, "naive": s2}, chosen={"transfusion": 1.0}, picked=0.5)
    stars = [t for t in fig.data if t.marker.symbol == "star"]
    assert [(s.x[0], s.y[0]) for s in stars] == [(1.0, 40.0), (1.0, 30.0)]  # percent, like every table
    assert len(fig.data) == 4
    assert _xy(fig) == ("alpha (scale of the transported task vector)", "validation accuracy (%)")
    assert any(sh.x0 == 0.5 for sh in fig.layout.shapes)
    # a fixed 0-100 % axis: a 0.08-0.135 wiggle must not fill the chart
    flat = results.alpha_curves({"naive": {"alphas": [0.0, 1.0], "val": [0.08, 0.135], "best_alpha": 1.0,
                                           "best_val": 0.135}})
    assert tuple(flat.layout.yaxis.range) == (0.0, 100.0)


def test_accuracy_rows_order_and_bars():
    acc = {"oracle": 0.9, "transfusion": 0.7, "zero_shot_target": 0.2, "naive": float("nan"), "source_finetuned": 0.95}
    rows = results.accuracy_rows(acc)
    assert [r["key"] for r in rows] == ["zero_shot_target", "transfusion", "source_finetuned", "oracle"]
    fig = results.accuracy_bars(acc)
    assert list(fig.data[0].y) == [20.0, 70.0, 95.0, 90.0]
    assert tuple(fig.layout.yaxis.range) == (0.0, 100.0)


def _tv(arch, fill):
    return TaskVector(arch, {k: torch.full(v.shape, float(fill(k))) for k, v in param_axes(arch).items()})


def test_layer_cosines_known_values():
    arch = tiny_arch(width=16, layers=2, heads=2, output_dim=8)
    info = param_axes(arch)
    a = _tv(arch, lambda k: 1.0)
    b = _tv(arch, lambda k: 1.0 if info[k].layer == 0 else -1.0 if info[k].layer == 1 else 2.0)
    cos = results.layer_cosines({"x": a, "y": b})["x vs y"]
    assert cos[0] == pytest.approx(1.0) and cos[1] == pytest.approx(-1.0) and cos[-1] == pytest.approx(1.0)
    fig = results.layer_cosine_figure({"x vs y": cos})
    assert list(fig.data[0].x) == ["0", "1", "global"]
    assert list(fig.data[0].y) == pytest.approx([1.0, -1.0, 1.0])


def test_layer_ablation_figure():
    fig = results.layer_ablation_figure([0, 1, -1], [0.5, 0.2, 0.1], [0.3, 0.6, 0.7], 0.7, 0.1)
    assert list(fig.data[0].x) == ["0", "1", "global"]
    assert list(fig.data[0].y) == pytest.approx([50, 20, 10]) and list(fig.data[1].y) == pytest.approx([30, 60, 70])
    assert list(fig.data[2].y) == pytest.approx([70] * 3) and list(fig.data[3].y) == pytest.approx([10] * 3)
    assert tuple(fig.layout.yaxis.range) == (0.0, 100.0)
    assert fig.data[3].name == "no layer (target zero-shot, validation)"  # the split is in the label


def test_exports_round_trip(tmp_path):
    arch = tiny_arch(width=16, layers=2, heads=2, output_dim=8)
    tau = _tv(arch, lambda k: 0.5)
    data = task_vector_bytes(tau, alpha="0.5")
    f = tmp_path / "tau.safetensors"
    f.write_bytes(data)
    back = load_task_vector(f)
    assert back.allclose(tau) and back.meta["alpha"] == "0.5"
    rep = json.loads(export.report_json({"accuracies": {"x": float("nan"), "y": 0.5}, "alpha": np.float32(1.5)}))
    assert rep == {"accuracies": {"x": None, "y": 0.5}, "alpha": 1.5}
    csv = export.accuracies_csv({"zero_shot_target": 0.25, "gradfix": 0.5}, 1.2, "gradfix").decode().splitlines()
    assert csv[0] == "model,key,test_accuracy_percent,method,alpha"
    assert csv[1] == "target zero-shot,zero_shot_target,25.00,gradfix,0"  # zero-shot adds no task vector
    assert csv[2] == "GradFix,gradfix,50.00,gradfix,1.2"
    # the comparison table: every method at its own alpha, every cell filled
    acc = {"zero_shot_target": 0.25, "naive": 0.3, "transfusion": 0.8, "gradfix": 0.35, "oracle": 0.9}
    rows = [r.split(",") for r in export.accuracies_csv(acc, alphas={"naive": 0.5, "transfusion": 1.0,
                                                                     "gradfix": 1.5}).decode().splitlines()[1:]]
    assert [(r[1], r[3], r[4]) for r in rows] == [("zero_shot_target", "shared", "0"), ("naive", "naive", "0.5"),
                                                  ("transfusion", "transfusion", "1"), ("gradfix", "gradfix", "1.5"),
                                                  ("oracle", "shared", "n/a (own weights)")]
    assert all(all(c != "" for c in r) for r in rows)
    html = export.figure_html(results.accuracy_bars({"naive": 0.5})).decode()
    assert "<html>" in html[:100] and "plotly" in html and len(html) > 1_000_000  # plotly.js embedded: offline


# ----------------------------------------------------------------------------------------------
# presentation mode, examples
# ----------------------------------------------------------------------------------------------
def test_presentation_theme_enlarges_and_thickens():
    from viz.common import PRESENT_LINE, PRESENT_TICK, presentation

    s1 = AlphaSweep([0.0, 0.5, 1.0], [0.1, 0.6, 0.4], 0.5, 0.6)
    fig = results.alpha_curves({"transfusion": s1})
    big = presentation(fig)
    assert big is not fig and fig.layout.font.size is None  # the original is left alone
    assert big.layout.font.size >= 18 and big.layout.xaxis.tickfont.size == PRESENT_TICK
    assert big.layout.yaxis.tickfont.color == "#000000" and big.layout.yaxis.linewidth == 2
    lines = [t for t in big.data if "lines" in (t.mode or "")]
    assert lines and all(t.line.width >= PRESENT_LINE for t in lines)
    assert tuple(big.layout.yaxis.range) == (0.0, 100.0)  # the fixed axis survives the theme
    # every kind of figure of the explorer takes the theme (images, heatmaps, 3-D scenes, subplots)
    from viz import examples

    y = np.array([0, 1])
    grid = examples.flip_grid(np.zeros((2, 1, 8, 8)), y, {"m": y}, [0, 1])
    rng = np.random.default_rng(0)
    pca = theseus.pca_figure(rng.normal(size=(6, 3)), rng.normal(size=(6, 3)), rng.normal(size=(6, 3)),
                             [0, 1, 2, 0, 1, 2], dims=3)
    for f in (grid, pca, gradfix.agreement_heatmap(_gf_diag()), transfusion.head_permutation(_tf_layer([1, 0]))):
        assert presentation(f).layout.font.size == 20
    thin = [t for t in presentation(pca).data if t.mode == "lines"]
    assert thin and all(t.line.width == 1 for t in thin)  # hundreds of segments stay thin


def test_flip_indices_and_grid():
    from viz import examples

    y = np.array([0, 1, 2, 0, 1])
    preds = {"target": np.array([1, 1, 0, 0, 0]), "naive": np.array([1, 1, 0, 0, 1]),
             "transfusion": np.array([0, 0, 2, 0, 1])}
    assert examples.flip_indices(y, preds, "transfusion", "fixed") == [0, 2]  # naive wrong, method right
    assert examples.flip_indices(y, preds, "transfusion", "broken") == [1]  # naive right, method wrong
    assert examples.flip_indices(y, preds, "transfusion", "changed") == [0, 1, 2, 4]
    images = np.random.default_rng(0).random((5, 1, 8, 8))
    fig = examples.flip_grid(images, y, preds, [0, 2], ["zero", "one", "two"])
    assert sum(t.type == "image" for t in fig.data) == 2
    notes = [a.text for a in fig.layout.annotations]
    assert notes[0].startswith("<b>#0: zero</b>")
    assert f"<span style='color:{examples.WRONG}'>target: one</span>" in notes[0]
    assert f"<span style='color:{examples.RIGHT}'>transfusion: zero</span>" in notes[0]
    assert notes[1].startswith("<b>#2: two</b>") and f"color:{examples.WRONG}'>naive: zero" in notes[1]


def test_per_class_accuracy_and_confusion():
    from viz import examples

    y = np.array([0, 0, 1, 1])
    pred = np.array([0, 1, 1, 1])
    fig = examples.per_class_accuracy(y, {"m": pred}, ["a", "b"])
    assert list(fig.data[0].y) == [50.0, 100.0] and tuple(fig.layout.yaxis.range) == (0.0, 100.0)
    assert examples.confusion_matrix(y, pred, 2).tolist() == [[1, 1], [0, 2]]
    conf = examples.confusion_figure(y, pred, ["a", "b"], "m")
    assert np.allclose(np.asarray(conf.data[0].z, dtype=float), [[0.5, 0.5], [0.0, 1.0]])
    assert "75.0 % right" in conf.layout.title.text
