"""TransFusion: re-basin of a task vector by permutation (Rinaldi et al., ICML 2025, arXiv:2505.22697).

``prepare`` aligns the source pretrained theta_A to the target pretrained theta_B of the same
architecture; tau plays no part and, with the default weight matching, no data is used:

1. head assignment per block from the singular-value spectra of each head's Q, K, V rows and O columns
   (cost = sum of unsquared L2 distances of the sorted spectra; Hungarian);
2. within-head permutations (shared by Q/K/V/O of a head), the 2L+1 residual permutations and the L MLP
   permutations by weight matching: coordinate ascent on sum_t <W_B^t, pi(W_A^t)>, each variable solved
   exactly by a linear assignment given all the others, in a seeded visiting order.

``apply`` returns alpha * pi(tau) in the target's canonical names: a pure gather, linear and norm-preserving.

Weight matching is accelerated without changing its result: a variable whose neighbours did not change
since it was last solved is not revisited (its similarity, hence its optimum, is unchanged); similarity
matrices are updated by low-rank corrections when few neighbour units moved; an assignment that takes every
row's maximum is optimal, so the solver is skipped for it; large assignments are solved exactly by
``transport.assignment.solve_assignment``, warm-started from the variable's previous permutation and
potentials and certified on all edges.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional

import numpy as np
import torch

from transport.arch import ViTArch, check_params, param_axes, res_in
from transport.assignment import SPARSE_MIN as _SPARSE_MIN
from transport.assignment import lap_max as _lap_max
from transport.assignment import lap_min_cost as _lap_min_cost
from transport.assignment import solve_assignment  # noqa: F401  (re-exported)
from transport.errors import TransportError
from transport.methods import MethodInfo, Progress, TransportInputs, no_progress
from transport.permutation import (Perms, apply_permutation, check_permutations, fixed_points,
                                   head_axis_permutation, permutation_spec, residual_names, split_head_permutation)
from transport.task_vector import TaskVector

Tensor = torch.Tensor

OPTIONS = {"matching": "weight", "max_iter": 100, "seed": 0, "calibration": 128}
MATCHINGS = ("weight", "activation")


# ----------------------------------------------------------------------------------------------
# level 1: spectral head assignment
# ----------------------------------------------------------------------------------------------
def head_blocks(params: Mapping[str, Tensor], arch: ViTArch, layer: int) -> Tensor:
    """[4, H, d_h, d]: each head's rows of Q, K, V and its columns of O (transposed), via the axis table."""
    info = param_axes(arch)
    H, dh, hs = arch.heads, arch.head_dim, f"heads:{layer}"
    out = []
    for block in ("Q", "K", "V", "O"):
        name = next(n for n, i in info.items() if i.layer == layer and i.block == block and not i.is_bias)
        ax = info[name].axes.index(hs)
        w = params[name].movedim(ax, 0)
        out.append(w.reshape(H, dh, -1))
    return torch.stack(out)


def head_spectra(params: Mapping[str, Tensor], arch: ViTArch, device: str = "cpu") -> Tensor:
    """[L, 4, H, d_h] singular values (descending) of every head block of every layer."""
    out = []
    for l in range(arch.layers):
        x = head_blocks(params, arch, l).to(device, torch.float64)
        # singular values via the small d_h x d_h Gram matrices (d_h << d): sqrt of their eigenvalues
        ev = torch.linalg.eigvalsh(x @ x.transpose(-1, -2))
        out.append(ev.clamp_min(0).sqrt().flip(-1))
    return torch.stack(out)


def head_cost(spec_B: Tensor, spec_A: Tensor) -> Tensor:
    """C[i, j] = sum over Q, K, V, O of ||s_B(i) - s_A(j)||_2, for spectra [4, H, d_h] of one layer."""
    diff = spec_B[:, :, None, :].double() - spec_A[:, None, :, :].double()
    return diff.norm(dim=-1).sum(0)


