"""Weight matching (Git Re-Basin style) over residual, MLP and within-head permutations, read off the axis table.

Coordinate ascent on ``sum_t <W_B^t, pi(W_A^t)>``: each variable is solved exactly by a linear assignment
given all the others, in Git Re-Basin's seeded random visiting order or along the chain of spaces, forward
and backward in turn (``order='auto'`` takes the chain when the pair looks like a relabelling: the first
space's units each have one partner standing far above the rest), until a sweep brings no improvement. Heads keep the
group (and query-in-group) order fixed by the spectral level; what is matched inside a heads space are the
within-head orders: one shared by q, k, v and o (``within='shared'``, the paper's), or a q/k order and a
v/o order (``within='separate'``, the larger symmetry group). Under rotary positions the q/k order stays
the identity.

Accelerations that do not change the result: a variable whose neighbours did not change since it was
last solved is not revisited (its similarity, hence its optimum, is unchanged); similarity matrices are
updated by low-rank corrections unless most neighbour columns moved (rebuilt above three quarters), and the
ones kept between visits, within a memory budget, are those dearest to rebuild per byte; an assignment that
takes every row's maximum is optimal, so the solver is skipped for it; large assignments are solved exactly
by :func:`transport.core.assignment.solve_assignment`, warm-started from the variable's previous permutation
and potentials and certified on all edges.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

import torch

from transport.core.arch import Arch
from transport.core.assignment import SPARSE_MIN, lap_max, solve_assignment
from transport.core.layout import param_axes
from transport.core.memory import release_freed
from transport.core.symmetry import (HeadPermutation, Perm, Perms, apply_permutation, axis_index, is_identity,
                                     permutation_spec)
from transport.errors import TransportError

Tensor = torch.Tensor
Progress = Callable[[float, str], None]
WITHIN = ("shared", "separate")
#: visiting orders of a sweep: 'random', a fresh seeded random order per sweep (Git Re-Basin's); 'chain', along
#: the chain of spaces (res:0, heads:0, res:0a, mlp:0, ...), forward and backward in turn; 'auto' (the
#: default), the chain when the pair looks like a relabelling (:func:`match_confidence`), random otherwise
ORDERS = ("auto", "random", "chain")
#: 'auto' walks the chain when the first space's match confidence exceeds this many times sqrt(2 ln n), the
#: level of unrelated models (measured on unrelated random-init and trained pairs: 0.8-0.9 times it; on
#: relabellings, the zoo's shuffled and next-release pairs of width 64: 1.8-1.9 times, full-size towers more)
RELABELLING_FACTOR = 1.5


def match_confidence(S: Tensor) -> float:
    """Median over the rows of an [n, n] similarity of how far each row's best entry stands above the rest of
    its row, (max - mean) / std over the other n - 1 entries (counted in, the best entry would cap the
    value at sqrt(n)). Between unrelated random-init models a row is close to n independent Gaussian
    entries, whose maximum sits near sqrt(2 ln n) standard deviations; when one model is a relabelling of
    the other, even a noisy one, each unit's partner stands out far beyond that."""
    S = S.double()
    n = S.shape[1]
    if n < 3:
        return 0.0
    S = S - S.mean(0, keepdim=True)  # a constant per column cannot change the optimum: taken out
    best = S.max(1).values
    mean = (S.sum(1) - best) / (n - 1)
    var = ((S * S).sum(1) - best * best - (n - 1) * mean * mean) / (n - 2)
    z = (best - mean) / var.clamp_min(0.0).sqrt().clamp_min(1e-300)
    return float(z.median())


def relabelling_threshold(n: int) -> float:
    """The match confidence above which 'auto' takes a pair for a relabelling: RELABELLING_FACTOR sqrt(2 ln n)."""
    return RELABELLING_FACTOR * math.sqrt(2.0 * math.log(max(2, n)))


def check_order(order: str) -> None:
    if order not in ORDERS:
        raise TransportError(f"transfusion: order must be one of {', '.join(ORDERS)}, got {order!r}")


