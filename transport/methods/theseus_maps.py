"""Theseus's structured maps for attention heads: grouped-query attention and rotary positions.

The paper's maps treat the four head spaces of a block (``q``, ``k``, ``v`` outputs and the heads' context
``ctx``, o's input) as plain vector spaces, each with its own Procrustes map. That is what the option
``heads='free'`` does (the default for models without grouped-query attention or rotary positions).
With ``heads='grouped'`` (the default as soon as either model has key/value groups smaller than its
query heads, or rotary positions) the four maps of a layer are fitted together, under the structure
the attention computation imposes. Notation: source A has G_A key/value groups of r_A query heads of
d_A dims, target B likewise; C_q = X_q^T Y_q etc. are the four cross-covariances, cut into per-head blocks.

1. Heads move as heads. Every map is block-structured: source group g_A -> one target group g_B
   (k and v), each query head of g_A -> one query head of g_B (q and ctx); a query head never leaves
   its group's image. Which blocks pair up is an assignment maximising the same Procrustes objective
   ``sum tr(T^T C)`` the free maps maximise, restricted to structured T: query heads of a group pair by
   a Hungarian on their block scores, groups by a Hungarian on the joint score of (3.) and (4.). Where
   counts differ (e.g. 14 query heads -> 12) the extra heads of the larger side get no block.
2. Why not separate maps: a score is ``q_h . k_g`` for query head h of group g, so the maps of q_h and
   k_g must agree (``M_q M_k^T = I``) for the transported q and k updates to keep the logits they change;
   the context of query head h is an attention-weighted mix of its group's values, so ctx_h lives in
   the coordinates of v_g. Free maps fitted on each space alone can pick different rotations for
   each and mix dims of different heads, which is no symmetry of attention.
3. q/k: ONE map M_g [d_A, d_B] per group pair, shared by its key head and all its query heads, fitted
   on ``C_k[g] + sum over its matched query pairs C_q[h]`` (every row of either kind is evidence for
   the same coordinate change; the structured fit also needs far fewer calibration rows than a full
   H d_h map). Under rotary positions M_g must commute with the rotation: the rotate-half convention
   rotates dims (i, i + d/2) by angle ``pos * f_i``, and an orthogonal map commutes with every such
   rotation iff it maps rotary pairs to rotary pairs of the SAME frequency by a 2x2 rotation
   ``[[a, -b], [b, a]]`` (a reflection or a map mixing pairs changes ``q R_t (k R_s)^T``, i.e. the
   logits). So M_g is block-diagonal in rotary pairs: source pair i -> target pair j, matched by
   frequency (an order-preserving matching on |log f_A - log f_B|), and for each matched pair the
   rotation maximising ``a (C_ii + C_jj) + b (C_ji - C_ij)`` on its 2x2 block, in closed form. With
   equal head widths and rotary bases every pair keeps its own frequency and the q/k part is exact
   on planted symmetries; when head widths (or bases) differ the source and target frequencies do
   not coincide in general (they do pairwise when one width is an integer multiple of the other),
   the target's unmatched pairs get nothing, the logits' 1/sqrt(d_h) scale changes, and the target's
   attention is not the source's: the q/k part is APPROXIMATE, and the diagnostics say so per layer
   (with the largest log-frequency gap).
4. v/ctx: ONE map D_g [d_A, d_B] per group pair, used for the group's v rows and for the ctx dims
   of each of its query heads, fitted jointly on ``C_v[g] + sum C_ctx[h]``. We fit jointly rather
   than derive the ctx map from v alone: both kinds of rows are in the same d_h coordinates (ctx is
   a convex mix of v rows), a joint fit uses both, and the v map and ctx map agree by construction,
   so a transported v update reaches o's transported columns in the coordinates they expect.
   Without rotary positions (3.) is the same free Procrustes fit as (4.).

The result is four dense maps per layer (zero off the matched blocks) that ``apply`` uses exactly
like free ones. A map is a partial isometry: on its matched blocks ``T T^T = I`` (widening) or
``T^T T = I`` (shrinking), zero elsewhere.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from transport.core.arch import Arch
from transport.core.procrustes import polar_batch
from transport.errors import TransportError

Tensor = torch.Tensor

HEAD_MODES = ("auto", "free", "grouped")
HEAD_SITES = ("q", "k", "v", "ctx")
_TINY = 1e-12  # a rotary block whose 2x2 score is below this fraction of the largest follows the identity


@dataclass(frozen=True)
class HeadShape:
    """The attention layout of one model: key/value groups, query heads per group, head width, rotary base."""

    groups: int
    group_size: int
    head_dim: int
    rope: bool
    theta: float

    @classmethod
    def of(cls, arch: Arch) -> "HeadShape":
        return cls(arch.kv_heads, arch.group_size, arch.head_dim, arch.position == "rope", float(arch.rope_theta))

    @property
    def heads(self) -> int:
        return self.groups * self.group_size


def resolve_heads(mode: str, a: Arch, b: Arch) -> str:
    """'free' or 'grouped' for option ``heads`` (see the module docstring); refuses rotary on one side only."""
    if mode == "auto":
        grouped = any(x.kv_heads < x.heads or x.position == "rope" for x in (a, b))
        mode = "grouped" if grouped else "free"
    if mode == "grouped" and (a.position == "rope") != (b.position == "rope"):
        raise TransportError(f"theseus: {a.name} and {b.name} disagree on rotary positions ({a.position} vs "
                             f"{b.position}): no head map commutes with a rotation only one of them applies "
                             "(option heads=free fits unconstrained maps)")
    return mode


def monotone_matching(S: Tensor) -> list[Optional[int]]:
    """For each target index (row of ``S`` [n_target, n_source]) its source index or None: the order-preserving
    one-to-one matching of min(n_target, n_source) pairs with the largest total ``S`` (dynamic programming;
    ties go to the earlier target)."""
    S = S.detach().double().cpu()
    n_t, n_s = S.shape
    if n_t < n_s:
        back = monotone_matching(S.t())  # per source: its target
        out: list[Optional[int]] = [None] * n_t
        for i, j in enumerate(back):
            if j is not None:
                out[j] = i
        return out
    s = S.tolist()
    neg = float("-inf")
    f = [[0.0] * (n_t + 1)] + [[neg] * (n_t + 1) for _ in range(n_s)]  # f[i][j]: sources < i within targets < j
    take = [[False] * (n_t + 1) for _ in range(n_s + 1)]
    for i in range(1, n_s + 1):
        for j in range(i, n_t + 1):
            skip, match = f[i][j - 1], f[i - 1][j - 1] + s[j - 1][i - 1]
            f[i][j], take[i][j] = (match, True) if match >= skip else (skip, False)
    out = [None] * n_t
    i, j = n_s, n_t
    while i > 0:
        if take[i][j]:
            out[j - 1] = i - 1
            i -= 1
        j -= 1
    return out


def rotary_log_frequencies(shape: HeadShape) -> Tensor:
    """log f_i of the rotary pairs (i, i + d/2), i < d/2 (the frequencies of ``rotary_tables``)."""
    i = torch.arange(0, shape.head_dim, 2, dtype=torch.float64)
    return -math.log(shape.theta) * i / shape.head_dim


def rotary_pairs(a: HeadShape, b: HeadShape) -> tuple[list[tuple[int, int]], float]:
    """Source pair i -> target pair j of the nearest frequency (order-preserving), and the largest |log gap|."""
    fa, fb = rotary_log_frequencies(a), rotary_log_frequencies(b)
    match = monotone_matching(-(fb[:, None] - fa[None, :]).abs())
    pairs = [(i, j) for j, i in enumerate(match) if i is not None]
    gap = max((abs(float(fa[i] - fb[j])) for i, j in pairs), default=0.0)
    return pairs, gap


class _QK:
    """The q/k fit: free Procrustes, or 2x2 rotations on frequency-matched rotary pairs."""

    def __init__(self, a: HeadShape, b: HeadShape, polar_mode: str):
        self.a, self.b, self.polar_mode = a, b, polar_mode
        self.pairs, self.gap = rotary_pairs(a, b) if a.rope else ([], 0.0)
        ia = torch.tensor([i for i, _ in self.pairs], dtype=torch.long)
        jb = torch.tensor([j for _, j in self.pairs], dtype=torch.long)
        self.idx = (ia, jb, ia + a.head_dim // 2, jb + b.head_dim // 2)

    def _coefficients(self, C: Tensor) -> tuple[Tensor, Tensor]:
        i, j, i2, j2 = self.idx
        return C[:, i, j] + C[:, i2, j2], C[:, i2, j] - C[:, i, j2]

    def score(self, C: Tensor) -> Tensor:
        """max tr(M^T C) over allowed M, per block of the stack C [n, d_A, d_B]."""
        if not self.a.rope:
            return _nuclear(C)
        x, y = self._coefficients(C)
        return torch.hypot(x, y).sum(-1)

    def fit(self, C: Tensor) -> Tensor:
        if not self.a.rope:
            return polar_batch(C, self.polar_mode)[0].to(torch.float64)
        x, y = self._coefficients(C)
        r = torch.hypot(x, y)
        null = r <= _TINY * r.amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
        c = torch.where(null, torch.ones_like(r), x / r.clamp_min(torch.finfo(torch.float64).tiny))
        s = torch.where(null, torch.zeros_like(r), y / r.clamp_min(torch.finfo(torch.float64).tiny))
        i, j, i2, j2 = self.idx
        M = torch.zeros(C.shape, dtype=torch.float64)
        M[:, i, j], M[:, i2, j2], M[:, i, j2], M[:, i2, j] = c, c, -s, s
        return M

    @property
    def exact(self) -> bool:
        return not self.a.rope or (self.a.head_dim == self.b.head_dim and self.gap == 0.0)

    def describe(self) -> str:
        if not self.a.rope:
            return "free per group"
        if self.exact:
            return "rotary pairs, 2x2 rotations (exact frequencies)"
        return (f"APPROXIMATE: rotary pairs matched by frequency across head widths {self.a.head_dim} -> "
                f"{self.b.head_dim} (largest log-frequency gap {self.gap:.3g}), 2x2 rotations")


def _nuclear(C: Tensor) -> Tensor:
    return torch.linalg.svdvals(C.to(torch.float64)).sum(-1)


def _blocks(C: Tensor, n_a: int, d_a: int, n_b: int, d_b: int) -> Tensor:
    """[n_a d_a, n_b d_b] -> [n_a, n_b, d_a, d_b] per-head blocks."""
    return C.to(torch.float64).cpu().reshape(n_a, d_a, n_b, d_b).permute(0, 2, 1, 3)


def _assign(score: Tensor) -> list[tuple[int, int]]:
    """(row, column) pairs of the max-score assignment of a rectangular matrix."""
    rows, cols = linear_sum_assignment(score.detach().double().cpu().numpy(), maximize=True)
    return [(int(r), int(c)) for r, c in zip(rows.astype(np.int64), cols.astype(np.int64))]


def head_maps(C: dict[str, Tensor], a: Arch, b: Arch, polar_mode: str = "auto") -> tuple[dict[str, Tensor], dict]:
    """Structured maps [d_A, d_B] (float64) for the sites q, k, v, ctx of one layer from their
    cross-covariances ``C`` (same keys), and the layer's head matching for the diagnostics."""
    sa, sb = HeadShape.of(a), HeadShape.of(b)
    if sa.rope != sb.rope:
        raise TransportError(f"theseus: {a.name} and {b.name} disagree on rotary positions")
    da, db, ra, rb = sa.head_dim, sb.head_dim, sa.group_size, sb.group_size
    Cq, Cc = (_blocks(C[s], sa.heads, da, sb.heads, db) for s in ("q", "ctx"))
    Ck, Cv = (_blocks(C[s], sa.groups, da, sb.groups, db) for s in ("k", "v"))
    qk = _QK(sa, sb, polar_mode)
    flat = (sa.heads * sb.heads, da, db)
    per_query = (qk.score(Cq.reshape(flat)) + _nuclear(Cc.reshape(flat))).reshape(sa.heads, sb.heads)
    queries: dict[tuple[int, int], list[tuple[int, int]]] = {}
    S_qk = torch.empty(sa.groups, sb.groups, da, db, dtype=torch.float64)
    S_vo = torch.empty_like(S_qk)
    for ga in range(sa.groups):
        for gb in range(sb.groups):
            sub = per_query[ga * ra:(ga + 1) * ra, gb * rb:(gb + 1) * rb]
            pairs = [(ga * ra + i, gb * rb + j) for i, j in _assign(sub)]
            queries[ga, gb] = pairs
            S_qk[ga, gb] = Ck[ga, gb] + sum(Cq[h, k] for h, k in pairs)
            S_vo[ga, gb] = Cv[ga, gb] + sum(Cc[h, k] for h, k in pairs)
    gflat = (sa.groups * sb.groups, da, db)
    group_score = (qk.score(S_qk.reshape(gflat)) + _nuclear(S_vo.reshape(gflat))).reshape(sa.groups, sb.groups)
    groups = _assign(group_score)
    M_qk = qk.fit(torch.stack([S_qk[ga, gb] for ga, gb in groups]))
    M_vo = polar_batch(torch.stack([S_vo[ga, gb] for ga, gb in groups]), polar_mode)[0].to(torch.float64)
    T = {s: torch.zeros(sa.heads * da if s in ("q", "ctx") else sa.groups * da,
                        sb.heads * db if s in ("q", "ctx") else sb.groups * db, dtype=torch.float64)
         for s in HEAD_SITES}
    group_of = [-1] * sb.groups
    query_of = [[-1] * rb for _ in range(sb.groups)]
    for n, (ga, gb) in enumerate(groups):
        group_of[gb] = ga
        T["k"][ga * da:(ga + 1) * da, gb * db:(gb + 1) * db] = M_qk[n]
        T["v"][ga * da:(ga + 1) * da, gb * db:(gb + 1) * db] = M_vo[n]
        for h, k in queries[ga, gb]:
            T["q"][h * da:(h + 1) * da, k * db:(k + 1) * db] = M_qk[n]
            T["ctx"][h * da:(h + 1) * da, k * db:(k + 1) * db] = M_vo[n]
            query_of[gb][k - gb * rb] = h
    info = {"groups": group_of, "query_heads": query_of, "qk": qk.describe(), "qk_exact": qk.exact,
            "rotary_pairs": len(qk.pairs) if sa.rope else None,
            "rotary_log_frequency_gap": round(qk.gap, 6) if sa.rope else None}
    return T, info


__all__ = ["HEAD_MODES", "HEAD_SITES", "HeadShape", "resolve_heads", "monotone_matching", "rotary_pairs",
           "rotary_log_frequencies", "head_maps"]
