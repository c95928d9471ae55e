"""Theseus: the closed-form update (spec invariants 4-9) and prepare/apply end to end on tiny towers,
including a planted wide model that is an exact isometric embedding of a small one."""
import dataclasses
import json
import math

import pytest
import torch

from transport.core.layout import param_axes
from transport.families.open_clip import build_open_clip_tower, tiny_arch
from transport.sources import to_canonical
from transport.data import digits_task
from transport.errors import TransportError
from transport.core.forward import encode
from transport.core.stems import preprocess
from transport.methods import TransportInputs, get_method
from transport.methods.theseus import (TheseusAlignment, apply, axis_space, naive_resize, prepare,
                                       transport_tensor)
from transport.core.model import Model
from transport.core.procrustes import CrossCovariance, procrustes_map
from transport.core.task_vector import TaskVector

torch.set_num_threads(1)
F64 = torch.float64


def rand_orth(rows, cols, g):
    M = torch.randn(max(rows, cols), min(rows, cols), generator=g, dtype=F64)
    Q, R = torch.linalg.qr(M)
    Q = Q * torch.sign(torch.diagonal(R))
    return Q.t() if rows <= cols else Q


def fit(xa, xb):
    cc = CrossCovariance(xa.shape[1], xb.shape[1])
    cc.update(xa, xb)
    return procrustes_map(cc.C, "eigh")


# ----------------------------------------------------------------------------------------------
# the closed form on one linear module
# ----------------------------------------------------------------------------------------------
def planted_linear(d_in_a, d_in_b, d_out_a, d_out_b, seed=0, n=400):
    g = torch.Generator().manual_seed(seed)
    X_A = torch.randn(n, d_in_a, generator=g, dtype=F64)
    E_in, E_out = rand_orth(d_in_a, d_in_b, g), rand_orth(d_out_a, d_out_b, g)
    X_B = X_A @ E_in
    Y_A = torch.tanh(torch.randn(n, d_out_a, generator=g, dtype=F64))  # the module's outputs, full column rank
    T_in, T_out = fit(X_A, X_B), fit(Y_A, Y_A @ E_out)
    dW_A = torch.randn(d_out_a, d_in_a, generator=g, dtype=F64)
    db_A = torch.randn(d_out_a, generator=g, dtype=F64)
    return dict(X_A=X_A, X_B=X_B, E_in=E_in, E_out=E_out, T_in=T_in, T_out=T_out, dW_A=dW_A, db_A=db_A,
                dW_B=transport_tensor(dW_A, [T_out, T_in]), db_B=transport_tensor(db_A, [T_out]))


def test_functional_exactness_planted():
    p = planted_linear(12, 20, 16, 28)
    assert torch.allclose(p["T_in"], p["E_in"], atol=1e-10) and torch.allclose(p["T_out"], p["E_out"], atol=1e-10)
    assert p["dW_B"].shape == (28, 20) and p["db_B"].shape == (28,)
    lhs = p["X_B"] @ p["dW_B"].t() + p["db_B"]
    rhs = (p["X_A"] @ p["dW_A"].t() + p["db_A"]) @ p["T_out"]
    assert (lhs - rhs).abs().max() < 1e-10 * rhs.abs().max()
    # the transposed orientation (T_out dW T_in^T style) does not even have the target's shape
    assert (p["T_in"].t() @ p["dW_A"].t() @ p["T_out"]).shape == (20, 28)


def test_equals_least_squares_solution():
    p = planted_linear(10, 18, 14, 22, seed=1)
    ls = torch.linalg.pinv(p["X_B"]) @ p["X_A"] @ p["dW_A"].t() @ p["T_out"]  # min-norm argmin of ||X_B M - target||
    assert (ls - p["dW_B"].t()).abs().max() < 1e-9