def _no_progress(fraction: float, message: str) -> None:
    return None


@dataclass
class _Part:
    """One (tensor, axis) contribution to a variable's similarity: B as an [n, R * n_r] matrix, A as the same
    (a heads variable) or as its transpose [R * n_r, n] (residual/MLP: the neighbour's permutation then
    gathers contiguous rows of A rather than strided columns).

    ``role``: the role of the tensor's OTHER permuted axis (which index of that neighbour applies).
    ``own``: for a heads variable, the role of this tensor's heads axis."""

    B: Tensor
    A: Tensor
    tiles: int
    role: str
    own: str = ""


@dataclass
class _Var:
    name: str
    kind: str
    size: int
    static: "_Static"  # residual/MLP: the similarity from tensors with no other permuted axis
    head_static: dict[str, Tensor]  # heads: accumulator -> the same, per group [G, d_h, d_h]
    parts: dict[str, list[_Part]]  # neighbour variable -> contributions whose other axis lives there
    S: Optional[Tensor] = None
    seen: dict[str, int] = field(default_factory=dict)  # neighbour versions S was built from
    used: dict[str, Perm] = field(default_factory=dict)  # neighbour perms S was built from
    duals: Optional[Tensor] = None  # column potentials certifying the last solve (warm start of the next)
    cached: Optional[bool] = None  # keeps S between visits (planned within the budget before the first sweep)


@dataclass
class MatchStats:
    sweeps: int = 0
    objective: list[float] = field(default_factory=list)
    solves: int = 0
    solves_skipped: int = 0
    visits_skipped: int = 0
    similarity_s: float = 0.0
    hungarian_s: float = 0.0
    sweeps_s: float = 0.0
    dense_solves: int = 0
    cache_budget: int = 0  # bytes of similarities kept between visits at most
    cached: int = 0  # variables whose similarity is kept (updated incrementally) / rebuilt at each visit
    uncached: int = 0
    order: str = ""  # the visiting order the sweeps used ('auto' resolved)
    confidence: Optional[float] = None  # 'auto': the first space's match confidence, and its threshold
    threshold: Optional[float] = None
    choose_s: float = 0.0  # seconds 'auto' spent choosing
    by_kind: dict = field(default_factory=dict)  # kind -> counters and CPU seconds (benchmarks)


def _mat(t: Tensor, axis: int, other: Optional[int]) -> Tensor:
    """t with ``axis`` first and flattened to [n, -1]; the ``other`` permuted axis (if any) last."""
    rest = [i for i in range(t.dim()) if i != axis and i != other]
    order = [axis] + rest + ([other] if other is not None else [])
    return t.permute(order).reshape(t.shape[axis], -1)


def _mat_t(t: Tensor, axis: int, other: int) -> Tensor:
    """``_mat(t, axis, other).t()`` as a contiguous [-1, n] (a view of t when its layout already is)."""
    rest = [i for i in range(t.dim()) if i != axis and i != other]
    return t.permute(rest + [other, axis]).reshape(-1, t.shape[axis])


def _cols(q: Tensor, idx: Tensor, tiles: int) -> Tensor:
    """Column indices (over all tiles) of units ``idx`` mapped through ``q``."""
    n = q.numel()
    base = torch.arange(tiles, device=q.device)[:, None] * n
    return (base + q[idx][None, :]).reshape(-1)


#: similarities kept between visits for incremental updates: at most this share of one model's bytes, or this
#: floor (ViT-B/16's twelve 3072 x 3072 MLP similarities, 0.45 GB, all stay; an LLM's do not)
CACHE_SHARE = 0.25
CACHE_MIN_BYTES = 512 << 20

#: visits of variables whose similarity has at least this many bytes hand freed memory back to the OS
TRIM_BYTES = 16 << 20

#: tensors above INNER_WHOLE entries have their float64 inner product summed in row slices of about INNER_SLICE
#: entries (small slices: freed memory the allocator keeps stays small too)
INNER_WHOLE = 1 << 24
INNER_SLICE = 1 << 20