def assign_heads(C: Tensor) -> tuple[Tensor, list[float]]:
    """Hungarian head permutation sigma (new head i takes old head sigma[i]) and per-head margins.

    margin[i] = increase of the total assignment cost when target head i is forbidden its chosen source
    head (0 means an equally good alternative exists: the assignment of that head is not determined).
    """
    Cn = C.double().cpu().numpy()
    sigma, best = _lap_min_cost(Cn)
    big = (np.abs(Cn).max() + 1.0) * (len(Cn) + 1)
    margins = []
    for i in range(len(Cn)):
        if len(Cn) == 1:
            margins.append(float("inf"))
            continue
        Cf = Cn.copy()
        Cf[i, sigma[i]] = big
        _, alt = _lap_min_cost(Cf)
        margins.append(max(0.0, alt - best))
    return torch.from_numpy(sigma.astype(np.int64)), margins


# ----------------------------------------------------------------------------------------------
# level 2: weight matching
# ----------------------------------------------------------------------------------------------
@dataclass
class _Part:
    """One (tensor, axis) contribution to a variable's similarity, as [n, R * n_r] matrices of B and A."""

    B: Tensor
    A: Tensor
    tiles: int


@dataclass
class _Var:
    name: str
    kind: str
    size: int
    static: Tensor  # similarity from tensors with no other permuted axis ([n, n], or [H, d_h, d_h] for heads)
    parts: dict[str, list[_Part]]  # neighbour variable -> contributions whose other axis lives there
    S: Optional[Tensor] = None
    seen: dict[str, int] = field(default_factory=dict)  # neighbour versions S was built from
    used: dict[str, Tensor] = field(default_factory=dict)  # neighbour perms S was built from
    duals: Optional[Tensor] = None  # column potentials certifying the last solve (warm start of the next)


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
    by_kind: dict = field(default_factory=dict)  # kind -> counters and CPU seconds (benchmarks)


def _mat(t: Tensor, axis: int, other: Optional[int]) -> Tensor:
    """t with ``axis`` first and flattened to [n, -1]; the ``other`` permuted axis (if any) last."""
    rest = [i for i in range(t.dim()) if i != axis and i != other]
    order = [axis] + rest + ([other] if other is not None else [])
    return t.permute(order).reshape(t.shape[axis], -1)


