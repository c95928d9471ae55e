"""Exact assignment solver: every answer equals scipy's dense optimum, from any warm start, with a real certificate.

Objectives are compared in float64 over the float32 entries. Generic random problems have a unique optimum
(ties have probability zero), so the permutation itself must equal scipy's. Problems with ties (integer
entries, equal rows) must reach scipy's objective exactly: integer sums are exact in float64.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from transport.core.assignment import SPARSE_MIN, center, certify, solve_assignment, tolerance

N = SPARSE_MIN  # the smallest size that takes the certified sparse / warm path


def rand(n: int, seed: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, n, generator=g) * scale + shift).float()


def best(S: torch.Tensor) -> tuple[np.ndarray, float]:
    _, c = linear_sum_assignment(S.double().numpy(), maximize=True)
    return c, objective(S, c)


def objective(S: torch.Tensor, p) -> float:
    p = np.asarray(p)
    return float(S.double().numpy()[np.arange(S.shape[0]), p].sum())


def check_optimal(S: torch.Tensor, p: torch.Tensor, y, exact_perm: bool) -> None:
    n = S.shape[0]
    assert sorted(p.tolist()) == list(range(n))
    c, opt = best(S)
    got = objective(S, p)
    scale = float(S.abs().max())
    assert got >= opt - n * tolerance(scale, y) - 1e-12 * abs(opt)
    assert got <= opt + 1e-12 * max(abs(opt), scale)  # nothing beats the optimum (rounding of the two sums)
    if exact_perm:
        assert np.array_equal(p.numpy(), c)
    if y is not None:
        assert certify(S, p, y)


@pytest.mark.parametrize("n", [1, 2, 3, 64])
def test_small_problems_use_scipy(n):
    S = rand(n, n)
    p, y, dense = solve_assignment(S)
    assert dense and y is None
    check_optimal(S, p, None, exact_perm=True)


@pytest.mark.parametrize("seed,scale,shift", [(0, 1.0, 0.0), (1, 1e30, 0.0), (2, 1e-30, 0.0), (3, 1.0, -50.0),
                                              (4, 1e-3, 7.0)])
def test_random_scales_and_signs(seed, scale, shift):
    S = rand(N, seed, scale, shift)
    st: dict = {}
    p, y, dense = solve_assignment(S, stats=st)
    assert not dense and st["path"] == "sparse"
    check_optimal(S, p, y, exact_perm=True)


def test_4096_random():
    S = rand(4096, 11)
    p, y, dense = solve_assignment(S)
    assert not dense
    check_optimal(S, p, y, exact_perm=True)


@pytest.mark.parametrize("kind", ["ties", "equal_rows", "equal_all", "one_column_wins"])
def test_degenerate_problems(kind):
    g = torch.Generator().manual_seed(5)
    if kind == "ties":
        S = torch.randint(0, 3, (N, N), generator=g).float()
    elif kind == "equal_rows":
        S = torch.randn(1, N, generator=g).repeat(N, 1)
    elif kind == "equal_all":
        S = torch.full((N, N), 2.5)
    else:  # every row prefers column 0 by far: only one row can have it
        S = torch.rand(N, N, generator=g)
        S[:, 0] += 1000.0
    p, y, _ = solve_assignment(S)  # equal rows end on the dense fallback: least potentials fit no other row
    check_optimal(S, p, y, exact_perm=False)
    assert objective(S, p) == pytest.approx(best(S)[1], rel=1e-12, abs=1e-9)


@pytest.fixture(scope="module")
def previous_visit():
    S0 = rand(N, 20)
    p0, y0, _ = solve_assignment(S0)
    return S0, p0, y0


@pytest.mark.parametrize("start", ["previous", "wrong_perm", "random_duals", "huge_duals", "zero_duals"])
def test_warm_starts_from_anything_reach_the_optimum(start, previous_visit):
    S0, p0, y0 = previous_visit
    S = S0 + 0.05 * rand(N, 21)  # the next visit: a similar problem
    g = torch.Generator().manual_seed(22)
    hint, duals = p0, y0
    if start == "wrong_perm":
        hint = torch.randperm(N, generator=g)
    elif start == "random_duals":
        duals = torch.randn(N, generator=g, dtype=torch.float64)
    elif start == "huge_duals":
        duals = 1e6 * torch.randn(N, generator=g, dtype=torch.float64)
    elif start == "zero_duals":
        duals = torch.zeros(N, dtype=torch.float64)
    p, y, dense = solve_assignment(S, hint, duals)
    assert not dense
    check_optimal(S, p, y, exact_perm=True)


def test_unchanged_problem_is_certified_without_a_solve():
    S = rand(N, 30)
    p0, y0, _ = solve_assignment(S)
    st: dict = {}
    p, y, _ = solve_assignment(S, p0, y0, stats=st)
    assert st == {"violated": 0, "path": "warm"} and torch.equal(p, p0)


def test_small_change_is_repaired_by_augmenting_paths():
    S0 = rand(N, 40)
    p0, y0, _ = solve_assignment(S0)
    y0 = center(S0, p0, y0, iters=2)
    assert certify(S0, p0, y0)
    S = S0.clone()
    rows = torch.arange(3)
    S[rows, p0[rows + 10]] += 5.0  # three rows now want another row's column
    st: dict = {}
    p, y, _ = solve_assignment(S, p0, y0, stats=st)
    assert st["path"] == "repair" and 0 < st["violated"] <= N // 64
    check_optimal(S, p, y, exact_perm=True)
    assert not torch.equal(p, p0)


def test_certificate_rejects_non_optimal_and_invalid_permutations():
    S = rand(N, 50)
    p, y, _ = solve_assignment(S)
    assert certify(S, p, y)
    q = p.clone()
    q[[0, 1]] = q[[1, 0]]  # any swap of a unique optimum loses
    assert objective(S, q) < objective(S, p)
    g = torch.Generator().manual_seed(51)
    for duals in (y, torch.zeros(N, dtype=torch.float64), torch.randn(N, generator=g, dtype=torch.float64)):
        assert not certify(S, q, duals)
    dup = p.clone()
    dup[0] = dup[1]
    assert not certify(S, dup, y)
    assert not certify(S, p, y + torch.randn(N, generator=g, dtype=torch.float64))  # wrong potentials


def test_centred_potentials_still_certify_and_have_slack():
    S = rand(N, 60)
    p, y, _ = solve_assignment(S)
    yc = center(S, p, y, iters=2)
    assert certify(S, p, yc)
    u = S.double()[torch.arange(N), p] - yc[p]
    r = u[:, None] + yc[None, :] - S.double()
    r[torch.arange(N), p] = float("inf")
    u0 = S.double()[torch.arange(N), p] - y[p]
    r0 = u0[:, None] + y[None, :] - S.double()
    r0[torch.arange(N), p] = float("inf")
    # least potentials leave a tight edge at most columns; centred ones leave slack at (nearly) all of them
    assert int((r.min(0).values > 1e-9).sum()) > int((r0.min(0).values > 1e-9).sum())