#: entries per float64 slice of :func:`_dot64` (2 MB per float64 copy: the copies stay in cache and are reused)
DOT_SLICE = 1 << 18


def _dot64(a: Tensor, b: Tensor) -> float:
    """<a, b> in float64 (products of float32 entries are exact there; only the summation rounds), summed over
    slices of DOT_SLICE entries: a whole tensor's float64 copies would be fresh pages to fault in each time."""
    a, b = a.reshape(-1), b.reshape(-1)
    return sum(float(torch.dot(a[i:i + DOT_SLICE].double(), b[i:i + DOT_SLICE].double()))
               for i in range(0, a.numel(), DOT_SLICE))


def _permuted_inner(name: str, a: Tensor, b: Tensor, perms: Mapping[str, Perm], arch: Arch) -> float:
    """<b, pi(a)> accumulated in float64. A large tensor (an LLM's embedding: 136M entries at 0.5B) is
    permuted and multiplied in row slices, so neither its permuted copy nor its float64 copies exist whole
    (they would be 2.7 GB there)."""
    if a.numel() <= INNER_WHOLE or a.dim() < 2:
        pa = apply_permutation({name: a}, perms, arch)[name]
        return _dot64(pa, b.to(pa.device))
    idx = [axis_index(perms[ax.space], ax.role).to(a.device) if ax is not None and ax.space in perms else None
           for ax in param_axes(arch)[name].axes]
    rows = max(1, INNER_SLICE // (a.numel() // a.shape[0]))
    total = 0.0
    for i in range(0, a.shape[0], rows):
        sl = a[i:i + rows] if idx[0] is None else a.index_select(0, idx[0][i:i + rows])
        for d, ix in enumerate(idx[1:], start=1):
            if ix is not None:
                sl = sl.index_select(d, ix)
        total += _dot64(sl, b[i:i + rows].to(sl.device))
    return total


def matching_objective(theta_A: Mapping[str, Tensor], theta_B: Mapping[str, Tensor], perms: Mapping[str, Perm],
                       arch: Arch) -> float:
    """sum_t <W_B^t, pi(W_A^t)>, the quantity weight matching maximises."""
    perms = {s: p for s, p in perms.items() if not is_identity(p)}  # no gather along an axis that stays put
    return sum(_permuted_inner(k, theta_A[k], theta_B[k], perms, arch) for k in param_axes(arch))


@dataclass
class _Static:
    """A residual/MLP variable's similarity from its tensors with no other permuted axis, sum_t B_t A_t^T.

    Kept as the factors [n, k] of B and A when they have few columns (an MLP's input bias: k = 1, whose dense
    [n, n] outer product would be 64 MB per ViT-L/14 layer), dense otherwise; neither when there is none."""
    dense: Optional[Tensor] = None
    low: Optional[tuple[Tensor, Tensor]] = None

    @classmethod
    def build(cls, terms: list[tuple[Tensor, Tensor, str]], n: int, device: str) -> "_Static":
        if not terms:
            return cls()
        k = sum(mb.shape[1] for mb, _, _ in terms)
        if 2 * k < n:
            return cls(low=(torch.cat([mb for mb, _, _ in terms], 1).to(device),
                            torch.cat([ma for _, ma, _ in terms], 1).to(device)))
        st = torch.zeros(n, n, device=device)
        for mb, ma, _ in terms:
            st += mb @ ma.t()
        return cls(dense=st)

    def matrix(self, n: int, device: str, out: Optional[Tensor] = None) -> Tensor:
        """An [n, n] the caller may add to: ``out`` overwritten when given (its memory reused), else fresh."""
        if self.low is not None:
            return torch.mm(self.low[0], self.low[1].t(), out=out)
        if out is None:
            return torch.zeros(n, n, device=device) if self.dense is None else self.dense.clone()
        return out.zero_() if self.dense is None else out.copy_(self.dense)


class WeightMatcher:
    """Coordinate ascent on the weight-matching objective over residual, MLP and within-head permutations.

    ``groups[l]`` is layer l's fixed head order (a :class:`HeadPermutation` whose within-head parts are
    ignored): which old key/value group and query heads each new one takes.
    """

    def __init__(self, theta_A: Mapping[str, Tensor], theta_B: Mapping[str, Tensor], arch: Arch,
                 groups: dict[int, HeadPermutation], device: str = "cpu", within: str = "shared",
                 cache_budget: Optional[int] = None):
        if within not in WITHIN:
            raise TransportError(f"transfusion: within must be one of {', '.join(WITHIN)}, got {within!r}")
        self.arch, self.device = arch, device
        self.within = "separate" if arch.position == "rope" else within  # q/k order fixed: v/o matched alone
        self.spec = permutation_spec(arch)
        info = param_axes(arch)
        G, dh = arch.kv_heads, arch.head_dim
        A = {k: v.to(device, torch.float32) for k, v in theta_A.items()}
        B = {k: v.to(device, torch.float32) for k, v in theta_B.items()}
        self.A, self.B = A, B
        self.perms: Perms = {}
        self.version: dict[str, int] = {}
        self.vars: dict[str, _Var] = {}
        for s, v in self.spec.items():
            parts: dict[str, list[_Part]] = {}
            static: dict[str, list[tuple[Tensor, Tensor, str]]] = {}
            for name, ax, role in v.uses:
                axes = info[name].axes
                others = [i for i, a in enumerate(axes) if a is not None and a.space is not None and i != ax]
                if len(others) > 1:
                    raise TransportError(f"{arch.name}: tensor {name} has more than two permuted axes")
                o = others[0] if others else None
                mb = _mat(B[name], ax, o)
                if o is None:
                    static.setdefault(self._acc(role), []).append((mb, _mat(A[name], ax, o), role))
                else:
                    nb = axes[o].space
                    n_other = B[name].shape[o]
                    ma = _mat(A[name], ax, o) if v.kind == "heads" else _mat_t(A[name], ax, o)
                    parts.setdefault(nb, []).append(_Part(mb, ma, mb.shape[1] // n_other, axes[o].role, role))
            if v.kind == "heads":
                hp = groups[v.layer].to(device)
                self.perms[s] = HeadPermutation(hp.kv, hp.q, torch.arange(dh, device=device).repeat(G, 1),
                                                torch.arange(dh, device=device).repeat(G, 1))
                acc = {}
                for key, lst in static.items():
                    st = torch.zeros(G, dh, dh, device=device)
                    for mb, ma, role in lst:
                        st += self._head_block(mb, ma, role, self.perms[s])
                    acc[key] = st
                self.vars[s] = _Var(s, v.kind, v.size, _Static(), acc, parts)
            else:
                self.perms[s] = torch.arange(v.size, device=device)
                self.vars[s] = _Var(s, v.kind, v.size, _Static.build(static.get("all", []), v.size, device), {},
                                    parts)
            self.version[s] = 0
        self.stats = MatchStats()
        model_bytes = sum(t.numel() * t.element_size() for t in A.values())
        self.cache_budget = (max(CACHE_MIN_BYTES, int(CACHE_SHARE * model_bytes)) if cache_budget is None
                             else int(cache_budget))
        self.stats.cache_budget = self.cache_budget
        self.cache_bytes = 0
        self._scratch: Optional[Tensor] = None

    def _acc(self, role: str) -> str:
        """The similarity accumulator a heads-axis role feeds: one for all roles, or the q/k and v/o orders."""
        if self.within == "shared" or role not in ("q", "k", "v", "o"):
            return "all"
        return "qk" if role in ("q", "k") else "vo"

    def _index(self, space: str, role: str) -> Tensor:
        return axis_index(self.perms[space], role)

    def _head_block(self, mb: Tensor, ma: Tensor, role: str, hp: HeadPermutation) -> Tensor:
        """[G, d_h, d_h]: per group, sum over its heads of B's head rows times A's matching head rows^T."""
        G, dh = self.arch.kv_heads, self.arch.head_dim
        ar = torch.arange(dh, device=mb.device)
        if role in ("k", "v"):
            rows = (hp.kv[:, None] * dh + ar).reshape(-1)
            return torch.bmm(mb.reshape(G, dh, -1), ma[rows].reshape(G, dh, -1).transpose(1, 2))
        heads = hp.query_heads().reshape(-1)
        rows = (heads[:, None] * dh + ar).reshape(-1)
        blocks = torch.bmm(mb.reshape(heads.numel(), dh, -1), ma[rows].reshape(heads.numel(), dh, -1).transpose(1, 2))
        return blocks if self.arch.group_size == 1 else blocks.reshape(G, -1, dh, dh).sum(1)

    # -- similarity ---------------------------------------------------------------------------
    def _heads_similarity(self, v: _Var) -> dict[str, Tensor]:
        hp = self.perms[v.name]
        S = {k: t.clone() for k, t in v.head_static.items()}
        for r, parts in v.parts.items():
            for p in parts:
                q = self._index(r, p.role)
                cols = _cols(q, torch.arange(q.numel(), device=q.device), p.tiles)
                key = self._acc(p.own)
                block = self._head_block(p.B, p.A[:, cols], p.own, hp)
                S[key] = S[key] + block if key in S else block
        return S

    def _similarity(self, v: _Var, incremental: bool) -> Tensor:
        """[n, n] similarity of a residual/MLP variable given the current neighbour perms.

        Incremental: S = sum_c B[:, c] A[:, q(c)]^T, so when q moves on a set of units only those columns
        are exchanged: S += B[:, moved] (A[:, q_new(moved)] - A[:, q_old(moved)])^T.
        """
        if v.S is not None and incremental:  # most units moved: a rebuild costs less than the correction
            moved = sum(int((self._index(r, p.role) != axis_index(v.used[r], p.role)).sum())
                        for r, parts in v.parts.items() for p in parts)
            total = sum(self._index(r, p.role).numel() for r, parts in v.parts.items() for p in parts)
            incremental = 4 * moved < 3 * total
        if v.S is None or not incremental:
            S = v.static.matrix(v.size, self.device, v.S)  # a kept similarity's memory is reused
            for r, parts in v.parts.items():
                for p in parts:
                    q = self._index(r, p.role)
                    cols = _cols(q, torch.arange(q.numel(), device=q.device), p.tiles)
                    S.addmm_(p.B, torch.index_select(p.A, 0, cols, out=self._gather_buffer(p.A)))
            return S
        S = v.S
        for r, parts in v.parts.items():
            for p in parts:
                q, old = self._index(r, p.role), axis_index(v.used[r], p.role)
                moved = torch.nonzero(q != old).flatten()
                if moved.numel() == 0:
                    continue
                n = q.numel()
                own = (torch.arange(p.tiles, device=q.device)[:, None] * n + moved[None, :]).reshape(-1)
                new_c, old_c = _cols(q, moved, p.tiles), _cols(old, moved, p.tiles)
                S.addmm_(p.B[:, own], p.A.index_select(0, new_c) - p.A.index_select(0, old_c))
        return S

    def _gather_buffer(self, a: Tensor) -> Tensor:
        """Scratch of a's shape and dtype for a row gather, from one buffer kept across visits (sized by the
        largest gather so far): a fresh temporary of that size would be fresh pages to fault in at every visit."""
        n = a.numel()
        if self._scratch is None or self._scratch.numel() < n or self._scratch.dtype != a.dtype:
            self._scratch = torch.empty(n, dtype=a.dtype, device=a.device)
        return self._scratch[:n].view(a.shape)

    # -- one variable -------------------------------------------------------------------------
    def _plan_cache(self) -> None:
        """Which residual/MLP similarities are kept between visits (the rest are rebuilt at each visit): within
        the budget, those dearest to rebuild per byte first. A rebuild of an [n, n] similarity costs
        2 n^2 k flops for its k neighbour columns and keeping it costs 4 n^2 bytes, so the order is by k: a
        0.5B LLM's residual segments (k = 10624 over 3.2 MB each) before its MLPs (k = 2688 over 95 MB)."""
        def columns(v: _Var) -> int:
            return sum(p.B.shape[1] for parts in v.parts.values() for p in parts)

        if any(v.cached is not None for v in self.vars.values()):
            return
        for v in sorted((v for v in self.vars.values() if v.kind != "heads"), key=lambda v: -columns(v)):
            size = v.size * v.size * 4  # float32
            v.cached = self.cache_bytes + size <= self.cache_budget
            self.cache_bytes += size if v.cached else 0
            self.stats.cached += int(v.cached)
            self.stats.uncached += int(not v.cached)

    def _may_cache(self, v: _Var) -> bool:
        """Whether v keeps its similarity for incremental updates (planned by :meth:`_plan_cache`)."""
        return bool(v.cached)

    def _neighbours_changed(self, v: _Var) -> bool:
        return any(self.version[r] != v.seen.get(r, -1) for r in v.parts)

    def visit(self, name: str, accelerate: bool = True) -> float:
        """Solve variable ``name`` given all the others; returns the objective gain."""
        v = self.vars[name]
        if accelerate and v.seen and not self._neighbours_changed(v):
            self.stats.visits_skipped += 1
            return 0.0
        t0, c0 = time.perf_counter(), time.process_time()
        if v.kind == "heads":
            S_heads = self._heads_similarity(v)
        else:
            S = self._similarity(v, incremental=accelerate)
            v.S = S if accelerate and self._may_cache(v) else None
        v.seen = {r: self.version[r] for r in v.parts}
        v.used = {r: self.perms[r].clone() for r in v.parts}
        t1, c1 = time.perf_counter(), time.process_time()
        self.stats.similarity_s += t1 - t0
        cur = self.perms[name]
        if v.kind == "heads":
            gain, new = self._solve_heads(S_heads, cur, accelerate)
            changed = new is not None and not new.equal(cur)
        else:
            gain, new = self._solve(S, cur, accelerate, v)
            changed = new is not None and not torch.equal(new, cur)
        self.stats.hungarian_s += time.perf_counter() - t1
        bk = self.stats.by_kind.setdefault(v.kind, {"visits": 0, "changes": 0, "similarity_cpu": 0.0,
                                                     "solve_cpu": 0.0})
        bk["visits"] += 1
        bk["similarity_cpu"] += c1 - c0
        bk["solve_cpu"] += time.process_time() - c1
        if changed:
            bk["changes"] += 1
            self.perms[name] = new
            self.version[name] += 1
        if v.kind != "heads" and v.size * v.size * 4 >= TRIM_BYTES:
            release_freed()  # this visit's large temporaries (similarity, candidates) leave the resident set
        return gain

    def _solve(self, S: Tensor, cur: Tensor, accelerate: bool,
               v: Optional[_Var] = None) -> tuple[float, Optional[Tensor]]:
        n = S.shape[0]
        if accelerate and n < SPARSE_MIN and torch.equal(S.argmax(1), cur):
            self.stats.solves_skipped += 1  # every row takes its maximum: the current perm is optimal
            return 0.0, None
        self.stats.solves += 1
        if accelerate and n >= SPARSE_MIN:
            new, duals, dense = solve_assignment(S, cur, v.duals if v is not None else None)
            if v is not None:
                v.duals = duals
            self.stats.dense_solves += int(dense)
        else:
            new = lap_max(S).to(cur.device)
        rows = torch.arange(n, device=S.device)
        gain = float(S[rows, new].double().sum() - S[rows, cur].double().sum())
        if gain <= 0.0:  # ties or rounding: keep the current perm (never move without strict improvement)
            return 0.0, None
        return gain, new

    def _solve_orders(self, S: Tensor, cur: Tensor, accelerate: bool) -> tuple[float, Tensor]:
        """Per group, the within-head order maximising its [d_h, d_h] similarity (warm: the current one)."""
        out, gain = cur.clone(), 0.0
        for g in range(S.shape[0]):
            dg, new = self._solve(S[g], cur[g].to(S.device), accelerate)
            if new is not None:
                out[g] = new.to(out.device)
                gain += dg
        return gain, out

    def _solve_heads(self, S: dict[str, Tensor], cur: HeadPermutation,
                     accelerate: bool) -> tuple[float, Optional[HeadPermutation]]:
        if self.within == "shared":
            gain, rho = self._solve_orders(S["all"], cur.qk, accelerate)
            return gain, HeadPermutation(cur.kv, cur.q, rho, rho.clone())
        gain, qk = (0.0, cur.qk) if self.arch.position == "rope" or "qk" not in S \
            else self._solve_orders(S["qk"], cur.qk, accelerate)
        g_vo, vo = self._solve_orders(S["vo"], cur.vo, accelerate) if "vo" in S else (0.0, cur.vo)
        return gain + g_vo, HeadPermutation(cur.kv, cur.q, qk, vo)

    # -- objective and loop -------------------------------------------------------------------
    def objective(self, perms: Optional[Mapping[str, Perm]] = None) -> float:
        """sum over canonical tensors of <W_B, pi(W_A)> (float64 accumulation)."""
        return matching_objective(self.A, self.B, self.perms if perms is None else perms, self.arch)

    def within_heads(self) -> float:
        """One within-head matching pass for every block (always run, whatever max_iter is)."""
        gain = 0.0
        for s, v in self.vars.items():
            if v.kind == "heads":
                gain += self.visit(s, accelerate=False)
        return gain

    def choose_order(self) -> str:
        """'chain' when the first space of the chain (the embeddings' residual space) matches on its own, from
        its tensors with no other permuted axis (embeddings, norms, biases), with a confidence no pair of
        unrelated models reaches; else 'random'. 'auto' is exactly one of the two."""
        t0 = time.perf_counter()
        v = self.vars[next(iter(self.vars))]
        S = v.static.matrix(v.size, self.device)
        self.stats.confidence, self.stats.threshold = match_confidence(S), relabelling_threshold(v.size)
        self.stats.choose_s = time.perf_counter() - t0
        return "chain" if self.stats.confidence > self.stats.threshold else "random"

    def run(self, max_iter: int = 100, seed: int = 0, accelerate: bool = True,
            progress: Progress = _no_progress, order: str = "auto") -> MatchStats:
        """Sweeps until one changes nothing. ``order`` 'chain': odd sweeps walk the chain of spaces forward,
        even ones backward, so what one space learns reaches every other space in the same sweep (a planted
        permutation is found in one sweep and certified by the next; a seeded random order moves it about
        two links per sweep: 13 sweeps on ViT-B/16). 'random': Git Re-Basin's seeded random order per sweep.
        'auto': :meth:`choose_order` picks one of the two."""
        check_order(order)
        if accelerate:
            self._plan_cache()
        t0 = time.perf_counter()
        obj = self.objective()
        obj += self.within_heads()
        self.stats.objective.append(obj)
        if order == "auto":
            order = self.choose_order()
        self.stats.order = order
        g = torch.Generator().manual_seed(int(seed))
        names = list(self.vars)  # chain order (permutation_spec's)
        for it in range(int(max_iter)):
            if order == "random":
                visits = [names[i] for i in torch.randperm(len(names), generator=g).tolist()]
            else:
                visits = names if it % 2 == 0 else names[::-1]
            before = dict(self.version)
            gain = 0.0
            for s in visits:
                gain += self.visit(s, accelerate)
            obj += gain
            self.stats.sweeps += 1
            self.stats.objective.append(obj)
            progress(min(1.0, (it + 1) / max(1, max_iter)), f"weight matching: sweep {it + 1} ({order} order), "
                     f"objective {obj:.6g}")
            if before == self.version or gain <= 1e-12:
                break
        self.stats.sweeps_s = time.perf_counter() - t0
        return self.stats


__all__ = ["WeightMatcher", "MatchStats", "WITHIN", "ORDERS", "RELABELLING_FACTOR", "check_order", "match_confidence",
           "relabelling_threshold", "matching_objective", "lap_max"]
