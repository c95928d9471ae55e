"""Exact max-sum linear assignment for weight matching, warm-started across coordinate-ascent visits.

``solve_assignment(S, hint, potentials)`` returns a permutation p maximising sum_i S[i, p[i]] together with
column potentials y that prove it: with u_i = S[i, p[i]] - y[p[i]],

    S[i, j] - y[j] - u_i <= tol   for ALL n^2 edges (dual feasibility; complementary slackness holds by
                                  the definition of u),

so for every permutation q, sum_i S[i, q[i]] <= sum_i u_i + sum_j y_j + n tol = sum_i S[i, p[i]] + n tol.
The check is one float64 pass over S (``certify``); tol is 1e-12 of max|S| plus the float64 rounding of
the pass, far below the float32 resolution of S itself.

Strategy for large problems (n >= SPARSE_MIN):

1. warm start: the previous visit's permutation (``hint``) and potentials are checked against the new S
   in one pass; rows that violate the certificate are freed. None: the solve is skipped.
2. few violated rows: each is re-inserted by a shortest augmenting path (Dijkstra on reduced costs over
   all columns, Jonker-Volgenant / Hungarian dual update), which keeps the potentials feasible on every
   edge; only the rows it touched are re-checked.
3. many: a sparse solve on each row's k best columns by reduced value (plus ``hint``), scipy's
   min_weight_full_bipartite_matching, potentials on the candidate edges by Bellman-Ford rounds started
   from the warm ones, then the full check; violated rows are repaired as in 2 or the candidates grow.
4. anything that does not settle: scipy's dense linear_sum_assignment (exact; no potentials).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

Tensor = torch.Tensor

SPARSE_MIN = 1024  # assignment problems at least this large use the certified sparse / warm solver
TOL = 1e-12  # certificate tolerance relative to max|S|
REPAIR_ROWS = 1 / 16  # warm starts with at most this fraction of violated rows are repaired by augmenting paths
REPAIR_STEPS = 16  # ... scanning at most this many columns per unit in all (else the sparse solve decides)


# ----------------------------------------------------------------------------------------------
# dense (scipy)
# ----------------------------------------------------------------------------------------------
def lap_max(S: Tensor) -> Tensor:
    """Column index per row of the assignment maximising sum_i S[i, p[i]] (scipy's exact solver)."""
    _, col = linear_sum_assignment(S.detach().double().cpu().numpy(), maximize=True)
    return torch.from_numpy(col.astype(np.int64))


def lap_min_cost(C: np.ndarray) -> tuple[np.ndarray, float]:
    """Min-cost assignment of a square cost matrix: (column per row, total cost)."""
    r, c = linear_sum_assignment(C)
    return c, float(C[r, c].sum())


# ----------------------------------------------------------------------------------------------
# certificate
# ----------------------------------------------------------------------------------------------
def _absmax(t: Tensor) -> float:
    if not t.numel():
        return 0.0
    lo, hi = t.aminmax()
    return max(float(hi), -float(lo))


def tolerance(scale: float, y: Optional[Tensor] = None, rel: float = TOL) -> float:
    """Absolute certificate tolerance: rel * max|S| plus a bound on the float64 rounding of S - y - u."""
    ym = _absmax(y) if y is not None else 0.0
    return rel * max(scale, 1e-30) + 8 * 2.0 ** -52 * (scale + 2 * ym)


def row_slack(S: Tensor, y: Tensor, p: Tensor, rows: Optional[Tensor] = None,
              chunk: int = 64) -> tuple[Tensor, Tensor, Tensor]:
    """Per row (all, or ``rows``): max_j S[i, j] - y[j] (float64), its argmax, and how much it beats column p[i].

    A slack <= tol on every row is the optimality certificate of p with potentials y.
    """
    Sn, yn, pn = S.detach().cpu().numpy(), y.detach().cpu().numpy().astype(np.float64), p.cpu().numpy()
    idx = np.arange(Sn.shape[0]) if rows is None else rows.cpu().numpy()
    m = idx.size
    best, arg = np.empty(m), np.empty(m, np.int64)
    for a in range(0, m, chunk):
        r = idx[a:a + chunk]
        R = Sn[r].astype(np.float64)
        R -= yn
        arg[a:a + chunk] = j = R.argmax(1)
        best[a:a + chunk] = R[np.arange(r.size), j]
    own = Sn[idx, pn[idx]].astype(np.float64) - yn[pn[idx]]
    dev = S.device
    return (torch.from_numpy(best).to(dev), torch.from_numpy(arg).to(dev), torch.from_numpy(best - own).to(dev))


def is_permutation(p: Tensor, n: int) -> bool:
    return p.numel() == n and bool((torch.bincount(p.clamp(0, n - 1), minlength=n) == 1).all()) and \
        bool((p >= 0).all()) and bool((p < n).all())


def certify(S: Tensor, p: Tensor, y: Tensor, tol: Optional[float] = None) -> bool:
    """True iff p is a permutation and (p, y) satisfy the certificate on all n^2 edges (p is optimal)."""
    n = S.shape[0]
    if S.shape != (n, n) or y is None or y.shape != (n,) or not is_permutation(p, n):
        return False
    y = y.to(S.device, torch.float64)
    tol = tolerance(_absmax(S), y) if tol is None else tol
    return bool(torch.isfinite(y).all()) and float(row_slack(S, y, p)[2].max()) <= tol


# ----------------------------------------------------------------------------------------------
# shortest augmenting paths (exact repair from feasible potentials)
# ----------------------------------------------------------------------------------------------
def augment(S: np.ndarray, u: np.ndarray, y: np.ndarray, col4row: np.ndarray, row4col: np.ndarray,
            free_rows: np.ndarray, max_steps: int) -> Optional[np.ndarray]:
    """Insert each free row by a shortest augmenting path on reduced costs r = u_i + y_j - S_ij >= 0.

    Dijkstra over all columns from the free row until a free column is reached, then the Hungarian dual
    update (u down on scanned rows, y up on scanned columns: r stays >= 0 on every edge, 0 on the
    matching) and the augmentation. Updates the arrays in place; returns the rows whose u changed, or
    None when more than ``max_steps`` columns were scanned in all (the caller switches strategy).
    """
    n = S.shape[0]
    inf = np.inf
    touched = []
    steps = 0
    for i0 in free_rows.tolist():
        d = np.full(n, inf)
        dist = np.empty(n)
        pred = np.empty(n, np.int64)
        ypen = y.copy()  # +inf on scanned columns: they are never relaxed or picked again
        scanned = []
        i, mind = i0, 0.0
        while True:
            r = ypen - S[i]
            r += mind + u[i]
            better = r < d
            np.copyto(d, r, where=better)
            np.putmask(pred, better, i)
            j = int(d.argmin())
            mind = float(d[j])
            if not np.isfinite(mind):
                return None
            dist[j] = mind
            d[j] = inf
            ypen[j] = inf
            scanned.append(j)
            if row4col[j] < 0:
                break
            i = int(row4col[j])
        steps += len(scanned)
        if steps > max_steps:
            return None
        sc = np.asarray(scanned[:-1], dtype=np.int64)
        u[i0] -= mind
        if sc.size:
            delta = mind - dist[sc]
            rws = row4col[sc]
            u[rws] -= delta
            y[sc] += delta
            touched.append(rws)
        touched.append(np.asarray([i0]))
        while True:  # flip the path: sink <- pred ... <- i0
            i = int(pred[j])
            row4col[j] = i
            j_prev = int(col4row[i])
            col4row[i] = j
            if i == i0:
                break
            j = j_prev
    return np.unique(np.concatenate(touched)) if touched else np.zeros(0, np.int64)


def _repair(S: Tensor, p: Tensor, y: Tensor, u: Tensor, bad: Tensor, scale: float,
            max_steps: int) -> Optional[tuple[Tensor, Tensor]]:
    """Free the rows ``bad`` of (p, y) and re-insert them by shortest augmenting paths; certified or None.

    ``u`` must be the row maxima of S - y (so the potentials are feasible on every edge).
    """
    n = S.shape[0]
    Sn = S.detach().cpu().numpy()
    un, yn = u.cpu().numpy().copy(), y.cpu().numpy().copy()
    col4row = p.cpu().numpy().copy()
    row4col = np.empty(n, np.int64)
    row4col[col4row] = np.arange(n)
    free = bad.cpu().numpy()
    row4col[col4row[free]] = -1
    col4row[free] = -1
    touched = augment(Sn, un, yn, col4row, row4col, free, max_steps)
    if touched is None:
        return None
    p2 = torch.from_numpy(col4row).to(S.device)
    y2 = torch.from_numpy(yn).to(S.device)
    # rows not touched kept their column and its potential, and every other potential only rose
    _, _, slack = row_slack(S, y2, p2, torch.from_numpy(touched).to(S.device))
    if float(slack.max()) > tolerance(scale, y2):
        return None
    return p2, y2


# ----------------------------------------------------------------------------------------------
# sparse candidates
# ----------------------------------------------------------------------------------------------
def candidates(S: Tensor, k: int, hint: Tensor, y: Optional[Tensor] = None) -> Tensor:
    """Sorted unique flat indices i*n + j of edges that include every row's k largest S[i, j] - y[j] and ``hint``.

    Rows are cut into blocks of 16; the k-th largest block maximum is a threshold that at least k entries
    reach, so every entry above the row's k-th largest is kept (more may be, which is harmless).
    """
    n = S.shape[0]
    R = S if y is None else S - y.to(S.dtype)[None, :]
    b = 16 if n % 16 == 0 and n // 16 > k else 1
    if b == 1:
        thr = torch.topk(R, k, dim=1).values[:, -1]
    else:
        thr = torch.topk(R.view(n, n // b, b).amax(2), k, dim=1).values[:, -1]
    flat = torch.nonzero((R >= thr[:, None]).view(-1)).flatten()
    rows = torch.arange(n, device=S.device)
    return torch.unique(torch.cat([flat, rows * n + hint]))


def candidate_potentials(S: Tensor, p: Tensor, edges: Tensor, y0: Optional[Tensor], tol: float,
               max_rounds: Optional[int] = None) -> Optional[Tensor]:
    """Column potentials y with y[j] >= y[p[i]] + S[i, j] - S[i, p[i]] for every candidate edge i*n + j.

    The least such y above zero (or above ``y0``): longest paths in the graph of column swaps, by
    Bellman-Ford rounds that only rescan edges of rows whose own column moved. They exist iff p is
    optimal on the candidate edges; None when they do not settle within ``max_rounds`` (n + 1 at most
    are ever needed).
    """
    n = S.shape[0]
    max_rounds = n + 1 if max_rounds is None else min(int(max_rounds), n + 1)
    rr, cl = edges // n, edges % n
    g = S.view(-1)[edges].double() - S[rr, p[rr]].double()
    src = p[rr]
    pinv = torch.empty_like(p)
    pinv[p] = torch.arange(n, device=S.device)
    y = torch.zeros(n, dtype=torch.float64, device=S.device) if y0 is None else y0.to(S.device, torch.float64).clone()
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


def sparse_lap(S: Tensor, edges: Tensor) -> Optional[Tensor]:
    """Max-sum assignment of S restricted to the candidate edges (sorted unique flat indices); None if none."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    n = S.shape[0]
    rr, cl = edges // n, edges % n
    vals = S.view(-1)[edges].double()
    lo, hi = vals.aminmax()
    span = max(float(hi) - float(lo), 1e-300)
    data = (float(hi) - vals) / span + 1.0  # positive costs of order 1 at any scale: no explicit zeros
    indptr = np.concatenate([[0], np.cumsum(torch.bincount(rr, minlength=n).cpu().numpy())])
    try:
        M = csr_matrix((data.cpu().numpy(), cl.cpu().numpy(), indptr), shape=(n, n))
        _, col = min_weight_full_bipartite_matching(M)
    except ValueError:  # no perfect matching on the candidates
        return None
    return torch.from_numpy(col.astype(np.int64)).to(S.device)


# ----------------------------------------------------------------------------------------------
# the solver
# ----------------------------------------------------------------------------------------------
def _warm(S: Tensor, hint: Tensor, y: Tensor, scale: float, max_free: int, max_steps: int
          ) -> tuple[Optional[tuple[Tensor, Tensor]], Tensor]:
    """Check (hint, y) on all edges and repair a few violated rows: (certified result or None, violated rows)."""
    tol = tolerance(scale, y)
    best, _, slack = row_slack(S, y, hint)
    bad = torch.nonzero(slack > tol).flatten()
    if bad.numel() == 0:
        return (hint, y), bad
    if bad.numel() > max_free:
        return None, bad
    return _repair(S, hint, y, best, bad, scale, max_steps), bad


def solve_assignment(S: Tensor, hint: Optional[Tensor] = None, potentials: Optional[Tensor] = None,
                     k: int = 32, attempts: int = 4, stats: Optional[dict] = None
                     ) -> tuple[Tensor, Optional[Tensor], bool]:
    """Exact max-sum assignment of a square S: (perm, column potentials certifying it, used the dense solver).

    ``hint`` and ``potentials`` (from the previous solve of a similar S) are a warm start; any values are
    accepted, since the result is always certified on all edges (or comes from the dense solver).
    """
    n = S.shape[0]
    st = stats if stats is not None else {}
    if n < SPARSE_MIN or k + 1 >= n:
        st["path"] = "dense"
        return lap_max(S).to(S.device), None, True
    rows = torch.arange(n, device=S.device)
    hint = rows if hint is None or not is_permutation(hint.to(S.device), n) else hint.to(S.device)
    y0 = None
    if potentials is not None and potentials.shape == (n,) and bool(torch.isfinite(potentials).all()):
        y0 = potentials.to(S.device, torch.float64)
    max_free, max_steps = max(8, int(REPAIR_ROWS * n)), int(REPAIR_STEPS * n)
    scale = _absmax(S)
    if y0 is not None:
        res, bad = _warm(S, hint, y0, scale, max_free, max_steps)
        st["violated"] = int(bad.numel())
        if res is not None:
            st["path"] = "warm" if bad.numel() == 0 else "repair"
            return res[0], res[1], False
        if 2 * bad.numel() > n:  # these potentials say little about S: start the sparse solve cold
            y0 = None
    edges = candidates(S, k, hint, y0)
    for _ in range(attempts):
        p = sparse_lap(S, edges)
        if p is None:
            break
        y = candidate_potentials(S, p, edges, y0, 0.1 * tolerance(scale, y0))
        if y is None:
            break
        res, bad = _warm(S, p, y, scale, max_free, max_steps)
        if res is not None:
            st["path"] = "sparse"
            return res[0], res[1], False
        edges = torch.unique(torch.cat([edges, candidates(S, k, p, y)]))  # the best columns by the new potentials
    st["path"] = "dense"
    return lap_max(S).to(S.device), None, True


def center(S: Tensor, p: Tensor, y: Tensor, iters: int = 1, chunk: int = 64) -> Tensor:
    """Potentials certifying the same p with slack spread to both sides of every column (a better warm start).

    With r = u_i + y_j - S_ij (u_i from p), column j may move down by its smallest off-matching column
    slack c_j and up by the smallest off-matching slack s_i of its row i = p^-1(j); moving every column
    to the middle, y_j += (s_i - c_j) / 2, keeps r_ik >= r_ik - s_i / 2 - c_k / 2 >= 0 on every edge.
    Potentials that are the least solution of their constraints have a tight edge at every column, so
    any change of S breaks them; centred ones tolerate changes up to their slack.
    """
    Sn, pn = S.detach().cpu().numpy(), p.cpu().numpy()
    n = Sn.shape[0]
    yn = y.detach().cpu().numpy().astype(np.float64).copy()
    for _ in range(iters):
        u = Sn[np.arange(n), pn].astype(np.float64) - yn[pn]
        srow = np.empty(n)
        ccol = np.full(n, np.inf)
        for a in range(0, n, chunk):
            R = -Sn[a:a + chunk].astype(np.float64)
            R += yn
            R += u[a:a + chunk, None]
            R[np.arange(R.shape[0]), pn[a:a + chunk]] = np.inf
            srow[a:a + chunk] = R.min(1)
            np.minimum(ccol, R.min(0), out=ccol)
        srow = np.maximum(srow, 0.0)
        ccol = np.maximum(ccol, 0.0)
        step = np.empty(n)
        step[pn] = srow
        yn += (step - ccol) / 2
    return torch.from_numpy(yn).to(y.device)


__all__ = ["SPARSE_MIN", "lap_max", "lap_min_cost", "solve_assignment", "certify", "augment", "center"]
