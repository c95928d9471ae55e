"""Procrustes maps and the streaming moments behind them (spec invariants 1-3, residual formula, resizing)."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from transport.core.procrustes import (CrossCovariance, naive_map, polar, polar_batch, procrustes_map,
                                       resize_tokens, route_noise)

MODES = ("svd", "svd32", "eigh", "eigh32")
FLOAT32 = ("svd32", "eigh32")
TOL = {"svd": 1e-9, "svd32": 2e-4, "eigh": 1e-9, "eigh32": 2e-4}


def orth_tol(mode: str, d: int) -> float:
    """Orthonormal rows/columns to working precision: QR and SVD factors are within a few sqrt(d) * eps
    (measured at most 3.1 sqrt(d) eps for d = 12..768); 32 sqrt(d) eps leaves a 10x margin."""
    return 32 * math.sqrt(d) * torch.finfo(torch.float32 if mode in FLOAT32 else torch.float64).eps


def rank_deficient(d_a: int, d_b: int, nullity: int, seed: int, cond: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """C = Qa diag(s) Qb^T with ``nullity`` exactly zero singular values in random (not axis-aligned)
    directions, the others spread over ``cond``; returns C and its exact singular values."""
    g = torch.Generator().manual_seed(seed)
    k = min(d_a, d_b)
    s = torch.logspace(0, -math.log10(cond), k, dtype=torch.float64)
    s[k - nullity:] = 0
    Qa, _ = torch.linalg.qr(torch.randn(d_a, k, generator=g, dtype=torch.float64))
    Qb, _ = torch.linalg.qr(torch.randn(d_b, k, generator=g, dtype=torch.float64))
    return (Qa * s) @ Qb.t(), s


def rand_orth(rows: int, cols: int, seed: int) -> torch.Tensor:
    """rows x cols with orthonormal rows (rows <= cols) or columns (rows > cols)."""
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(max(rows, cols), min(rows, cols), generator=g, dtype=torch.float64)
    Q, R = torch.linalg.qr(M)
    Q = Q * torch.sign(torch.diagonal(R))
    return Q.t() if rows <= cols else Q


def data(n: int, d: int, seed: int, cond: float = 10.0) -> torch.Tensor:
    """n x d, full column rank, singular values spread over ``cond``."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    return X * torch.logspace(0, -math.log10(cond), d, dtype=torch.float64)


def moments(xa: torch.Tensor, xb: torch.Tensor, chunk: int = 37, **kw) -> CrossCovariance:
    cc = CrossCovariance(xa.shape[1], xb.shape[1], **kw)
    for i in range(0, len(xa), chunk):
        cc.update(xa[i:i + chunk], xb[i:i + chunk])
    return cc


def eye_err(M: torch.Tensor) -> float:
    return float((M.double() - torch.eye(M.shape[0], dtype=torch.float64)).abs().max())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(12, 20), (20, 12), (16, 16)])
def test_orthogonality(mode, shape):
    d_a, d_b = shape
    C = torch.randn(d_a, d_b, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    C[:, 0] = 0  # rank deficient too
    T, S = polar(C, mode)
    assert T.shape == (d_a, d_b)
    d = min(d_a, d_b)
    if d_a <= d_b:
        assert eye_err(T @ T.t()) < orth_tol(mode, d)
    else:
        assert eye_err(T.t() @ T) < orth_tol(mode, d)
    # against a second path (the float64 SVD), within what the route promises on S, the zero included
    ref = torch.linalg.svdvals(C)
    noise = route_noise(mode, d) * float(ref[0])
    assert float((S - ref).abs().max()) <= noise
    assert torch.all(S[:-1] >= S[1:] - noise)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(16, 16), (12, 20), (20, 12), (64, 96), (96, 128)])
