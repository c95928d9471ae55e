"""Rectangular orthogonal Procrustes maps between two models' activation spaces.

Convention: activations are row vectors. ``X_A`` (n x d_A) and ``X_B`` (n x d_B) hold the same n inputs
(tokens) seen by two models. The map ``T`` (d_A x d_B) sends A's coordinates to B's, ``X_A T ~ X_B``.
With the cross-covariance ``C = X_A^T X_B = U S V^T`` (thin SVD), the Procrustes map is the polar
factor ``T = U V^T``: an isometric embedding (``T T^T = I``) when d_A <= d_B, a projection with
orthonormal columns (``T^T T = I``) when d_A > d_B. It maximises ``tr(T^T C)``; when d_A <= d_B it
therefore minimises ``||X_A T - X_B||_F`` over all isometric embeddings.

:class:`CrossCovariance` accumulates ``C`` (and whatever second moments the options need) in float64,
streaming over batches, so activations never have to be stored. :func:`polar` computes the polar
factor either by a thin SVD or, faster, from the eigendecomposition of the smaller Gram matrix.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

Tensor = torch.Tensor

#: up to this larger side 'auto' uses the thin SVD (most accurate; cheap for small maps)
SVD_MAX = 512
#: up to this smaller side 'auto' eigendecomposes in float64 (larger: float32, still orthogonal)
EIGH_FLOAT64_MAX = 1024
#: largest side for which the per-batch products X_A^T X_B run in float64 on a CPU (always on a GPU)
PRODUCT_FLOAT64_MAX = 512
_STAT_ROWS = 1024
#: float32 products are summed in float32 over at most this many rows before joining the float64 total
STAGE_ROWS = 8192


def naive_map(d_a: int, d_b: int, dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu") -> Tensor:
    """The map with no alignment: zero padding when d_A <= d_B, truncation otherwise (``eye(d_A, d_B)``)."""
    return torch.eye(d_a, d_b, dtype=dtype, device=device)


def polar(C: Tensor, mode: str = "auto", reference: Optional[Tensor] = None,
          rank: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Polar factor ``T = U V^T`` of ``C = U S V^T`` (d_A x d_B) and the singular values ``S`` (descending).

    mode: ``'svd'`` (thin SVD in float64), ``'svd32'`` (the same in float32), ``'eigh'``
    (eigendecomposition of the smaller Gram matrix in float64), ``'eigh32'`` (the same in float32) or
    ``'auto'`` (``'svd'`` when both sides are at most :data:`SVD_MAX`, ``'eigh'`` when the smaller side is
    at most :data:`EIGH_FLOAT64_MAX`, else ``'eigh32'``). The eigendecomposition squares the condition
    number: directions with small singular values are less accurate than with the SVD (they carry little
    of the data), which is the price of its speed; in float32 the singular values below about 3e-4 of
    the largest are rounding (see :func:`route_noise`) and their directions' maps less accurate than
    ``'svd32'``'s, though they still come from C (see :func:`null_tol`).

    Where C is (numerically) rank deficient the polar factor is not unique: directions along which C
    adds at most :func:`null_tol` of its largest singular value follow ``reference`` (default: :func:`naive_map`),
    made orthogonal to the determined ones (so ``T == I`` when A == B, whatever the rank). T is float64
    except for ``'svd32'`` and ``'eigh32'`` (float32); it has orthonormal rows or columns to working precision.

    ``rank``: a bound on C's rank known from how it was built (a sum of ``rank`` outer products: the
    calibration rows); the eigh routes then leave out the directions beyond it from the start, which are
    undetermined anyway (the same answer, less work when there are fewer rows than the smaller side).
    """
    if C.dim() != 2:
        raise ValueError(f"polar: C must be a matrix, got shape {tuple(C.shape)}")
    T, S = polar_batch(C.unsqueeze(0), mode, reference, rank)
    return T[0], S[0]