class WeightMatcher:
    """Coordinate ascent on the weight-matching objective over residual, MLP and within-head permutations."""

    def __init__(self, theta_A: Mapping[str, Tensor], theta_B: Mapping[str, Tensor], arch: ViTArch,
                 sigma: dict[int, Tensor], device: str = "cpu"):
        self.arch, self.device = arch, device
        self.spec = permutation_spec(arch)
        info = param_axes(arch)
        H, dh = arch.heads, arch.head_dim
        self.sigma = {l: s.to(device) for l, s in sigma.items()}
        A = {k: v.to(device, torch.float32) for k, v in theta_A.items()}
        B = {k: v.to(device, torch.float32) for k, v in theta_B.items()}
        self.A, self.B = A, B
        self.perms: Perms = {}
        self.version: dict[str, int] = {}
        self.vars: dict[str, _Var] = {}
        for s, v in self.spec.items():
            parts: dict[str, list[_Part]] = {}
            static_B, static_A = [], []
            for name, ax in v.uses:
                others = [i for i, sp in enumerate(info[name].axes) if sp is not None and i != ax]
                if len(others) > 1:
                    raise TransportError(f"{arch.name}: tensor {name} has more than two permuted axes")
                o = others[0] if others else None
                mb, ma = _mat(B[name], ax, o), _mat(A[name], ax, o)
                if o is None:
                    static_B.append(mb)
                    static_A.append(ma)
                else:
                    r = info[name].axes[o]
                    parts.setdefault(r, []).append(_Part(mb, ma, mb.shape[1] // self.spec[r].size))
            if v.kind == "heads":
                l = v.layer
                rows = self._sigma_rows(l)
                st = torch.zeros(H, dh, dh, device=device)
                for mb, ma in zip(static_B, static_A):
                    st += torch.bmm(mb.reshape(H, dh, -1), ma[rows].reshape(H, dh, -1).transpose(1, 2))
                self.perms[s] = head_axis_permutation(self.sigma[l].cpu(), torch.arange(dh).repeat(H, 1), arch).to(device)
            else:
                st = torch.zeros(v.size, v.size, device=device)
                for mb, ma in zip(static_B, static_A):
                    st += mb @ ma.t()
                self.perms[s] = torch.arange(v.size, device=device)
            self.version[s] = 0
            self.vars[s] = _Var(s, v.kind, v.size, st, parts)
        self.stats = MatchStats()

    def _sigma_rows(self, layer: int) -> Tensor:
        dh = self.arch.head_dim
        return (self.sigma[layer][:, None] * dh + torch.arange(dh, device=self.device)).reshape(-1)

    @staticmethod
    def _cols(q: Tensor, idx: Tensor, tiles: int) -> Tensor:
        """Column indices (over all tiles) of units ``idx`` mapped through ``q``."""
        n = q.numel()
        base = torch.arange(tiles, device=q.device)[:, None] * n
        return (base + q[idx][None, :]).reshape(-1)

    # -- similarity ---------------------------------------------------------------------------
    def _heads_similarity(self, v: _Var) -> Tensor:
        H, dh = self.arch.heads, self.arch.head_dim
        layer = int(v.name.split(":")[1])
        rows = self._sigma_rows(layer)
        S = v.static.clone()
        for r, parts in v.parts.items():
            q = self.perms[r]
            for p in parts:
                cols = self._cols(q, torch.arange(q.numel(), device=q.device), p.tiles)
                a = p.A[rows][:, cols]
                S += torch.bmm(p.B.reshape(H, dh, -1), a.reshape(H, dh, -1).transpose(1, 2))
        return S

    def _similarity(self, v: _Var, incremental: bool) -> Tensor:
        """[n, n] similarity of a residual/MLP variable given the current neighbour perms.

        Incremental: S = sum_c B[:, c] A[:, q(c)]^T, so when q moves on a set of units only those columns
        are exchanged: S += B[:, moved] (A[:, q_new(moved)] - A[:, q_old(moved)])^T.
        """
        if v.S is not None and incremental:  # most units moved: a rebuild costs less than the correction
            moved = sum(int((self.perms[r] != v.used[r]).sum()) for r in v.parts)
            incremental = 2 * moved < sum(self.perms[r].numel() for r in v.parts)
        if v.S is None or not incremental:
            S = v.static.clone()
            for r, parts in v.parts.items():
                q = self.perms[r]
                for p in parts:
                    cols = self._cols(q, torch.arange(q.numel(), device=q.device), p.tiles)
                    S.addmm_(p.B, p.A[:, cols].t())
            return S
        S = v.S
        for r, parts in v.parts.items():
            q, old = self.perms[r], v.used[r]
            moved = torch.nonzero(q != old).flatten()
            if moved.numel() == 0:
                continue
            n = q.numel()
            for p in parts:
                own = (torch.arange(p.tiles, device=q.device)[:, None] * n + moved[None, :]).reshape(-1)
                new_c, old_c = self._cols(q, moved, p.tiles), self._cols(old, moved, p.tiles)
                S.addmm_(p.B[:, own], (p.A[:, new_c] - p.A[:, old_c]).t())
        return S

    # -- one variable -------------------------------------------------------------------------
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
            S = self._heads_similarity(v)
        else:
            S = self._similarity(v, incremental=accelerate)
            v.S = S if accelerate else None
        v.seen = {r: self.version[r] for r in v.parts}
        v.used = {r: self.perms[r].clone() for r in v.parts}
        t1, c1 = time.perf_counter(), time.process_time()
        self.stats.similarity_s += t1 - t0
        cur = self.perms[name]
        if v.kind == "heads":
            gain, new = self._solve_heads(v, S, cur, accelerate)
        else:
            gain, new = self._solve(S, cur, accelerate, v)
        self.stats.hungarian_s += time.perf_counter() - t1
        bk = self.stats.by_kind.setdefault(v.kind, {"visits": 0, "changes": 0, "similarity_cpu": 0.0,
                                                     "solve_cpu": 0.0})
        bk["visits"] += 1
        bk["similarity_cpu"] += c1 - c0
        bk["solve_cpu"] += time.process_time() - c1
        if new is not None and not torch.equal(new, cur):
            bk["changes"] += 1
            self.perms[name] = new
            self.version[name] += 1
        return gain

    def _solve(self, S: Tensor, cur: Tensor, accelerate: bool, v: Optional[_Var] = None) -> tuple[float, Optional[Tensor]]:
        n = S.shape[0]
        if accelerate and n < _SPARSE_MIN and torch.equal(S.argmax(1), cur):
            self.stats.solves_skipped += 1  # every row takes its maximum: the current perm is optimal
            return 0.0, None
        self.stats.solves += 1
        if accelerate and n >= _SPARSE_MIN:
            new, duals, dense = solve_assignment(S, cur, v.duals if v is not None else None)
            if v is not None:
                v.duals = duals
            self.stats.dense_solves += int(dense)
        else:
            new = _lap_max(S).to(cur.device)
        rows = torch.arange(n, device=S.device)
        gain = float(S[rows, new].double().sum() - S[rows, cur].double().sum())
        if gain <= 0.0:  # ties or rounding: keep the current perm (never move without strict improvement)
            return 0.0, None
        return gain, new

    def _solve_heads(self, v: _Var, S: Tensor, cur: Tensor, accelerate: bool) -> tuple[float, Optional[Tensor]]:
        H, dh = self.arch.heads, self.arch.head_dim
        layer = int(v.name.split(":")[1])
        sigma, rho = split_head_permutation(cur.cpu(), self.arch)
        rho = rho.clone()
        gain = 0.0
        for h in range(H):
            g, new = self._solve(S[h], rho[h].to(S.device), accelerate)
            if new is not None:
                rho[h] = new.cpu()
                gain += g
        return gain, head_axis_permutation(self.sigma[layer].cpu(), rho, self.arch).to(self.device)

    # -- objective and loop -------------------------------------------------------------------
    def objective(self, perms: Optional[Mapping[str, Tensor]] = None) -> float:
        """sum over canonical tensors of <W_B, pi(W_A)> (float64 accumulation)."""
        return matching_objective(self.A, self.B, self.perms if perms is None else perms, self.arch)

    def within_heads(self) -> float:
        """One within-head matching pass for every block (always run, whatever max_iter is)."""
        gain = 0.0
        for s, v in self.vars.items():
            if v.kind == "heads":
                gain += self.visit(s, accelerate=False)
        return gain

    def run(self, max_iter: int = 100, seed: int = 0, accelerate: bool = True,
            progress: Progress = no_progress) -> MatchStats:
        t0 = time.perf_counter()
        obj = self.objective()
        obj += self.within_heads()
        self.stats.objective.append(obj)
        g = torch.Generator().manual_seed(int(seed))
        names = list(self.vars)
        for it in range(int(max_iter)):
            order = [names[i] for i in torch.randperm(len(names), generator=g).tolist()]
            before = dict(self.version)
            gain = 0.0
            for s in order:
                gain += self.visit(s, accelerate)
            obj += gain
            self.stats.sweeps += 1
            self.stats.objective.append(obj)
            progress(min(1.0, (it + 1) / max(1, max_iter)), f"weight matching: sweep {it + 1}, objective {obj:.6g}")
            if before == self.version or gain <= 1e-12:
                break
        self.stats.sweeps_s = time.perf_counter() - t0
        return self.stats


def matching_objective(theta_A: Mapping[str, Tensor], theta_B: Mapping[str, Tensor], perms: Mapping[str, Tensor],
                       arch: ViTArch) -> float:
    """sum_t <W_B^t, pi(W_A^t)>, the quantity weight matching maximises."""
    total = 0.0
    for k in param_axes(arch):
        a = apply_permutation({k: theta_A[k]}, perms, arch)[k]
        total += float((a.double() * theta_B[k].to(a.device).double()).sum())
    return total


# ----------------------------------------------------------------------------------------------
# activation matching (optional; needs calibration images)
# ----------------------------------------------------------------------------------------------
def _activation_sites(arch: ViTArch) -> dict[str, list[tuple[str, str]]]:
    """Variable -> recorded (module, 'in'|'out') activations that live in its space."""
    L = arch.layers
    sites: dict[str, list[tuple[str, str]]] = {"res:0": [("blocks.0.ln1", "in")]}
    for l in range(L):
        b = f"blocks.{l}"
        sites[f"heads:{l}"] = [(f"{b}.attn.q", "out"), (f"{b}.attn.k", "out"), (f"{b}.attn.v", "out"),
                               (f"{b}.attn.o", "in")]
        sites[f"res:{l}a"] = [(f"{b}.ln2", "in")]
        sites[f"mlp:{l}"] = [(f"{b}.mlp.fc2", "in")]
        sites[f"res:{l}m"] = [(f"blocks.{l + 1}.ln1", "in")] if l + 1 < L else [("ln_post", "in")]
    return sites


def activation_similarity(theta_A: Mapping[str, Tensor], theta_B: Mapping[str, Tensor], arch: ViTArch,
                          images01: Tensor, device: str = "cpu", batch_size: int = 64) -> dict[str, Tensor]:
    """Per variable, the [n, n] correlation between units of B (rows) and A (columns) on the same images."""
    from transport.functional import encode, preprocess

    sites = _activation_sites(arch)
    wanted = {(m, io): s for s, lst in sites.items() for m, io in lst}
    spec = permutation_spec(arch)
    acc: dict[str, dict[str, Tensor]] = {}
    pa = {k: v.to(device, torch.float32) for k, v in theta_A.items()}
    pb = {k: v.to(device, torch.float32) for k, v in theta_B.items()}
    for i in range(0, len(images01), batch_size):
        x = preprocess(arch, images01[i:i + batch_size].to(device))
        rec: dict[str, dict[tuple[str, str], Tensor]] = {"A": {}, "B": {}}
        for tag, p in (("A", pa), ("B", pb)):
            def hook(name: str, xin: Tensor, yout: Tensor, tag: str = tag) -> None:
                for io, t in (("in", xin), ("out", yout)):
                    if (name, io) in wanted:
                        rec[tag][(name, io)] = t.detach().reshape(-1, t.shape[-1]).double()
            with torch.no_grad():
                encode(p, arch, x, record=hook)
        for key, s in wanted.items():
            a, b = rec["A"][key], rec["B"][key]
            st = acc.setdefault(s, {})
            for nm, val in (("ba", b.t() @ a), ("sa", a.sum(0)), ("sb", b.sum(0)), ("qa", (a * a).sum(0)),
                            ("qb", (b * b).sum(0)), ("n", torch.tensor(float(a.shape[0]), dtype=torch.float64))):
                st[nm] = st[nm] + val if nm in st else val
    out = {}
    for s, st in acc.items():
        n = st["n"]
        ma, mb = st["sa"] / n, st["sb"] / n
        cov = st["ba"] / n - mb[:, None] * ma[None, :]
        sa = (st["qa"] / n - ma * ma).clamp_min(0).sqrt() + 1e-8
        sb = (st["qb"] / n - mb * mb).clamp_min(0).sqrt() + 1e-8
        corr = cov / (sb[:, None] * sa[None, :])
        if corr.shape[0] != spec[s].size:
            raise TransportError(f"activation matching: {s} has {corr.shape[0]} units, expected {spec[s].size}")
        out[s] = corr.float()
    return out


def match_activations(corr: Mapping[str, Tensor], arch: ViTArch, sigma: dict[int, Tensor]) -> Perms:
    """Each variable solved once on its activation correlation; heads keep sigma, only rho is matched."""
    H, dh = arch.heads, arch.head_dim
    perms: Perms = {}
    for s, v in permutation_spec(arch).items():
        C = corr[s]
        if v.kind == "heads":
            sg = sigma[v.layer].to(C.device)
            rho = torch.stack([_lap_max(C[h * dh:(h + 1) * dh, int(sg[h]) * dh:(int(sg[h]) + 1) * dh])
                               for h in range(H)])
            perms[s] = head_axis_permutation(sg.cpu(), rho, arch)
        else:
            perms[s] = _lap_max(C)
    return perms


# ----------------------------------------------------------------------------------------------
# the alignment
# ----------------------------------------------------------------------------------------------
@dataclass
class TransFusionAlignment:
    """All permutations aligning theta_A to theta_B (``perms``: variable -> LongTensor, new = old[p]) + diagnostics."""

    arch: ViTArch
    perms: dict[str, Tensor]
    info: dict

    def diagnostics(self) -> dict:
        return json.loads(json.dumps(self.info))

    def save(self, directory) -> None:
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().long().contiguous() for k, v in self.perms.items()},
                  str(d / "permutations.safetensors"), metadata={"arch": self.arch.to_json()})
        (d / "alignment.json").write_text(json.dumps({"arch": json.loads(self.arch.to_json()),
                                                      "diagnostics": self.info}))

    @classmethod
    def load(cls, directory) -> "TransFusionAlignment":
        from transport.io import read_safetensors

        d = Path(directory)
        meta_file = d / "alignment.json"
        if not meta_file.exists():
            raise TransportError(f"{meta_file}: file not found (not a TransFusion alignment directory)")
        try:
            meta = json.loads(meta_file.read_text())
            arch = ViTArch.from_json(json.dumps(meta["arch"]))
            info = meta["diagnostics"]
        except (ValueError, KeyError, TypeError) as e:
            raise TransportError(f"{meta_file}: malformed alignment file ({type(e).__name__}: {e})") from None
        tensors, _ = read_safetensors(d / "permutations.safetensors")
        perms = {k: v.long() for k, v in tensors.items()}
        check_permutations(perms, arch, str(d / "permutations.safetensors"))
        missing = [s for s in permutation_spec(arch) if s not in perms]
        if missing:
            raise TransportError(f"{d / 'permutations.safetensors'}: missing permutations {', '.join(missing[:4])}")
        return cls(arch, perms, info)