def test_widening_preserves_geometry_and_round_trips():
    p = planted_linear(12, 20, 16, 28, seed=2)
    dW_A, dW_B = p["dW_A"], p["dW_B"]
    assert float(dW_B.norm()) == pytest.approx(float(dW_A.norm()), rel=1e-12)
    s_a, s_b = torch.linalg.svdvals(dW_A), torch.linalg.svdvals(dW_B)
    assert torch.allclose(s_b[:len(s_a)], s_a, rtol=1e-10) and s_b[len(s_a):].abs().max() < 1e-10
    assert torch.allclose(p["T_out"] @ dW_B @ p["T_in"].t(), dW_A, atol=1e-12)


def test_shrinking_never_increases_singular_values():
    g = torch.Generator().manual_seed(3)
    X_A, Y_A = torch.randn(300, 20, generator=g, dtype=F64), torch.randn(300, 24, generator=g, dtype=F64)
    T_in = fit(X_A, torch.randn(300, 12, generator=g, dtype=F64))
    T_out = fit(Y_A, torch.randn(300, 9, generator=g, dtype=F64))
    dW_A = torch.randn(24, 20, generator=g, dtype=F64)
    dW_B = transport_tensor(dW_A, [T_out, T_in])
    s_a, s_b = torch.linalg.svdvals(dW_A), torch.linalg.svdvals(dW_B)
    assert dW_B.shape == (9, 12)
    assert torch.all(s_b <= s_a[:len(s_b)] + 1e-12)
    assert float(dW_B.norm()) < float(dW_A.norm())


def test_equivariance_under_rotations_of_target_representations():
    g = torch.Generator().manual_seed(4)
    X_A, X_B = torch.randn(300, 10, generator=g, dtype=F64), torch.randn(300, 14, generator=g, dtype=F64)
    Y_A, Y_B = torch.randn(300, 8, generator=g, dtype=F64), torch.randn(300, 11, generator=g, dtype=F64)
    Q_in, Q_out = rand_orth(14, 14, g), rand_orth(11, 11, g)
    dW_A = torch.randn(8, 10, generator=g, dtype=F64)
    dW_B = transport_tensor(dW_A, [fit(Y_A, Y_B), fit(X_A, X_B)])
    dW_Bq = transport_tensor(dW_A, [fit(Y_A, Y_B @ Q_out), fit(X_A, X_B @ Q_in)])
    assert torch.allclose(dW_Bq, Q_out.t() @ dW_B @ Q_in, atol=1e-10)


def test_projection_orientation():
    """P is used as x @ P: dP_B = T_in^T dP_A T_out, and x_B dP_B == x_A dP_A T_out for x_B = x_A T_in."""
    g = torch.Generator().manual_seed(5)
    T_in, T_out = rand_orth(6, 9, g), rand_orth(4, 7, g)
    dP = torch.randn(6, 4, generator=g, dtype=F64)
    x = torch.randn(5, 6, generator=g, dtype=F64)
    dP_B = transport_tensor(dP, [T_in, T_out])
    assert torch.allclose(dP_B, T_in.t() @ dP @ T_out)
    assert torch.allclose((x @ T_in) @ dP_B, x @ dP @ T_out, atol=1e-12)


def test_axis_spaces_from_the_axis_table():
    info = param_axes(tiny_arch(16, layers=2, heads=2))
    assert [axis_space(info["blocks.1.attn.q.weight"], k) for k in (0, 1)] == ["q:1", "ln1:1"]
    assert [axis_space(info["blocks.1.attn.o.weight"], k) for k in (0, 1)] == ["o:1", "ctx:1"]
    assert [axis_space(info["blocks.1.attn.o.weight"], k, "residual") for k in (0, 1)] == ["res:1a", "ctx:1"]
    assert [axis_space(info["blocks.0.mlp.fc1.weight"], k) for k in (0, 1)] == ["act:0", "ln2:0"]
    assert [axis_space(info["blocks.0.mlp.fc1.weight"], k, hidden="separate") for k in (0, 1)] == ["fc1:0", "ln2:0"]
    assert [axis_space(info["blocks.0.mlp.fc2.weight"], k) for k in (0, 1)] == ["fc2:0", "act:0"]
    assert [axis_space(info["head.proj"], k) for k in (0, 1)] == ["ln_post", "proj"]
    assert axis_space(info["blocks.0.ln2.bias"], 0) == "ln2:0" and axis_space(info["ln_pre.weight"], 0) == "res:0"