def polar_batch(C: Tensor, mode: str = "auto", reference: Optional[Tensor] = None,
                rank: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """:func:`polar` of a stack of matrices ``C`` [B, d_A, d_B]: T [B, d_A, d_B] and S [B, min(d_A, d_B)].

    Each step is one call over the whole stack (on a CPU torch still factorises the members one after
    the other, so a stack is not faster than a loop there).
    """
    if C.dim() != 3:
        raise ValueError(f"polar_batch: C must be a stack of matrices, got shape {tuple(C.shape)}")
    _, d_a, d_b = C.shape
    if mode == "auto":
        mode = "svd" if max(d_a, d_b) <= SVD_MAX else "eigh" if min(d_a, d_b) <= EIGH_FLOAT64_MAX else "eigh32"
    if mode not in POLAR_MODES:
        raise ValueError(f"polar: unknown mode '{mode}' ({', '.join(POLAR_MODES)})")
    wd = torch.float32 if mode in ("svd32", "eigh32") else torch.float64
    C = C.to(torch.float64)
    ref = naive_map(d_a, d_b, torch.float64, C.device) if reference is None else reference.to(torch.float64)
    if not bool(torch.isfinite(C).all()):
        raise ValueError("polar: C contains NaN or Inf values")
    tol = null_tol(mode, min(d_a, d_b))
    if mode in ("svd", "svd32"):
        factor = _polar_svd
    else:
        def factor(c: Tensor, r: Tensor, t: float) -> tuple[Tensor, Tensor]:
            return _polar_eigh(c, r, t, rank)
    if d_a > d_b:  # work on the transpose: the free directions live on the smaller side
        T, S = factor(C.mT.to(wd), ref.t().to(wd), tol)
        return T.mT.contiguous(), S
    return factor(C.to(wd), ref.to(wd), tol)


def _polar_svd(C: Tensor, ref: Tensor, tol: float) -> tuple[Tensor, Tensor]:
    """Polar factors of C [B, d_a, d_b] (d_a <= d_b) from the thin SVD; directions with
    ``S <= tol * S_max`` follow the reference, made orthogonal to the determined ones."""
    U, S, Vh = torch.linalg.svd(C, full_matrices=False)
    S = S.to(torch.float64)
    null = S <= tol * S[:, :1]
    for b in _rows_with(null):  # free directions: follow the reference
        Vt = Vh[b].clone()
        Vt[null[b]] = U[b][:, null[b]].t() @ ref
        Q, R = torch.linalg.qr(Vt.t())
        Vh[b] = (Q * _signs(R)).t()
    return U @ Vh, S


POLAR_MODES = ("auto", "svd", "svd32", "eigh", "eigh32")
#: directions weaker than this fraction of the strongest count as unmeasured whatever the route (the
#: float64 SVD's own floor, far above its rounding): C sums products of float32 activations
DATA_TOL = 1e-10
#: how far above a route's measured rounding floor a value must be to count as measured
NULL_SAFETY = 4.0


def _eps(mode: str) -> float:
    if mode not in ("svd", "svd32", "eigh", "eigh32"):
        raise ValueError(f"unknown polar route '{mode}'")
    return torch.finfo(torch.float32 if mode.endswith("32") else torch.float64).eps


def route_noise(mode: str, d: int) -> float:
    """What a route promises about S: every singular value it returns lies within this fraction of
    S_max of the exact one, for a C whose smaller side is ``d``.

    The SVD is backward stable: S comes out within about ``d^(1/4) * eps * S_max``. The eigh routes take
    ``S = sqrt(eigenvalue of C C^T)``; the eigenvalues carry the same relative rounding of ``S_max^2``,
    so a zero singular value comes out as large as ``sqrt(d^(1/4) * eps) * S_max`` (float64 ~1.5e-8,
    float32 ~3.5e-4). eps is the working precision's (float32 for 'svd32' and 'eigh32'). On exactly
    rank-deficient C (d = 12..3072, 1 and 2 threads, ``python -m bench.polar_floors``) the zero singular
    values came out at most 0.85 of these floors; the promise is NULL_SAFETY times them.
    """
    floor = max(d, 1) ** 0.25 * _eps(mode)
    return NULL_SAFETY * (floor if mode.startswith("svd") else math.sqrt(floor))


def null_tol(mode: str, d: int) -> float:
    """A direction along which C adds at most this fraction of S_max is undetermined: the map follows
    the reference there. Never below :data:`DATA_TOL`.

    What C adds along a direction is measured from its products, not from S: the SVD routes read it as
    S itself, the eigh routes as ``|R_ii|`` of the QR of ``(U^T C)^T`` (what row i of ``U^T C`` holds
    beyond the stronger rows), whose rounding is that of a matrix product, ``d^(1/4) * eps * S_max``
    (measured at most 0.85 (SVD) and 0.24 (eigh) of that on exactly null directions), not the
    ``sqrt(eps)`` of S = sqrt(eigenvalue). So directions too weak for the eigenvalues to resolve still
    get their map from C, and directions C does not see at all follow the reference on every machine.
    """
    return max(DATA_TOL, NULL_SAFETY * max(d, 1) ** 0.25 * _eps(mode))


def _rows_with(null: Tensor) -> list[int]:
    return [int(b) for b in torch.nonzero(null.any(-1)).flatten()]


def _signs(R: Tensor) -> Tensor:
    s = torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))
    s[s == 0] = 1
    return s