def _diagnostics(arch: ViTArch, perms: Perms, matching: str, costs: dict[int, Tensor], margins: dict[int, list],
                 stats: MatchStats, timings: dict[str, float]) -> dict:
    layers = []
    for l in range(arch.layers):
        sigma, rho = split_head_permutation(perms[f"heads:{l}"], arch)
        layers.append({
            "layer": l,
            "head_perm": [int(x) for x in sigma],
            "head_cost": [[float(x) for x in row] for row in costs[l].tolist()],
            "head_margin": [float(x) for x in margins[l]],
            "within_head_perms": [[int(x) for x in r] for r in rho.tolist()],
            "mlp_fixed_points": fixed_points(perms[f"mlp:{l}"]),
            "mlp_size": int(arch.mlp_width),
            "res_attn_fixed_points": fixed_points(perms[f"res:{l}a"]),
            "res_mlp_fixed_points": fixed_points(perms[f"res:{l}m"]),
            "head_fixed_points": fixed_points(sigma),
        })
    residual = {s: {"fixed_points": fixed_points(perms[s]), "size": int(arch.width)} for s in residual_names(arch)}
    return {"method": "transfusion", "matching": matching, "sweeps": int(stats.sweeps),
            "objective_per_sweep": [float(x) for x in stats.objective], "layers": layers, "residual": residual,
            "timings": {k: float(v) for k, v in timings.items()}}