def test_directions_c_does_not_see_follow_the_reference_on_every_route(mode, shape):
    """Exactly rank-deficient C, and as reference one valid answer: C's determined directions u_i -> v_i,
    the free ones sent to orthonormal rows orthogonal to them. Every route must return that answer, so
    its rule for what is undetermined holds (rounding of the zero singular values below its threshold,
    the weakest real one above); S agrees with the float64 SVD within what the route promises."""
    d_a, d_b = shape
    m, n = min(shape), max(shape)
    nullity = m // 4
    r = m - nullity
    for seed in range(3):
        Cs, s = rank_deficient(m, n, nullity, seed)  # the smaller side first
        U, _, Vh = torch.linalg.svd(Cs, full_matrices=False)
        g = torch.Generator().manual_seed(100 + seed)
        free = torch.randn(n, nullity, generator=g, dtype=torch.float64)
        free -= Vh[:r].t() @ (Vh[:r] @ free)
        free, _ = torch.linalg.qr(free)
        answer = U[:, :r] @ Vh[:r] + U[:, r:] @ free.t()
        C, ref = (Cs, answer) if d_a <= d_b else (Cs.t(), answer.t())
        T, S = polar(C, mode, reference=ref)
        assert float((S - s).abs().max()) <= route_noise(mode, m) * float(s[0])
        # the polar factor's perturbation bound with the route's promise on S as the perturbation
        bound = 2 * route_noise(mode, m) * float(s[0] / s[r - 1])
        assert float((T.double() - ref).abs().max()) <= bound, seed
        assert eye_err(T @ T.t() if d_a <= d_b else T.t() @ T) < orth_tol(mode, m)


@pytest.mark.parametrize("mode", MODES)
def test_planted_rotation_recovered(mode):
    xa = data(300, 24, 0)
    R = rand_orth(24, 24, 1)
    T = procrustes_map(moments(xa, xa @ R).C, mode)
    assert (T.double() - R).abs().max() < TOL[mode]


@pytest.mark.parametrize("mode", MODES)
def test_planted_widening_embedding_recovered(mode):
    xa = data(300, 16, 2)
    E = rand_orth(16, 40, 3)
    assert eye_err(E @ E.t()) < 1e-12
    T = procrustes_map(moments(xa, xa @ E).C, mode)
    assert (T.double() - E).abs().max() < TOL[mode]
    assert not torch.allclose(T.double(), naive_map(16, 40), atol=0.1)


def test_shrinking_is_a_projection_that_maximises_the_trace():
    """No exact recovery is claimed when shrinking; T is the trace maximiser over orthonormal-column maps."""
    xa = data(400, 30, 4, cond=100)
    P = rand_orth(30, 12, 5)  # P^T P = I
    cc = moments(xa, xa @ P, gram_a=True)
    T = procrustes_map(cc.C, "eigh")
    assert eye_err(T.t() @ T) < 1e-12
    for seed in range(5):
        other = rand_orth(30, 12, 100 + seed)
        assert float((T * cc.C).sum()) >= float((other * cc.C).sum())
    assert float((T * cc.C).sum()) >= float((P * cc.C).sum()) - 1e-9
    # with whitened source data (orthonormal columns) the planted projection is recovered
    q, _ = torch.linalg.qr(xa)
    Tw = procrustes_map(moments(q, q @ P).C, "eigh")
    assert (Tw - P).abs().max() < 1e-10


def test_equal_data_gives_identity_even_when_rank_deficient():
    x = data(50, 20, 6)
    x[:, 5] = 0.0  # a dead unit
    x[:, 7] = x[:, 8]  # and a duplicated one
    C = moments(x, x).C
    s = torch.linalg.svdvals(C)  # the float64 SVD: 18 measured directions, then two exact zeros
    assert float(s[17] / s[0]) > 1e-3 and float(s[18] / s[0]) < 1e-15
    for mode in MODES:
        # the free directions follow the reference (the identity), the measured ones map onto
        # themselves: T == I within the route's noise level or its working precision (eigh32 used to
        # treat rounding as measured: 1.44 away)
        T = procrustes_map(C, mode)
        assert eye_err(T) < max(route_noise(mode, 20), orth_tol(mode, 20)), mode


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(10, 14), (14, 10)])
def test_a_stack_gives_each_member_its_own_polar_factor(mode, shape):
    d_a, d_b = shape
    g = torch.Generator().manual_seed(21)
    C = torch.randn(3, d_a, d_b, generator=g, dtype=torch.float64)
    C[1, :, 2] = 0  # one member rank deficient: its free direction follows the reference alone
    C[2] = 0  # one with nothing measured
    T, S = polar_batch(C, mode)
    assert T.shape == (3, d_a, d_b) and S.shape == (3, min(d_a, d_b))
    for b in range(3):
        Tb, Sb = polar(C[b], mode)
        assert torch.allclose(T[b].double(), Tb.double(), atol=1e-5 if mode in FLOAT32 else 1e-12), b
        assert torch.allclose(S[b], Sb, atol=1e-5 * (1 + float(Sb[0])))
    assert torch.equal(T[2].double(), naive_map(d_a, d_b))
    with pytest.raises(ValueError, match="stack of matrices"):
        polar_batch(C[0])


