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
    assert list(bars.x) == [1.0] * 5 and bars.orientation == "h"
    assert {"target head i", "source head j", "cost margin to 2nd best"} <= set(_axis_titles(fig))


def test_head_permutation_marks_follow_the_assignment():
    perm = [2, 0, 3, 1]
    fig = transfusion.head_permutation(_tf_layer(perm, margin=[0.5, 0.0, 2.0, 1.0]))
    marks = next(t for t in fig.data if t.type == "scatter")
    # target head i (y) takes source head perm[i] (x)
    assert list(zip(marks.y, marks.x)) == [(0, 2), (1, 0), (2, 3), (3, 1)]
    bars = next(t for t in fig.data if t.type == "bar")
    assert list(bars.x) == [0.5, 0.0, 2.0, 1.0]


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
    assert _xy(fig)[0] == "sweep"
    empty = transfusion.objective_per_sweep({"objective_per_sweep": []})
    assert len(empty.data) == 0 and "no sweeps" in empty.layout.annotations[0].text


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


def test_entry_map_image_small_exact_and_large_downsampled():
    m = torch.tensor([[1, -1, 0], [1, 1, -1]], dtype=torch.int8)
    fig = gradfix.entry_map_image(m, "blocks.0.attn.q.weight")
    assert np.array_equal(np.asarray(fig.data[0].z), m.numpy().astype(float))
    assert "50.0% agree" in fig.layout.title.text and "33.3% disagree" in fig.layout.title.text
    big = torch.ones(1000, 300, dtype=torch.int8)
    big[:500] = -1
    fig = gradfix.entry_map_image(big, "blocks.0.mlp.fc1.weight", max_side=100)
    z = np.asarray(fig.data[0].z, dtype=float)
    assert z.shape == (100, 100)  # at most max_side per side reaches the browser
    assert np.allclose(z[:50], -1) and np.allclose(z[50:], 1)
    assert "mean of 10x3 entries" in fig.layout.title.text


def test_block_mean_keeps_edge_weights():
    a = np.arange(10, dtype=float).reshape(1, 10)
    img, kr, kc = block_mean(a, 4)
    assert (kr, kc) == (1, 3)
    assert img.tolist() == [[1.0, 4.0, 7.0, 9.0]]  # the last tile holds one entry


def test_margin_histogram_and_keep_rate():
    fig = gradfix.margin_histogram(_gf_diag())
    assert list(fig.data[0].y) == [5, 10, 1]
    assert list(fig.data[0].x) == [0.125, 0.5, 0.875]
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
    assert len(fig.data) == 2 * 2 * 3  # panels x models x classes
    after_t = [t for t in fig.data if t.xaxis == "x2" and t.marker.symbol == "circle"]
    after_s = [t for t in fig.data if t.xaxis == "x2" and t.marker.symbol == "x"]
    assert len(after_t) == len(after_s) == 3
    for t, s in zip(after_t, after_s):  # after the map, the crosses sit on the circles
        assert np.allclose(t.x, s.x) and np.allclose(t.y, s.y)
    assert [t.name for t in fig.data if t.showlegend] == ["a", "b", "c"]  # one legend entry per class
    assert "PC 1 of target activations" in _axis_titles(fig)
    fig3 = theseus.pca_figure(target, source[:, :4], source @ q, labels, dims=3)
    assert len(fig3.data) == 12 and all(t.type == "scatter3d" for t in fig3.data)
    assert fig3.layout.scene.xaxis.title.text == "PC 1"


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
    assert [(s.x[0], s.y[0]) for s in stars] == [(1.0, 0.4), (1.0, 0.3)]
    assert len(fig.data) == 4
    assert _xy(fig) == ("alpha (scale of the transported task vector)", "validation accuracy")
    assert any(sh.x0 == 0.5 for sh in fig.layout.shapes)


def test_accuracy_rows_order_and_bars():
    acc = {"oracle": 0.9, "transfusion": 0.7, "zero_shot_target": 0.2, "naive": float("nan"), "source_finetuned": 0.95}
    rows = results.accuracy_rows(acc)
    assert [r["key"] for r in rows] == ["zero_shot_target", "transfusion", "source_finetuned", "oracle"]
    fig = results.accuracy_bars(acc)
    assert list(fig.data[0].y) == [20.0, 70.0, 95.0, 90.0]


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
    assert csv[1] == "target zero-shot,zero_shot_target,25.0,gradfix,1.2"
    html = export.figure_html(results.accuracy_bars({"naive": 0.5})).decode()
    assert "<html>" in html[:100] and "plotly" in html and len(html) > 1_000_000  # plotly.js embedded: offline