def align(theta_A: Mapping[str, Tensor], theta_B: Mapping[str, Tensor], arch: ViTArch, matching: str = "weight",
          max_iter: int = 100, seed: int = 0, device: str = "cpu", calibration: Optional[Tensor] = None,
          accelerate: bool = True, progress: Progress = no_progress) -> TransFusionAlignment:
    """All TransFusion permutations aligning theta_A to theta_B (canonical tensors of ``arch``)."""
    if matching not in MATCHINGS:
        raise TransportError(f"transfusion: unknown matching '{matching}' (use {' or '.join(MATCHINGS)})")
    if int(max_iter) < 0:
        raise TransportError(f"transfusion: max_iter must be >= 0, got {max_iter}")
    check_params(dict(theta_A), arch, "source pretrained model")
    check_params(dict(theta_B), arch, "target pretrained model")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    progress(0.0, "transfusion: head spectra")
    spec_A, spec_B = head_spectra(theta_A, arch, device), head_spectra(theta_B, arch, device)
    t1 = time.perf_counter()
    timings["spectra"] = t1 - t0
    costs, margins, sigma = {}, {}, {}
    for l in range(arch.layers):
        costs[l] = head_cost(spec_B[l], spec_A[l]).cpu()
        sigma[l], margins[l] = assign_heads(costs[l])
    t2 = time.perf_counter()
    timings["head_assignment"] = t2 - t1
    progress(0.05, "transfusion: matching")
    if matching == "weight":
        wm = WeightMatcher(theta_A, theta_B, arch, sigma, device)
        stats = wm.run(max_iter, seed, accelerate, lambda f, m: progress(0.05 + 0.95 * f, m))
        perms = {k: v.cpu() for k, v in wm.perms.items()}
        del wm
    else:
        if calibration is None:
            raise TransportError("transfusion: activation matching needs calibration images (give a task)")
        corr = activation_similarity(theta_A, theta_B, arch, calibration, device)
        t_s = time.perf_counter()
        perms = match_activations(corr, arch, sigma)
        stats = MatchStats(sweeps=0, hungarian_s=time.perf_counter() - t_s, similarity_s=t_s - t2)
        stats.objective.append(matching_objective(theta_A, theta_B, perms, arch))
    t3 = time.perf_counter()
    timings.update(sweeps=t3 - t2, hungarian=stats.hungarian_s, similarity=stats.similarity_s)
    check_permutations(perms, arch, "transfusion result")
    progress(1.0, "transfusion: done")
    al = TransFusionAlignment(arch, perms, _diagnostics(arch, perms, matching, costs, margins, stats, timings))
    al.stats = stats  # type: ignore[attr-defined]  (solver counters for benchmarks; not saved)
    return al