def test_svd32_resolves_what_the_float32_gram_loses():
    """C's singular values spread over 1e-4: squared, the Gram's spectrum reaches float32's precision."""
    xa = data(400, 48, 30, cond=100)  # C = X^T X R: condition number 1e4
    R = rand_orth(48, 48, 31)
    C = moments(xa, xa @ R).C
    err = {m: float((procrustes_map(C, m).double() - R).abs().max()) for m in MODES}
    assert err["svd"] < 1e-12 and err["eigh"] < 1e-10 and err["svd32"] < 1e-4 and err["eigh32"] > 1e-2, err
    # eigh32's weakest directions are below its rounding of S, yet C still sees them: their map comes
    # from C, so little of tr(T^T C) is lost (following the reference there would lose 2e-3)
    loss = 1 - float((procrustes_map(C, "eigh32").double() * C).sum()) / float((R * C).sum())
    assert 0 < loss < 1e-4


def test_equivariance_under_target_rotations():
    xa, xb = data(200, 10, 7), data(200, 14, 8)
    Q = rand_orth(14, 14, 9)
    T = procrustes_map(moments(xa, xb).C, "eigh")
    TQ = procrustes_map(moments(xa, xb @ Q).C, "eigh")
    assert (TQ - T @ Q).abs().max() < 1e-10


@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("shape", [(9, 13), (13, 9)])
def test_residuals_from_moments_match_stored_activations(center, shape):
    d_a, d_b = shape
    xa, xb = data(120, d_a, 10) + 0.3, data(120, d_b, 11) - 0.2
    cc = moments(xa, xb, gram_a=True)
    T = procrustes_map(cc.cross(center), "eigh")
    if center:
        xa, xb = xa - xa.mean(0), xb - xb.mean(0)
    direct = float(torch.linalg.norm(xa @ T - xb) / torch.linalg.norm(xb))
    assert cc.residual(T, center) == pytest.approx(direct, rel=1e-9)
    naive = float(torch.linalg.norm(xa @ naive_map(d_a, d_b) - xb) / torch.linalg.norm(xb))
    assert cc.residual_naive(center) == pytest.approx(naive, rel=1e-9)
    if d_a <= d_b:  # an isometric embedding: Procrustes beats any other one, the zero padding included
        assert cc.residual(T, center) <= cc.residual_naive(center)


def test_centering_recovers_a_rotation_under_an_offset():
    xa = data(300, 12, 12) + torch.linspace(-2, 2, 12, dtype=torch.float64)
    R = rand_orth(12, 12, 13)
    xb = (xa - xa.mean(0)) @ R + torch.linspace(1, 3, 12, dtype=torch.float64)
    assert (procrustes_map(moments(xa, xb).cross(True), "eigh") - R).abs().max() < 1e-10
    assert (procrustes_map(moments(xa, xb).cross(False), "eigh") - R).abs().max() > 1e-3


@pytest.mark.parametrize("p", [0.25, 0.5])
def test_whitening_keeps_a_planted_rotation(p):
    xa = data(300, 12, 14, cond=30)
    R = rand_orth(12, 12, 15)
    cc = moments(xa, xa @ R, gram_a=True, gram_b=True)
    C0 = cc.target_matrix(whiten=0.0)
    Cw = cc.target_matrix(whiten=p, eps=1e-12)
    assert torch.equal(C0, cc.C)
    assert not torch.allclose(Cw, cc.C)
    assert (procrustes_map(Cw, "eigh") - R).abs().max() < 1e-8


def test_streaming_equals_one_shot():
    xa, xb = data(90, 7, 16), data(90, 5, 17)
    one = CrossCovariance(7, 5)
    one.update(xa, xb)
    many = moments(xa, xb, chunk=8)
    assert torch.allclose(one.C, many.C, atol=1e-12) and torch.allclose(one.C, xa.t() @ xb, atol=1e-12)
    assert many.n == 90


def _linear_resize_matrix(g_from: int, g_to: int) -> torch.Tensor:
    """M [g_from, g_to]: 1-D linear interpolation with half-pixel centres, written out by hand."""
    M = torch.zeros(g_from, g_to, dtype=torch.float64)
    for a in range(g_to):
        src = max((a + 0.5) * g_from / g_to - 0.5, 0.0)
        i0 = min(int(src), g_from - 1)
        i1, w = min(i0 + 1, g_from - 1), src - i0
        M[i0, a] += 1 - w
        M[i1, a] += w
    return M