# ----------------------------------------------------------------------------------------------
# tiny towers end to end
# ----------------------------------------------------------------------------------------------
def tower(arch, seed, perturb=0.0):
    torch.manual_seed(seed)
    params = to_canonical(build_open_clip_tower(arch).state_dict(), arch)
    if perturb:  # pretrained-like LayerNorms: non-trivial gains and biases
        g = torch.Generator().manual_seed(seed + 1000)
        for k, info in param_axes(arch).items():
            if info.block in ("ln_pre", "ln1", "ln2", "ln_post"):
                params[k] = params[k] + perturb * torch.randn(info.shape, generator=g)
    return Model(arch, params, ref=f"tiny-w{arch.width}-s{seed}")


def noise_task(n=400, size=16, seed=0):
    """Random RGB images: unlike 8x8 grey digits they make every activation space of a tiny tower full rank."""
    from transport.data import Task

    g = torch.Generator().manual_seed(seed)
    x, y = torch.rand(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)
    return Task("noise", [str(i) for i in range(10)], {"train": (x, y), "val": (x[:0], y[:0]), "test": (x, y)})


def random_tau(arch, seed, scale=0.02, embeddings=False):
    g = torch.Generator().manual_seed(seed)
    return TaskVector(arch, {k: (scale * torch.randn(i.shape, generator=g)) if embeddings or i.block != "embed"
                             else torch.zeros(i.shape) for k, i in param_axes(arch).items()})


@pytest.fixture(scope="module")
def task():
    return digits_task("rot90")


@pytest.fixture(scope="module")
def wide_pair(task):
    A, B = tower(tiny_arch(64), 0), tower(tiny_arch(128, heads=8, output_dim=48), 1)
    al = prepare(TransportInputs(A, B, task, seed=0), {}, lambda f, m: None)
    return A, B, al


def test_end_to_end_64_to_128(wide_pair, task):
    A, B, al = wide_pair
    d = al.diagnostics()
    assert set(d) == {"method", "calib_images", "maps", "updates", "zeroed", "unused", "timings", "calibration",
                      "depth", "heads"}
    assert d["method"] == "theseus" and d["calib_images"] == 32
    assert d["calibration"] == {"kind": "images", "samples": 32, "rows": 32 * A.arch.tokens}
    assert d["depth"]["map"] == [0, 1, 2] and d["depth"]["unmatched_target"] == [] == d["depth"]["dropped_source"]
    assert d["heads"] == {"mode": "free", "layers": []}  # the paper's maps for ViTs
    assert set(d["timings"]) == {"forward", "covariance", "svd"}
    json.dumps(d)
    spaces = [m["space"] for m in d["maps"]]
    assert len(spaces) == len(set(spaces)) == len(al.maps)
    for l in range(3):
        for s in ("ln1", "q", "k", "v", "ctx", "o", "ln2", "act", "fc2"):
            assert f"{s}:{l}" in al.maps
    for m in d["maps"]:
        T = al.maps[m["space"]].double()
        assert tuple(T.shape) == (m["d_source"], m["d_target"])
        assert (T @ T.t() - torch.eye(T.shape[0], dtype=F64)).abs().max() < 1e-5  # widening everywhere
        assert m["residual_after"] <= m["residual_before"] + 1e-9  # Procrustes beats zero padding
        sv = m["singular_values"]
        assert 0 < len(sv) <= 256 and all(a >= b for a, b in zip(sv, sv[1:]))
    assert al.maps["act:0"].shape == (256, 512) and al.maps["proj"].shape == (32, 48)
    tau = random_tau(A.arch, 7, embeddings=True)
    out = apply(al, tau, 1.0)
    shapes = {k: i.shape for k, i in param_axes(B.arch).items()}
    assert set(out.tensors) == set(shapes)
    assert all(tuple(v.shape) == shapes[k] for k, v in out.tensors.items())
    d = al.diagnostics()
    assert d["zeroed"] == ["embed.patch.weight", "embed.cls", "embed.pos"] == d["unused"]
    assert all(float(out.tensors[k].abs().max()) == 0 for k in d["zeroed"])
    ups = {u["name"]: u for u in d["updates"]}
    assert len(ups) == len(shapes) - 3
    u = ups["blocks.1.mlp.fc2.weight"]
    assert (u["layer"], u["block"]) == (1, "fc2")
    assert u["norm_target"] == pytest.approx(float(tau["blocks.1.mlp.fc2.weight"].norm()), rel=1e-4)  # widening
    # alpha scales linearly
    assert torch.allclose(apply(al, tau, 2.5)["blocks.0.attn.q.weight"], 2.5 * out["blocks.0.attn.q.weight"], atol=1e-6)