# ----------------------------------------------------------------------------------------------
# method contract
# ----------------------------------------------------------------------------------------------
def _check_options(options: Mapping) -> dict:
    opts = {**OPTIONS, **dict(options or {})}
    if opts["matching"] not in MATCHINGS:
        raise TransportError(f"transfusion: unknown matching '{opts['matching']}' (use {' or '.join(MATCHINGS)})")
    for k in ("max_iter", "seed", "calibration"):
        if isinstance(opts[k], bool) or not isinstance(opts[k], (int, np.integer)) or int(opts[k]) < 0:
            raise TransportError(f"transfusion: option {k} must be a non-negative integer, got {opts[k]!r}")
    return opts


def prepare(inputs: TransportInputs, options: dict, progress: Progress = no_progress) -> TransFusionAlignment:
    """Permutations aligning the source pretrained model to the target pretrained model (tau never read)."""
    opts = _check_options(options)
    a, b = inputs.source.arch, inputs.target.arch
    if not a.same_shapes(b):
        raise TransportError(f"transfusion needs source and target of the same architecture: {inputs.source.ref} "
                             f"is {a.name}, {inputs.target.ref} is {b.name}")
    calib = None
    if opts["matching"] == "activation":
        if inputs.task is None:
            raise TransportError("transfusion: matching 'activation' needs unlabelled images: give a task "
                                 "(--task or --data)")
        calib = inputs.task.calibration(max(1, int(opts["calibration"])), int(opts["seed"]))
    al = align(inputs.source.params, inputs.target.params, b, opts["matching"], int(opts["max_iter"]),
               int(opts["seed"]), inputs.device, calib, True, progress)
    return al


def apply(alignment: TransFusionAlignment, tau: TaskVector, alpha: float = 1.0,
          options: Optional[dict] = None) -> TaskVector:
    """alpha * pi(tau): every axis of tau gathered by its space's permutation, in the target's canonical names."""
    if not tau.arch.same_shapes(alignment.arch):
        raise TransportError(f"task vector of {tau.arch.name} does not fit the alignment for {alignment.arch.name}")
    moved = apply_permutation(tau.tensors, alignment.perms, alignment.arch)
    return TaskVector(alignment.arch, moved, tau.meta) * float(alpha)


METHOD = MethodInfo(
    name="transfusion",
    summary="permute tau onto the target's basin: spectral head assignment + weight matching (data-free)",
    same_arch=True, data="none", prepare=prepare, apply=apply, load_alignment=TransFusionAlignment.load,
    options=dict(OPTIONS),
)
