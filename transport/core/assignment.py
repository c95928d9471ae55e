"""Exact linear assignment for large similarity matrices (TransFusion's weight-matching solves).

:func:`solve_assignment` solves max-sum assignments exactly: on each row's best candidate columns with
scipy's sparse solver, certified optimal on ALL n^2 entries by column potentials, with the dense
solver as the fallback that decides when the certificate does not settle.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

Tensor = torch.Tensor

SPARSE_MIN = 1024  # assignment problems at least this large use the sparse solver with a dense certificate


def lap_max(S: Tensor) -> Tensor:
    """Column index per row of the assignment maximising sum_i S[i, p[i]] (scipy's exact solver)."""
    _, col = linear_sum_assignment(S.detach().double().cpu().numpy(), maximize=True)
    return torch.from_numpy(col.astype(np.int64))


def lap_min_cost(C: np.ndarray) -> tuple[np.ndarray, float]:
    r, c = linear_sum_assignment(C)
    return c, float(C[r, c].sum())


def _candidates(S: Tensor, k: int, hint: Tensor) -> Tensor:
    """Sorted unique flat indices i*n + j of edges that include every row's k largest entries and ``hint``.

    Rows are cut into blocks of 16; the k-th largest block maximum is a threshold that at least k entries
    reach, so every entry above the row's k-th largest is kept (more may be, which is harmless).
    """
    n = S.shape[0]
    b = 16 if n % 16 == 0 and n // 16 > k else 1
    if b == 1:
        thr = torch.topk(S, k, dim=1).values[:, -1]
    else:
        thr = torch.topk(S.view(n, n // b, b).amax(2), k, dim=1).values[:, -1]
    flat = torch.nonzero((S >= thr[:, None]).view(-1)).flatten()
    rows = torch.arange(n, device=S.device)
    return torch.unique(torch.cat([flat, rows * n + hint]))


def _potentials(S: Tensor, p: Tensor, edges: Tensor, y0: Optional[Tensor], tol: float,
                max_rounds: int = 256) -> Optional[Tensor]:
    """Column potentials y with y[j] >= y[p[i]] + S[i, j] - S[i, p[i]] for every candidate edge i*n + j.

    Longest paths from zero (or from ``y0``) in the graph of column swaps, by Bellman-Ford rounds that only
    rescan edges of rows whose own column moved. They exist iff p is optimal on the candidate edges.
    None when they do not settle within ``max_rounds`` (at most n + 1 are ever needed): either p is not
    optimal, or the certificate is too slow to find and the caller falls back to an exact dense solve.
    """
    n = S.shape[0]
    max_rounds = min(int(max_rounds), n + 1)
    rr, cl = edges // n, edges % n
    g = S.view(-1)[edges].double() - S[rr, p[rr]].double()
    src = p[rr]
    pinv = torch.empty_like(p)
    pinv[p] = torch.arange(n, device=S.device)
    y = torch.zeros(n, dtype=torch.float64, device=S.device) if y0 is None else y0.clone()
    sel = None
    for _ in range(max_rounds):
        new = y.clone()
        if sel is None:
            new.scatter_reduce_(0, cl, y[src] + g, "amax")
        else:
            new.scatter_reduce_(0, cl[sel], y[src[sel]] + g[sel], "amax")
        up = new > y + tol
        if not bool(up.any()):
            return new
        y = new
        active = torch.zeros(n, dtype=torch.bool, device=S.device)
        active[pinv[up]] = True
        sel = torch.nonzero(active[rr]).flatten()
    return None


def _sparse_lap(S: Tensor, edges: Tensor) -> Optional[Tensor]:
    """Max-sum assignment of S restricted to the candidate edges (sorted unique flat indices)."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    n = S.shape[0]
    rr, cl = edges // n, edges % n
    vals = S.view(-1)[edges].double()
    data = float(vals.max()) - vals + 1.0  # positive costs: no explicit zeros
    indptr = np.concatenate([[0], np.cumsum(torch.bincount(rr, minlength=n).cpu().numpy())])
    try:
        M = csr_matrix((data.cpu().numpy(), cl.cpu().numpy(), indptr), shape=(n, n))
        _, col = min_weight_full_bipartite_matching(M)
    except ValueError:  # no perfect matching on the candidates
        return None
    return torch.from_numpy(col.astype(np.int64)).to(S.device)


def _row_best(S: Tensor, y: Tensor, p: Tensor, chunk: int = 256) -> tuple[Tensor, Tensor]:
    """Per row: the column maximising S[i, j] - y[j] and how much it beats column p[i] (float64, in chunks)."""
    n = S.shape[0]
    best = torch.empty(n, dtype=torch.long, device=S.device)
    slack = torch.empty(n, dtype=torch.float64, device=S.device)
    for a in range(0, n, chunk):
        r = S[a:a + chunk].double() - y[None, :]
        m, j = r.max(1)
        best[a:a + chunk] = j
        slack[a:a + chunk] = m - r.gather(1, p[a:a + chunk, None]).squeeze(1)
    return best, slack


def solve_assignment(S: Tensor, hint: Optional[Tensor] = None, k: int = 48,
                     attempts: int = 4) -> tuple[Tensor, Optional[Tensor], bool]:
    """Exact max-sum assignment of a square S: (perm, column potentials certifying it, used the dense solver).

    Large problems are solved on each row's k best columns (plus ``hint``, so a perfect matching exists)
    with scipy's sparse solver. Potentials computed on the candidate edges are checked on ALL edges;
    each violated row gets its best column by reduced value added and the check repeats. The answer is
    therefore exact; if it does not settle in a few attempts the dense solver decides.
    """
    n = S.shape[0]
    if n < SPARSE_MIN or k + 1 >= n:
        return lap_max(S).to(S.device), None, True
    hint = torch.arange(n, device=S.device) if hint is None else hint
    lo, hi = S.aminmax()
    scale = max(float(hi), -float(lo), 1e-30)
    edges = _candidates(S, k, hint)
    rows = torch.arange(n, device=S.device)
    p: Optional[Tensor] = None
    y: Optional[Tensor] = None
    for _ in range(attempts):
        if p is None:
            p = _sparse_lap(S, edges)
            if p is None:
                break
            y = None
        y = _potentials(S, p, edges, y, 1e-13 * scale)
        if y is None:  # p not optimal on the enlarged candidates: solve them again
            p = None
            continue
        best, slack = _row_best(S, y, p)
        bad = slack > 1e-9 * scale
        if not bool(bad.any()):
            return p, y, False
        edges = torch.unique(torch.cat([edges, rows[bad] * n + best[bad]]))
    return lap_max(S).to(S.device), None, True


__all__ = ["SPARSE_MIN", "lap_max", "lap_min_cost", "solve_assignment"]