def test_pca_sample(wide_pair, task, monkeypatch):
    """The PCA view keeps its own display images: many more than the 32 calibration images, every class,
    balanced (stratified by class); the maps never see them."""
    import transport.methods.theseus as th

    A, B, al = wide_pair
    assert set(al.pca_sample) == {"res:0", "res:0m", "res:1m", "res:2m"}
    s = al.pca_sample["res:1m"]
    n = min(th.PCA_ROWS, th.PCA_TOKENS // max(A.arch.tokens, B.arch.tokens))
    assert n > 100
    assert s["source"].dtype == torch.float16 and s["source"].shape == (n, 64) and s["target"].shape == (n, 128)
    images, labels = task.stratified(n, 0)
    assert torch.equal(s["labels"], labels)
    counts = torch.bincount(labels, minlength=len(task.classnames))
    assert int(counts.min()) >= 1 and int(counts.max() - counts.min()) <= 1  # every class, balanced
    # the rows are the class tokens of the residual stream after block 1 of the source
    rec = {}
    encode(A.params, A.arch, preprocess(A.arch, images), record=lambda site, x: rec.setdefault(site, x))
    after1 = rec["res:1m"][:, 0]
    assert torch.allclose(s["source"].float(), after1, atol=2e-2, rtol=1e-2)
    assert torch.allclose(al.mapped_sample("res:1m"), s["source"].float() @ al.maps["res:1m"])
    assert al.naive_sample("res:1m").shape == (n, 128)
    # the display images change no map: the maps equal those of a prepare without any display sample
    monkeypatch.setattr(th, "_display_sample", lambda task, n, seed: None)
    bare = prepare(TransportInputs(A, B, task, seed=0), {}, lambda f, m: None)
    assert all(torch.equal(bare.maps[k], al.maps[k]) for k in al.maps)
    # without a display sample the first calibration images stand in for it, coloured by their labels
    assert bare.pca_sample["res:1m"]["source"].shape == (32, 64)
    assert torch.equal(bare.pca_sample["res:1m"]["labels"], task.calibration(32, 0, with_labels=True)[1])


def test_save_load_exact(wide_pair, tmp_path):
    A, B, al = wide_pair
    apply(al, random_tau(A.arch, 1), 1.0)
    al.save(tmp_path / "al")
    back = TheseusAlignment.load(tmp_path / "al")
    assert back.diagnostics() == al.diagnostics()
    assert list(back.maps) == list(al.maps) and all(torch.equal(back.maps[k], al.maps[k]) for k in al.maps)
    for k, s in al.pca_sample.items():
        assert all(torch.equal(back.pca_sample[k][x], s[x]) for x in ("source", "target", "labels"))
    assert back.source_arch == A.arch and back.target_arch == B.arch and back.options == al.options
    tau = random_tau(A.arch, 2)
    assert apply(back, tau, 1.0).allclose(apply(al, tau, 1.0))


def test_determinism_and_seed(wide_pair, task):
    A, B, al = wide_pair
    again = prepare(TransportInputs(A, B, task, seed=0), {}, lambda f, m: None)
    assert all(torch.equal(again.maps[k], al.maps[k]) for k in al.maps)
    other = prepare(TransportInputs(A, B, task, seed=1), {}, lambda f, m: None)
    assert not torch.equal(other.maps["q:1"], al.maps["q:1"])


def test_chunked_forward_changes_nothing(wide_pair, task, monkeypatch):
    """Blocks run over chunks of images; one image per chunk or all at once give the same maps."""
    import transport.methods.theseus as th

    A, B, al = wide_pair
    monkeypatch.setattr(th, "CHUNK_ROWS", 1)
    one = prepare(TransportInputs(A, B, task, seed=0), {}, lambda f, m: None)
    monkeypatch.setattr(th, "CHUNK_ROWS", 10 ** 9)
    whole = prepare(TransportInputs(A, B, task, seed=0), {}, lambda f, m: None)
    assert list(one.maps) == list(whole.maps) == list(al.maps)
    determined = 0
    for a, b in zip(one.diagnostics()["maps"], whole.diagnostics()["maps"]):
        assert a["space"] == b["space"] and a["residual_after"] == pytest.approx(b["residual_after"], rel=1e-5)
        if a["layer"] >= 1 or a["space"] in ("ln_post", "proj"):  # the digits leave block 0 rank deficient:
            assert (one.maps[a["space"]] - whole.maps[a["space"]]).abs().max() < 1e-4, a["space"]  # free there
            determined += 1
    assert determined == 2 * 11 + 2  # blocks 1 and 2 (11 spaces each), ln_post, proj
    for space, smp in al.pca_sample.items():
        a, b = one.pca_sample[space]["source"].float(), smp["source"].float()  # float16, batch-size rounding
        assert a.shape == b.shape and torch.allclose(a, b, atol=2e-3, rtol=2e-3), space


def test_polar_option(wide_pair, task):
    A, B, al = wide_pair
    exact = prepare(TransportInputs(A, B, task, seed=0), {"polar": "svd"}, lambda f, m: None)
    assert exact.options["polar"] == "svd" and al.options["polar"] == "auto"
    for k in al.maps:  # the zoo-sized maps: 'auto' is the float64 SVD too
        assert (exact.maps[k] - al.maps[k]).abs().max() < 1e-6, k
    with pytest.raises(TransportError, match="option polar must be one of auto, svd, svd32, eigh, eigh32, got 'qr'"):
        prepare(TransportInputs(A, B, task), {"polar": "qr"}, lambda f, m: None)


def test_shrinking_end_to_end(task):
    A, B = tower(tiny_arch(96, heads=6), 2), tower(tiny_arch(64), 3)
    al = prepare(TransportInputs(A, B, task, seed=0), {"calib_size": 24}, lambda f, m: None)
    for s, T in al.maps.items():
        T = T.double()
        assert (T.t() @ T - torch.eye(T.shape[1], dtype=F64)).abs().max() < 1e-5, s
    tau = random_tau(A.arch, 3)
    out = apply(al, tau, 1.0)
    for k in ("blocks.0.attn.v.weight", "blocks.2.mlp.fc1.weight", "head.proj"):
        s_a, s_b = torch.linalg.svdvals(tau[k].double()), torch.linalg.svdvals(out[k].double())
        assert torch.all(s_b <= s_a[:len(s_b)] * (1 + 1e-5)), k


def test_identical_models_give_identity():
    A = tower(tiny_arch(48, heads=3, image_size=16, patch_size=4), 4, perturb=0.3)
    B = Model(A.arch, {k: v.clone() for k, v in A.params.items()}, ref="copy")
    al = prepare(TransportInputs(A, B, noise_task(), seed=0), {"calib_size": 64}, lambda f, m: None)
    for s, T in al.maps.items():
        assert (T.double() - torch.eye(T.shape[0], dtype=F64)).abs().max() < 1e-4, s
        assert al.diagnostics()["maps"][list(al.maps).index(s)]["residual_after"] < 1e-4
    tau = random_tau(A.arch, 5, embeddings=True)
    out = apply(al, tau, 1.0, {"transport_embeddings": True})
    assert al.diagnostics()["zeroed"] == []
    for k, v in tau.items():
        assert torch.allclose(out[k], v, atol=1e-5), k


def test_token_grid_resized(task):
    A = tower(tiny_arch(32, heads=2), 5)  # 8 px, patch 2 -> 4 x 4 grid
    B = tower(dataclasses.replace(tiny_arch(48, heads=3), image_size=10, name="zoo:w48-10px"), 6)  # 5 x 5 grid
    assert A.arch.tokens != B.arch.tokens
    al = prepare(TransportInputs(A, B, task, seed=0), {"calib_size": 16}, lambda f, m: None)
    assert al.maps["ln1:0"].shape == (32, 48)
    out = apply(al, random_tau(A.arch, 1, embeddings=True), 1.0, {"transport_embeddings": True})
    assert "embed.pos" in al.diagnostics()["zeroed"]  # token counts differ: not transportable
    assert "embed.cls" not in al.diagnostics()["zeroed"] and out["embed.cls"].abs().max() > 0


def test_errors(wide_pair, task):
    A, B, al = wide_pair
    with pytest.raises(TransportError, match=r"^theseus: option depth must be one of relative, similarity, got 'x'$"):
        prepare(TransportInputs(A, B, task), {"depth": "x"}, lambda f, m: None)
    text = type("T", (), {"kind": "text", "name": "txt"})()
    with pytest.raises(TransportError, match=r"^theseus: task txt holds texts, .* reads images$"):
        prepare(TransportInputs(A, B, text), {}, lambda f, m: None)
    with pytest.raises(TransportError, match="calibration images"):
        prepare(TransportInputs(A, B, None), {}, lambda f, m: None)
    for bad, msg in (({"whiten": 0.7}, "whiten"), ({"calib_size": 0}, "calib_size"), ({"center": "yes"}, "center"),
                     ({"out_maps": "x"}, "out_maps"), ({"hidden": "x"}, "hidden"), ({"ridge": 1}, "unknown option")):
        with pytest.raises(TransportError, match=msg):
            prepare(TransportInputs(A, B, task), bad, lambda f, m: None)
    with pytest.raises(TransportError, match="task vector is for"):
        apply(al, random_tau(B.arch, 0), 1.0)


def test_registered_and_through_the_pipeline(task, tmp_path):
    from transport.pipeline import prepare as pipeline_prepare

    info = get_method("theseus")
    assert info.name == "theseus" and not info.same_arch and info.data == "unlabelled"
    assert {"calib_batches": 1, "calib_size": 32, "center": False, "whiten": 0.0}.items() <= info.options.items()
    A, B = tower(tiny_arch(32, layers=2, heads=2), 9), tower(tiny_arch(48, layers=2, heads=3), 10)
    inputs = TransportInputs(A, B, task, seed=0)
    first = pipeline_prepare("theseus", inputs, {"calib_batches": 2, "calib_size": 8}, cache_dir=tmp_path)
    second = pipeline_prepare("theseus", inputs, {"calib_batches": 2, "calib_size": 8}, cache_dir=tmp_path)
    assert not first.cache_hit and second.cache_hit
    assert second.alignment.diagnostics() == first.alignment.diagnostics()
    assert first.alignment.diagnostics()["calib_images"] == 16


def test_naive_resize():
    a, b = tiny_arch(32, layers=2, heads=2), tiny_arch(48, layers=2, heads=3)
    tau = random_tau(a, 0, embeddings=True)
    up = naive_resize(tau, b, 2.0)
    assert all(tuple(v.shape) == i.shape for (k, v), i in zip(up.items(), param_axes(b).values()))
    w = up["blocks.0.mlp.fc1.weight"]
    assert torch.equal(w[:128, :32], 2.0 * tau["blocks.0.mlp.fc1.weight"]) and w[128:].abs().max() == 0
    down = naive_resize(up, a, 0.5)
    assert down.allclose(tau)


# ----------------------------------------------------------------------------------------------
# planted: a wide model that is an exact isometric embedding of a small one
# ----------------------------------------------------------------------------------------------
def embed_model(A: Model, seed: int = 0):
    """W of twice the width, computing exactly A's function up to isometric embeddings of every space.

    residual stream: x -> [x, x] P / sqrt2 (duplication then a coordinate permutation P): LayerNorm
    statistics become mean/sqrt2 and var/2, so with W's LayerNorm eps = eps_A / 2 and gains/biases
    embedded the same way, LN_W(x E) = LN_A(x) E exactly. heads: A's heads sit in distinct W heads,
    rotated within the head (the same rotation for q and k keeps every logit), the other heads are
    zero. MLP hidden units: permuted into twice as many, the extra ones zero (GELU(0) = 0).
    projection output: an arbitrary isometric embedding.
    """
    a = A.arch
    d, H, dh, m, e, L = a.width, a.heads, a.head_dim, a.mlp_width, a.output_dim, a.layers
    D, M, e_w = 2 * d, 2 * m, e + 16
    arch = a.replace(width=D, heads=2 * H, mlp_width=M, output_dim=e_w, norm_eps=a.norm_eps / 2,
                               name="zoo:planted-wide")
    g = torch.Generator().manual_seed(seed)
    E_res = (torch.cat([torch.eye(d), torch.eye(d)], 1) / math.sqrt(2))[:, torch.randperm(D, generator=g)].double()
    maps = {"res": E_res, "proj": rand_orth(e, e_w, g)}
    for l in range(L):
        slots = torch.randperm(2 * H, generator=g)[:H]
        Eq, Ev = torch.zeros(d, D, dtype=F64), torch.zeros(d, D, dtype=F64)
        for h in range(H):
            s = int(slots[h])
            Eq[h * dh:(h + 1) * dh, s * dh:(s + 1) * dh] = rand_orth(dh, dh, g)
            Ev[h * dh:(h + 1) * dh, s * dh:(s + 1) * dh] = rand_orth(dh, dh, g)
        Eh = torch.zeros(m, M, dtype=F64)
        Eh[torch.arange(m), torch.randperm(M, generator=g)[:m]] = 1.0
        maps.update({f"q{l}": Eq, f"v{l}": Ev, f"h{l}": Eh})
    p = {k: v.double() for k, v in A.params.items()}
    w = {"embed.patch.weight": torch.einsum("ichw,ij->jchw", p["embed.patch.weight"], E_res),
         "embed.cls": p["embed.cls"] @ E_res, "embed.pos": p["embed.pos"] @ E_res,
         "head.proj": E_res.t() @ p["head.proj"] @ maps["proj"]}
    for n in ("ln_pre", "ln_post"):
        w[f"{n}.weight"], w[f"{n}.bias"] = p[f"{n}.weight"] @ E_res, p[f"{n}.bias"] @ E_res
    for l in range(L):
        b, Eq, Ev, Eh = f"blocks.{l}", maps[f"q{l}"], maps[f"v{l}"], maps[f"h{l}"]
        for n in ("ln1", "ln2"):
            w[f"{b}.{n}.weight"], w[f"{b}.{n}.bias"] = p[f"{b}.{n}.weight"] @ E_res, p[f"{b}.{n}.bias"] @ E_res
        for x, E in (("q", Eq), ("k", Eq), ("v", Ev)):
            w[f"{b}.attn.{x}.weight"] = E.t() @ p[f"{b}.attn.{x}.weight"] @ E_res
            w[f"{b}.attn.{x}.bias"] = p[f"{b}.attn.{x}.bias"] @ E
        w[f"{b}.attn.o.weight"] = E_res.t() @ p[f"{b}.attn.o.weight"] @ Ev
        w[f"{b}.attn.o.bias"] = p[f"{b}.attn.o.bias"] @ E_res
        w[f"{b}.mlp.fc1.weight"] = Eh.t() @ p[f"{b}.mlp.fc1.weight"] @ E_res
        w[f"{b}.mlp.fc1.bias"] = p[f"{b}.mlp.fc1.bias"] @ Eh
        w[f"{b}.mlp.fc2.weight"] = E_res.t() @ p[f"{b}.mlp.fc2.weight"] @ Eh
        w[f"{b}.mlp.fc2.bias"] = p[f"{b}.mlp.fc2.bias"] @ E_res
    return Model(arch, {k: v.float() for k, v in w.items()}, ref="planted-wide"), maps


@pytest.fixture(scope="module")
def noise():
    return noise_task()


@pytest.fixture(scope="module")
def planted(noise):
    A = tower(tiny_arch(32, layers=2, heads=2, output_dim=16, image_size=16, patch_size=4), 11, perturb=0.3)
    W, maps = embed_model(A, seed=3)
    al = prepare(TransportInputs(A, W, noise, seed=0), {"calib_size": 128}, lambda f, m: None)
    return A, W, maps, al


def test_planted_wide_model_is_an_exact_embedding(planted, noise):
    A, W, maps, _ = planted
    x = noise.split("test")[0][:64]
    fa = encode(A.params, A.arch, preprocess(A.arch, x)).double()
    fw = encode(W.params, W.arch, preprocess(W.arch, x)).double()
    assert (fw - fa @ maps["proj"]).abs().max() < 1e-4 * fa.abs().max()


def test_planted_maps_recovered(planted):
    A, W, maps, al = planted
    for l in range(A.arch.layers):
        for space, E in ((f"ln1:{l}", maps["res"]), (f"res:{l}m", maps["res"]), (f"q:{l}", maps[f"q{l}"]),
                         (f"k:{l}", maps[f"q{l}"]), (f"v:{l}", maps[f"v{l}"]), (f"ctx:{l}", maps[f"v{l}"]),
                         (f"act:{l}", maps[f"h{l}"]), (f"fc2:{l}", maps["res"])):
            assert (al.maps[space].double() - E).abs().max() < 1e-6, space
    assert (al.maps["proj"].double() - maps["proj"]).abs().max() < 1e-6
    for m in al.diagnostics()["maps"]:
        assert m["residual_after"] < 1e-5 and m["residual_before"] > 0.5, m["space"]


@pytest.mark.parametrize("embeddings", [False, True])
def test_planted_transport_reproduces_the_finetuned_function(planted, noise, embeddings):
    A, W, maps, al = planted
    tau = random_tau(A.arch, 21, scale=0.05, embeddings=embeddings)
    tau_w = apply(al, tau, 1.0, {"transport_embeddings": embeddings})
    assert al.diagnostics()["zeroed"] == ([] if embeddings else ["embed.patch.weight", "embed.cls", "embed.pos"])
    x = noise.split("test")[0][:64]
    f_ft = encode(tau.apply_to(A.params), A.arch, preprocess(A.arch, x)).double() @ maps["proj"]
    f_w = encode(tau_w.apply_to(W.params), W.arch, preprocess(W.arch, x)).double()
    f_w0 = encode(W.params, W.arch, preprocess(W.arch, x)).double()
    change = (f_ft - f_w0).abs().max()
    assert change > 1e-2  # tau matters
    assert (f_w - f_ft).abs().max() < 1e-4 * change
    # the naive zero-padded tau does not
    f_naive = encode(naive_resize(tau, W.arch).apply_to(W.params), W.arch, preprocess(W.arch, x)).double()
    assert (f_naive - f_ft).abs().max() > 0.3 * change


def test_planted_separate_hidden_maps_fail(planted, noise):
    """Why one hidden map is the default: the pre-activation has rank <= d + 1 < m, so its own map is not
    determined where fine-tuning moves fc1's rows, and the transported function is visibly off."""
    A, W, maps, _ = planted
    al = prepare(TransportInputs(A, W, noise, seed=0), {"calib_size": 128, "hidden": "separate"}, lambda f, m: None)
    assert (al.maps["act:0"].double() - maps["h0"]).abs().max() < 1e-6
    assert (al.maps["fc1:0"].double() - maps["h0"]).abs().max() > 0.1
    tau = random_tau(A.arch, 21, scale=0.05)
    x = noise.split("test")[0][:64]
    f_ft = encode(tau.apply_to(A.params), A.arch, preprocess(A.arch, x)).double() @ maps["proj"]
    f_w = encode(apply(al, tau, 1.0).apply_to(W.params), W.arch, preprocess(W.arch, x)).double()
    f_w0 = encode(W.params, W.arch, preprocess(W.arch, x)).double()
    assert (f_w - f_ft).abs().max() > 0.05 * (f_ft - f_w0).abs().max()