def _polar_eigh(C: Tensor, ref: Tensor, tol: float, rank: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Polar factors of C [B, d_a, d_b] (d_a <= d_b) from ``C C^T = U S^2 U^T``.

    ``W = U^T C = S V^T`` up to rounding; the rows of W that belong to small singular values are
    polluted by the large ones (eigenvector error ~ eps ||C||^2 / gap). A QR factorisation of W^T,
    taken in descending order of S, removes exactly that pollution (Gram-Schmidt against the accurate
    leading rows) and returns orthonormal V; ``T = U V^T`` is then orthogonal to working precision.
    A row with ``|R_ii| <= tol * S_max`` (C adds nothing along u_i beyond the stronger rows) is
    undetermined: it is replaced by ``u_i^T ref`` and the QR is taken again, the determined rows first.
    With ``rank`` r < d_a the rows beyond the r strongest are undetermined from the start (C has rank <= r).
    """
    G = C @ C.mT
    G = 0.5 * (G + G.mT)
    lam, U = torch.linalg.eigh(G)
    del G  # the large temporaries go as soon as they are used: a 4096-wide map's are 64 MB each
    lam, U = lam.flip(-1), U.flip(-1)  # descending
    S = torch.sqrt(lam.clamp_min(0)).to(torch.float64)
    d_a = C.shape[-2]
    r = d_a if rank is None else max(0, min(d_a, int(rank)))
    W = U[..., :r].mT @ C  # [B, r, d_b], row i ~ s_i v_i^T
    Q, R = torch.linalg.qr(W.mT)  # W^T = Q R, Q [B, d_b, r] orthonormal, Gram-Schmidt in order of S
    null = torch.diagonal(R, dim1=-2, dim2=-1).abs().to(torch.float64) <= tol * S[:, :1]
    null = torch.cat([null, null.new_ones(null.shape[0], d_a - r)], -1)
    Q.mul_(_signs(R).unsqueeze(-2))
    del R
    rows = _rows_with(null)
    T = U @ Q.mT if len(rows) < C.shape[0] else torch.empty_like(C)
    for b in rows:  # undetermined directions follow the reference, after the determined ones
        k = int((~null[b]).sum())
        if bool(null[b, k:].all()):
            # the undetermined directions are the weakest ones (the usual case: fewer calibration rows than
            # d_a): Gram-Schmidt keeps the determined columns of Q as they are, so only the reference's
            # rows are orthonormalised against them (what the full QR below gives, at a fraction of its cost)
            T[b] = U[b] @ torch.cat([Q[b][:, :k], _orthonormal_rest(Q[b][:, :k], U[b][:, k:].t() @ ref)], 1).t()
            continue
        det, free = torch.nonzero(~null[b]).flatten(), torch.nonzero(null[b]).flatten()
        Ub = U[b][:, torch.cat([det, free])]
        Wb = torch.cat([W[b][det], Ub[:, k:].t() @ ref])
        Qb, Rb = torch.linalg.qr(Wb.t())
        del Wb
        Qb.mul_(_signs(Rb))
        del Rb
        torch.matmul(Ub, Qb.t(), out=T[b])
        del Ub, Qb
    return T, S


def _orthonormal_rest(Q1: Tensor, rows: Tensor) -> Tensor:
    """Columns [d, m] continuing the orthonormal columns Q1 [d, k] by Gram-Schmidt on ``rows`` [m, d] in order
    (the last m columns of the sign-normalised QR of ``[Q1, rows^T]``); projected out twice for orthogonality."""
    P = rows.t()
    for _ in range(2):
        P = P - Q1 @ (Q1.t() @ P)
    Q2, R2 = torch.linalg.qr(P)
    return Q2 * _signs(R2)


def procrustes_map(C: Tensor, mode: str = "auto", reference: Optional[Tensor] = None) -> Tensor:
    """The Procrustes map ``T = U V^T`` of a cross-covariance ``C = X_A^T X_B`` (see :func:`polar`)."""
    return polar(C, mode, reference)[0]


def matrix_power_sym(G: Tensor, p: float, eps: float) -> Tensor:
    """``(G + eps' I)^p`` for a symmetric PSD G; ``eps' = eps * tr(G) / dim`` (relative regulariser)."""
    d = G.shape[0]
    lam, V = torch.linalg.eigh(0.5 * (G + G.t()))
    reg = eps * float(torch.trace(G)) / max(d, 1)
    lam = lam.clamp_min(0) + max(reg, torch.finfo(G.dtype).tiny)
    return (V * lam.pow(p)) @ V.t()


def resize_tokens(x: Tensor, g_to: int) -> Tensor:
    """[N, 1 + g*g, d] -> [N, 1 + g_to^2, d]: the patch grid resized bilinearly, the class token kept apart."""
    n, t, d = x.shape
    g = math.isqrt(t - 1)
    if g * g != t - 1:
        raise ValueError(f"resize_tokens: {t - 1} patch tokens do not form a square grid")
    if g == g_to:
        return x
    grid = x[:, 1:].reshape(n, g, g, d).permute(0, 3, 1, 2)  # a channels-last view: no copy
    out = torch.nn.functional.interpolate(grid, size=(g_to, g_to), mode="bilinear", align_corners=False)
    return torch.cat([x[:, :1], out.permute(0, 2, 3, 1).reshape(n, g_to * g_to, d)], 1)


@dataclass
class CrossCovariance:
    """Streaming second moments of paired activations (float64): ``C = X_A^T X_B``, column sums and
    squared norms; the Gram matrices ``X_A^T X_A`` / ``X_B^T X_B`` only when asked (shrinking maps and
    whitening need them).

    On a CPU the products of maps wider than :data:`PRODUCT_FLOAT64_MAX` are taken in float32 and
    summed in place in float32 over at most :data:`STAGE_ROWS` rows (what one product over those rows
    would do) before each addition to the float64 total.
    """

    d_a: int
    d_b: int
    gram_a: bool = False
    gram_b: bool = False
    device: str | torch.device = "cpu"
    n: int = 0
    _C: Tensor = field(init=False, repr=False)
    sum_a: Tensor = field(init=False)
    sum_b: Tensor = field(init=False)
    sq_a: Tensor = field(init=False)  # diagonal of X_A^T X_A
    sq_b: Tensor = field(init=False)
    G_a: Optional[Tensor] = field(init=False, default=None)
    G_b: Optional[Tensor] = field(init=False, default=None)
    _staged: dict = field(init=False, default_factory=dict, repr=False)  # name -> [float32 sum, rows in it]

    def __post_init__(self) -> None:
        z = dict(dtype=torch.float64, device=self.device)
        self._C = torch.zeros(self.d_a, self.d_b, **z)
        self.sum_a, self.sum_b = torch.zeros(self.d_a, **z), torch.zeros(self.d_b, **z)
        self.sq_a, self.sq_b = torch.zeros(self.d_a, **z), torch.zeros(self.d_b, **z)
        if self.gram_a:
            self.G_a = torch.zeros(self.d_a, self.d_a, **z)
        if self.gram_b:
            self.G_b = torch.zeros(self.d_b, self.d_b, **z)

    def _product_dtype(self, t: Tensor) -> torch.dtype:
        if t.device.type != "cpu" or max(self.d_a, self.d_b) <= PRODUCT_FLOAT64_MAX or t.dtype == torch.float64:
            return torch.float64
        return torch.float32

    def update(self, xa: Tensor, xb: Tensor) -> None:
        """Add rows ``xa`` [n, d_A], ``xb`` [n, d_B] (row i of both = the same input)."""
        if xa.shape[0] != xb.shape[0] or xa.shape[1] != self.d_a or xb.shape[1] != self.d_b:
            raise ValueError(f"CrossCovariance.update: shapes {tuple(xa.shape)} and {tuple(xb.shape)} "
                             f"do not fit ({self.d_a}, {self.d_b})")
        pd = self._product_dtype(xa)
        self._add("_C", xa.to(pd), xb.to(pd))
        for i in range(0, xa.shape[0], _STAT_ROWS):  # float64 sums, a bounded slice at a time
            a, b = xa[i:i + _STAT_ROWS].to(torch.float64), xb[i:i + _STAT_ROWS].to(torch.float64)
            self.sum_a += a.sum(0)
            self.sum_b += b.sum(0)
            self.sq_a += (a * a).sum(0)
            self.sq_b += (b * b).sum(0)
        if self.G_a is not None:
            self._add("G_a", xa.to(pd), xa.to(pd))
        if self.G_b is not None:
            self._add("G_b", xb.to(pd), xb.to(pd))
        self.n += xa.shape[0]

    def _add(self, name: str, a: Tensor, b: Tensor) -> None:
        """``name += a^T b``: directly in float64, or staged in float32 (see the class docstring)."""
        if a.dtype == torch.float64:
            getattr(self, name).addmm_(a.t(), b)
            return
        stage = self._staged.get(name)
        if stage is None:
            stage = self._staged[name] = [torch.zeros(a.shape[1], b.shape[1], dtype=a.dtype, device=a.device), 0]
        stage[0].addmm_(a.t(), b)
        stage[1] += a.shape[0]
        if stage[1] >= STAGE_ROWS:
            self._flush(name)

    def _flush(self, *names: str) -> None:
        for name in names or list(self._staged):
            stage = self._staged.pop(name, None)
            if stage is not None:
                getattr(self, name).add_(stage[0].to(torch.float64))

    @property
    def C(self) -> Tensor:
        """``X_A^T X_B`` so far (float64)."""
        self._flush("_C")
        return self._C

    # -- moments (optionally centred) ---------------------------------------------------------
    def cross(self, center: bool = False) -> Tensor:
        if center and self.n:
            return self.C - torch.outer(self.sum_a, self.sum_b) / self.n
        return self.C

    def gram(self, side: str, center: bool = False) -> Tensor:
        self._flush("G_a" if side == "a" else "G_b")
        G = self.G_a if side == "a" else self.G_b
        if G is None:
            raise ValueError(f"CrossCovariance: Gram matrix of side {side} was not accumulated")
        s = self.sum_a if side == "a" else self.sum_b
        return G - torch.outer(s, s) / self.n if center and self.n else G

    def sqnorms(self, side: str, center: bool = False) -> Tensor:
        """Per-column squared norms of X_A (side 'a') or X_B ('b')."""
        sq, s = (self.sq_a, self.sum_a) if side == "a" else (self.sq_b, self.sum_b)
        return sq - s * s / self.n if center and self.n else sq

    def target_matrix(self, center: bool = False, whiten: float = 0.0, eps: float = 1e-6) -> Tensor:
        """The matrix whose polar factor is the map: ``C``, or ``(G_A+eps)^-p C (G_B+eps)^-p`` when whitening."""
        C = self.cross(center)
        if whiten:
            C = matrix_power_sym(self.gram("a", center), -whiten, eps) @ C @ matrix_power_sym(
                self.gram("b", center), -whiten, eps)
        return C

    def residual(self, T: Tensor, center: bool = False, isometry: bool = True) -> float:
        """``||X_A T - X_B||_F / ||X_B||_F`` from the accumulated moments (no stored activations).

        ``||X_A T - X_B||^2 = tr(T^T X_A^T X_A T) - 2 tr(T^T C) + ||X_B||^2``; when d_A <= d_B and T is an
        isometric embedding (``isometry``: T T^T = I) the first term is ``||X_A||^2``, else it needs the
        Gram matrix of side a.
        """
        T = T.to(torch.float64).to(self.C.device)
        nb = float(self.sqnorms("b", center).sum())
        if nb <= 0:
            return float("nan")
        d_a, d_b = T.shape
        if d_a <= d_b and isometry:
            na = float(self.sqnorms("a", center).sum())
        elif self.G_a is not None:
            na = float(torch.sum((self.gram("a", center) @ T) * T))
        else:
            raise ValueError("CrossCovariance.residual: this map needs the Gram matrix of side a")
        cross = float(torch.sum(self.cross(center) * T))
        return math.sqrt(max(na - 2 * cross + nb, 0.0) / nb)

    def residual_naive(self, center: bool = False) -> float:
        """The residual of :func:`naive_map` (zero padding / truncation of X_A to d_B columns)."""
        nb = float(self.sqnorms("b", center).sum())
        if nb <= 0:
            return float("nan")
        k = min(self.d_a, self.d_b)
        na = float(self.sqnorms("a", center)[:k].sum())
        cross = float(torch.diagonal(self.cross(center)[:k, :k]).sum())
        return math.sqrt(max(na - 2 * cross + nb, 0.0) / nb)


__all__ = ["CrossCovariance", "polar", "polar_batch", "POLAR_MODES", "procrustes_map", "naive_map", "matrix_power_sym", "resize_tokens",
           "SVD_MAX", "EIGH_FLOAT64_MAX", "PRODUCT_FLOAT64_MAX", "null_tol", "route_noise", "DATA_TOL", "NULL_SAFETY"]