def test_float32_products_are_staged_then_summed_in_float64(monkeypatch):
    import transport.core.procrustes as pr

    monkeypatch.setattr(pr, "PRODUCT_FLOAT64_MAX", 0)  # every product in float32, as for wide maps on a CPU
    monkeypatch.setattr(pr, "STAGE_ROWS", 50)
    xa, xb = data(160, 7, 18).float(), data(160, 5, 19).float()
    cc = moments(xa, xb, chunk=20, gram_a=True)  # stages of 60 rows, the last 40 still staged
    assert set(cc._staged) == {"_C", "G_a"} and cc._staged["_C"][1] == 40
    ref = xa.double().t() @ xb.double()
    assert cc.C.dtype == torch.float64 and torch.allclose(cc.C, ref, rtol=1e-5, atol=1e-5)  # reading flushes
    assert "_C" not in cc._staged
    assert torch.allclose(cc.gram("a"), xa.double().t() @ xa.double(), rtol=1e-5, atol=1e-5) and not cc._staged


@pytest.mark.parametrize("g_from,g_to", [(14, 15), (15, 14), (4, 7)])
def test_token_resize_is_bilinear(g_from, g_to):
    x = torch.randn(3, 1 + g_from ** 2, 5, dtype=torch.float64)
    y = resize_tokens(x, g_to)
    M = _linear_resize_matrix(g_from, g_to)
    grid = x[:, 1:].reshape(3, g_from, g_from, 5)
    ref = torch.einsum("nijd,ia,jb->nabd", grid, M, M).reshape(3, g_to ** 2, 5)
    assert torch.allclose(y[:, 1:], ref, atol=1e-12)
    assert torch.equal(y[:, 0], x[:, 0])  # class token apart
    const = torch.ones(1, 1 + g_from ** 2, 2, dtype=torch.float64)
    assert torch.allclose(resize_tokens(const, g_to), torch.ones(1, 1 + g_to ** 2, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="square grid"):
        resize_tokens(torch.zeros(1, 1 + 10, 2), 4)


def test_polar_rejects_bad_input():
    with pytest.raises(ValueError, match="NaN or Inf"):
        polar(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="unknown mode"):
        polar(torch.eye(2), "qr")
    T, S = polar(torch.zeros(3, 5))  # nothing measured: the reference map
    assert torch.equal(T, naive_map(3, 5)) and torch.all(S == 0)


#: the files whose assertions depend most on floating-point rounding (BLAS kernels, thread counts)
NUMERICS = ("tests/test_procrustes.py", "tests/test_theseus.py")


@pytest.mark.parametrize("threads", [1, 2])
def test_numerics_hold_with_1_and_2_threads(threads):
    """The numerics files in a fresh process whose BLAS and torch run with exactly ``threads`` threads."""
    if os.environ.get("TRANSPORT_TEST_THREADS"):
        pytest.skip("already inside a thread-count run")
    repo = Path(__file__).resolve().parents[1]
    # idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning made this run
    # 7x slower (129 s against 18 s); it changes no result, only how waiting threads wait
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "TRANSPORT_TEST_THREADS": str(threads),
           "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONPATH": str(repo)}
    p = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *NUMERICS],
                       cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert f"torch threads: {threads} (pinned)" in p.stdout, p.stdout[-2000:]
    assert p.returncode == 0, p.stdout[-4000:]


@pytest.mark.parametrize("mode", ["eigh", "eigh32"])
@pytest.mark.parametrize("shape", [(48, 80), (80, 48)])
def test_a_known_rank_bound_gives_the_same_polar_factor(mode, shape):
    """C from n < min(d_a, d_b) rows has rank <= n: leaving the directions beyond n out from the start (what
    Theseus does with its calibration row count) gives the factor the full computation gives."""
    g = torch.Generator().manual_seed(3)
    n = 30
    xa, xb = torch.randn(n, shape[0], generator=g, dtype=torch.float64), torch.randn(n, shape[1], generator=g,
                                                                                     dtype=torch.float64)
    C = xa.t() @ xb
    T, S = polar(C, mode)
    for rank in (n, n + 5):
        Tr, Sr = polar(C, mode, rank=rank)
        assert torch.equal(Sr, S)
        assert float((Tr.double() - T.double()).abs().max()) < (1e-5 if mode == "eigh32" else 1e-10)
        assert eye_err(Tr @ Tr.t() if shape[0] <= shape[1] else Tr.t() @ Tr) < orth_tol(mode, min(shape))
    with pytest.raises(AssertionError):  # a bound below the true rank throws determined directions away
        Tl, _ = polar(C, mode, rank=n - 10)
        assert float((Tl.double() - T.double()).abs().max()) < 1e-3
