"""TransFusion: re-basin of a task vector by permutation (Rinaldi et al., ICML 2025, arXiv:2505.22697).

``prepare`` aligns the source pretrained theta_A to the target pretrained theta_B of the same
architecture; tau plays no part and, with the default weight matching, no data is used:

1. head assignment per block from the singular-value spectra of each head's q, k, v rows and o columns
   (cost = sum of unsquared L2 distances of the sorted spectra; Hungarian). Under grouped-query
   attention the unit is a key/value group: its key and value heads plus its query heads, matched
   inside the group by a small Hungarian of their q/o spectra (a query head never leaves its group);
2. within-head orders, the residual permutations and the MLP permutations by weight matching
   (:mod:`transport.methods.weight_matching`): coordinate ascent on sum_t <W_B^t, pi(W_A^t)>, each
   variable solved exactly by a linear assignment given all the others, in a seeded random visiting order
   per sweep (option ``order``; 'chain': the chain of spaces forward and backward in turn; 'auto', the
   default: the chain when the pair looks like a relabelling, see :func:`weight_matching.match_confidence`).

``apply`` returns alpha * pi(tau) in the target's canonical names: a pure gather, linear and norm-preserving.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import numpy as np
import torch

from transport.core.arch import Arch
from transport.core.assignment import lap_max, lap_min_cost
from transport.core.axis_maps import TensorMap
from transport.core.forward import encode
from transport.core.layout import check_params, param_axes, same_shapes
from transport.core.stems import TextBatch, model_inputs
from transport.core.symmetry import (
    HeadPermutation,
    Perms,
    apply_permutation,
    axis_index,
    check_permutations,
    fixed_points,
    flatten,
    permutation_spec,
    residual_names,
    unflatten,
)
from transport.core.streamed import resident
from transport.core.task_vector import TaskVector
from transport.errors import TransportError
from transport.files import read_safetensors, write_safetensors
from transport.methods import MethodInfo, Option, Progress, TransportInputs, no_progress
from transport.methods.weight_matching import (ORDERS, WITHIN, MatchStats, WeightMatcher, check_order,
                                               matching_objective)

Tensor = torch.Tensor

MATCHINGS = ("weight", "activation")
SPEC = (
    Option("matching", "weight", "what the permutations match: weights (data-free) or activations on "
           "unlabelled images or texts", choices=MATCHINGS, flag=True),
    Option("max_iter", 100, "weight-matching sweeps at most", flag=True, minimum=0),
    Option("order", "auto", "weight-matching visiting order: a seeded random order per sweep (Git Re-Basin's), "
           "along the chain of spaces, forward and backward in turn (a relabelled pair in 2-3 sweeps), or auto: "
           "the chain when the embeddings' units each match one partner far above the rest, else random",
           choices=ORDERS),
    Option("seed", 0, "seed of the random visiting order and the calibration sample", minimum=0),
    Option("calibration", 128, "calibration images (or texts) for activation matching", minimum=0),
    Option("within", "shared", "within-head order: one shared by q, k, v and o (the paper's) or separate "
           "q/k and v/o orders (the larger symmetry group)", choices=WITHIN),
    Option("cache_mib", -1, "memory (MiB) weight matching keeps similarities in between visits (the dearest to "
           "rebuild per byte first: residual segments, then MLPs); more is faster on wide MLPs, same permutations "
           "(-1: a quarter of one model, at least 512)", minimum=-1),
)
OPTIONS = {o.name: o.default for o in SPEC}
ROLES = ("q", "k", "v", "o")


# ----------------------------------------------------------------------------------------------
# level 1: spectral head assignment
# ----------------------------------------------------------------------------------------------
def head_blocks(params: Mapping[str, Tensor], arch: Arch, layer: int) -> dict[str, Tensor]:
    """Per role [heads of that role, d_h, d]: each head's rows of q, k, v and its columns of o (transposed)."""
    info = param_axes(arch)
    hs, dh = f"heads:{layer}", arch.head_dim
    out = {}
    for name, i in info.items():
        if i.layer != layer or i.is_bias:
            continue
        for ax, axis in enumerate(i.axes):
            if axis is not None and axis.space == hs:
                w = params[name].movedim(ax, 0)
                out[axis.role] = w.reshape(w.shape[0] // dh, dh, -1)
    return {r: out[r] for r in ROLES}


def _spectra(blocks: dict[str, Tensor], device: str) -> dict[str, Tensor]:
    out = {}
    for role, x in blocks.items():
        x = x.to(device, torch.float64)
        # singular values via the small d_h x d_h Gram matrices (d_h << d): sqrt of their eigenvalues
        ev = torch.linalg.eigvalsh(x @ x.transpose(-1, -2))
        out[role] = ev.clamp_min(0).sqrt().flip(-1)
    return out


def head_spectra(params: Mapping[str, Tensor], arch: Arch, device: str = "cpu") -> list[dict[str, Tensor]]:
    """Per layer, per role, the singular values (descending) of every head block [heads, d_h]."""
    return [_spectra(head_blocks(params, arch, l), device) for l in range(arch.layers)]


def stack_spectra(spectra: list[dict[str, Tensor]]) -> Tensor:
    """[L, 4, H, d_h] (roles q, k, v, o) of :func:`head_spectra` without grouped-query attention."""
    return torch.stack([torch.stack([s[x] for x in ROLES]) for s in spectra])


def head_cost(spec_B: Tensor | dict, spec_A: Tensor | dict) -> Tensor:
    """C[i, j] = sum over q, k, v, o of ||s_B(i) - s_A(j)||_2, for spectra [4, H, d_h] (or per role) of one layer."""
    if isinstance(spec_B, dict):
        spec_B, spec_A = torch.stack([spec_B[x] for x in ROLES]), torch.stack([spec_A[x] for x in ROLES])
    diff = spec_B[:, :, None, :].double() - spec_A[:, None, :, :].double()
    return diff.norm(dim=-1).sum(0)


def group_cost(spec_B: dict[str, Tensor], spec_A: dict[str, Tensor], group_size: int) -> tuple[Tensor, Tensor]:
    """Cost of matching target group i to source group j, and the best query order inside each pair.

    C[i, j] = ||s_k|| + ||s_v|| distances + the minimum over query-head assignments of the q and o
    distances of the matched query heads; ``order[i, j]`` [r] is that assignment. Without grouped-query
    attention (r = 1) this is :func:`head_cost`.
    """
    r = group_size
    if r == 1:
        C = head_cost(torch.stack([spec_B[x] for x in ROLES]), torch.stack([spec_A[x] for x in ROLES]))
        return C, torch.zeros(*C.shape, 1, dtype=torch.long)

    def dist(x: str) -> Tensor:  # [n_B, n_A]
        return (spec_B[x][:, None, :].double() - spec_A[x][None, :, :].double()).norm(dim=-1)

    kv = dist("k") + dist("v")
    G = kv.shape[0]
    qo = (dist("q") + dist("o")).reshape(G, r, G, r).permute(0, 2, 1, 3)  # [G_B, G_A, r, r]
    C = torch.empty(G, G, dtype=torch.float64)
    order = torch.empty(G, G, r, dtype=torch.long)
    for i in range(G):
        for j in range(G):
            col, inner = lap_min_cost(qo[i, j].numpy())
            C[i, j], order[i, j] = kv[i, j] + inner, torch.from_numpy(col.astype(np.int64))
    return C, order


def assign_heads(C: Tensor) -> tuple[Tensor, list[float]]:
    """Hungarian head permutation sigma (new head i takes old head sigma[i]) and per-head margins.

    margin[i] = increase of the total assignment cost when target head i is forbidden its chosen source
    head (0 means an equally good alternative exists: the assignment of that head is not determined).
    """
    Cn = C.double().cpu().numpy()
    sigma, best = lap_min_cost(Cn)
    big = (np.abs(Cn).max() + 1.0) * (len(Cn) + 1)
    margins = []
    for i in range(len(Cn)):
        if len(Cn) == 1:
            margins.append(float("inf"))
            continue
        Cf = Cn.copy()
        Cf[i, sigma[i]] = big
        _, alt = lap_min_cost(Cf)
        margins.append(max(0.0, alt - best))
    return torch.from_numpy(sigma.astype(np.int64)), margins


def assign_groups(spec_B: dict[str, Tensor], spec_A: dict[str, Tensor], arch: Arch
                  ) -> tuple[HeadPermutation, Tensor, list[float]]:
    """The head order of one layer (groups, query heads within them; identity within heads), cost, margins."""
    C, order = group_cost(spec_B, spec_A, arch.group_size)
    kv, margins = assign_heads(C)
    q = order[torch.arange(len(kv)), kv]
    dh, G = arch.head_dim, arch.kv_heads
    ident = torch.arange(dh).repeat(G, 1)
    return HeadPermutation(kv, q, ident, ident.clone()), C, margins


# ----------------------------------------------------------------------------------------------
# activation matching (optional; needs calibration images or texts)
# ----------------------------------------------------------------------------------------------
def _variable_sites(arch: Arch) -> dict[str, list[tuple[str, str]]]:
    """Variable -> (activation site, role) pairs recorded for it (residual streams, MLP hidden, heads)."""
    out: dict[str, list[tuple[str, str]]] = {}
    for s, v in permutation_spec(arch).items():
        if v.kind == "res":
            out[s] = [(s, "all")] + ([(f"res:{arch.layers - 1}m", "all")] if arch.tied_embeddings and s == "res:0"
                                     else [])
        elif v.kind == "mlp":
            out[s] = [(f"act:{v.layer}", "all")]
        else:
            l = v.layer
            out[s] = [(f"q:{l}", "q"), (f"k:{l}", "k"), (f"v:{l}", "v"), (f"ctx:{l}", "o")]
    return out


def activation_similarity(theta_A: Mapping[str, Tensor], theta_B: Mapping[str, Tensor], arch: Arch,
                          samples: Tensor | TextBatch, device: str = "cpu",
                          batch_size: int = 64) -> dict[str, dict[str, Tensor]]:
    """Per variable and role, the correlation [n, n] between units of B (rows) and A (columns) on the same
    samples: images in [0, 1] (every token a row) or a :class:`TextBatch` (its real tokens are the rows)."""
    sites = _variable_sites(arch)
    wanted = {site: (s, role) for s, lst in sites.items() for site, role in lst}
    acc: dict[str, dict[str, Tensor]] = {}
    pa = {k: v.to(device, torch.float32) for k, v in theta_A.items()}
    pb = {k: v.to(device, torch.float32) for k, v in theta_B.items()}
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        mask = None
        if isinstance(chunk, TextBatch):
            chunk = chunk.trimmed()
            mask = chunk.mask.to(device)
        x = model_inputs(arch, chunk.to(device))
        rec: dict[str, dict[str, Tensor]] = {"A": {}, "B": {}}
        for tag, p in (("A", pa), ("B", pb)):
            def hook(site: str, t: Tensor, tag: str = tag) -> None:
                if site in wanted:
                    rows = t.detach()[mask] if mask is not None else t.detach().reshape(-1, t.shape[-1])
                    rec[tag][site] = rows.double()
            with torch.no_grad():
                encode(p, arch, x, record=hook)
        for site in wanted:
            a, b = rec["A"][site], rec["B"][site]
            st = acc.setdefault(site, {})
            for nm, val in (("ba", b.t() @ a), ("sa", a.sum(0)), ("sb", b.sum(0)), ("qa", (a * a).sum(0)),
                            ("qb", (b * b).sum(0)), ("n", torch.tensor(float(a.shape[0]), dtype=torch.float64))):
                st[nm] = st[nm] + val if nm in st else val
    out: dict[str, dict[str, Tensor]] = {}
    for site, st in acc.items():
        n = st["n"]
        ma, mb = st["sa"] / n, st["sb"] / n
        cov = st["ba"] / n - mb[:, None] * ma[None, :]
        sa = (st["qa"] / n - ma * ma).clamp_min(0).sqrt() + 1e-8
        sb = (st["qb"] / n - mb * mb).clamp_min(0).sqrt() + 1e-8
        s, role = wanted[site]
        corr = (cov / (sb[:, None] * sa[None, :])).float()
        prev = out.setdefault(s, {}).get(role)
        out[s][role] = corr if prev is None else prev + corr
    return out


def match_activations(corr: Mapping[str, dict[str, Tensor]], arch: Arch, groups: dict[int, HeadPermutation],
                      within: str = "shared") -> Perms:
    """Each variable solved once on its activation correlation; heads keep their order, only the
    within-head orders are matched (per group: its query heads and key head for q/k, value head and o's
    columns for v/o)."""
    dh, G = arch.head_dim, arch.kv_heads
    separate = within == "separate" or arch.position == "rope"
    perms: Perms = {}
    for s, v in permutation_spec(arch).items():
        if v.kind != "heads":
            perms[s] = lap_max(corr[s]["all"])
            continue
        hp = groups[v.layer]
        blocks = {}
        for role, C in corr[s].items():
            idx = axis_index(hp, role).to(C.device)
            sub = C[:, idx]  # B's units (rows) against A's units moved into B's head order
            n = sub.shape[0] // dh
            diag = torch.stack([sub[h * dh:(h + 1) * dh, h * dh:(h + 1) * dh] for h in range(n)])
            blocks[role] = diag if n == G else diag.reshape(G, n // G, dh, dh).sum(1)
        qk_S = blocks["q"] + blocks["k"]
        vo_S = blocks["v"] + blocks["o"]
        if separate:
            qk = hp.qk.clone() if arch.position == "rope" else torch.stack([lap_max(qk_S[g]) for g in range(G)])
            vo = torch.stack([lap_max(vo_S[g]) for g in range(G)])
        else:
            qk = torch.stack([lap_max(qk_S[g] + vo_S[g]) for g in range(G)])
            vo = qk.clone()
        perms[s] = HeadPermutation(hp.kv.clone(), hp.q.clone(), qk, vo)
    return perms


# ----------------------------------------------------------------------------------------------
# the alignment
# ----------------------------------------------------------------------------------------------
@dataclass
class TransFusionAlignment:
    """All permutations aligning theta_A to theta_B (``perms``: variable -> index or HeadPermutation) + diagnostics."""

    arch: Arch
    perms: Perms
    info: dict

    def diagnostics(self) -> dict:
        return json.loads(json.dumps(self.info))

    def save(self, directory) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        write_safetensors(d / "permutations.safetensors",
                          {k: v.detach().cpu().long() for k, v in flatten(self.perms).items()},
                          {"arch": self.arch.to_json()})
        (d / "alignment.json").write_text(json.dumps({"arch": json.loads(self.arch.to_json()),
                                                      "diagnostics": self.info}, sort_keys=True))

    @classmethod
    def load(cls, directory) -> "TransFusionAlignment":
        d = Path(directory)
        meta_file = d / "alignment.json"
        if not meta_file.exists():
            raise TransportError(f"{meta_file}: file not found (not a TransFusion alignment directory)")
        try:
            meta = json.loads(meta_file.read_text())
            arch = Arch.from_json(meta["arch"])
            info = meta["diagnostics"]
        except (ValueError, KeyError, TypeError) as e:
            raise TransportError(f"{meta_file}: malformed alignment file ({type(e).__name__}: {e})") from None
        where = str(d / "permutations.safetensors")
        tensors, _ = read_safetensors(d / "permutations.safetensors")
        perms = unflatten(tensors, arch, where)
        check_permutations(perms, arch, where)
        missing = [s for s in permutation_spec(arch) if s not in perms]
        if missing:
            raise TransportError(f"{where}: missing permutations {', '.join(missing[:4])}")
        return cls(arch, perms, info)


def _diagnostics(arch: Arch, perms: Perms, matching: str, within: str, costs: dict[int, Tensor],
                 margins: dict[int, list], stats: MatchStats, timings: dict[str, float]) -> dict:
    layers = []
    for l in range(arch.layers):
        hp: HeadPermutation = perms[f"heads:{l}"]  # type: ignore[assignment]
        layers.append({
            "layer": l,
            "head_perm": [int(x) for x in hp.kv],
            "query_perm": [[int(x) for x in row] for row in hp.q.tolist()],
            "head_cost": [[float(x) for x in row] for row in costs[l].tolist()],
            "head_margin": [float(x) for x in margins[l]],
            "within_head_perms": [[int(x) for x in r] for r in hp.qk.tolist()],
            "within_head_perms_vo": [[int(x) for x in r] for r in hp.vo.tolist()],
            "mlp_fixed_points": fixed_points(perms[f"mlp:{l}"]),
            "mlp_size": int(arch.mlp_width),
            "res_attn_fixed_points": fixed_points(perms[f"res:{l}a"]),
            "res_mlp_fixed_points": fixed_points(perms.get(f"res:{l}m", perms["res:0"])),
            "head_fixed_points": fixed_points(hp.kv),
        })
    residual = {s: {"fixed_points": fixed_points(perms[s]), "size": int(arch.width)} for s in residual_names(arch)}
    return {"method": "transfusion", "matching": matching, "within": within, "sweeps": int(stats.sweeps),
            "kv_heads": int(arch.kv_heads), "group_size": int(arch.group_size),
            "objective_per_sweep": [float(x) for x in stats.objective], "layers": layers, "residual": residual,
            "timings": {k: float(v) for k, v in timings.items()},
            "similarity_cache": {"budget_mib": stats.cache_budget / 2**20, "kept": stats.cached,
                                 "rebuilt": stats.uncached}}


def align(theta_A: Mapping[str, Tensor], theta_B: Mapping[str, Tensor], arch: Arch, matching: str = "weight",
          max_iter: int = 100, seed: int = 0, device: str = "cpu", calibration: Optional[Tensor] = None,
          accelerate: bool = True, progress: Progress = no_progress, within: str = "shared",
          cache_mib: int = -1, order: str = "auto") -> TransFusionAlignment:
    """All TransFusion permutations aligning theta_A to theta_B (canonical tensors of ``arch``)."""
    if matching not in MATCHINGS:
        raise TransportError(f"transfusion: unknown matching '{matching}' (use {' or '.join(MATCHINGS)})")
    if int(max_iter) < 0:
        raise TransportError(f"transfusion: max_iter must be >= 0, got {max_iter}")
    check_order(order)
    check_params(dict(theta_A), arch, "source pretrained model")
    check_params(dict(theta_B), arch, "target pretrained model")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    progress(0.0, "transfusion: head spectra")
    spec_A, spec_B = head_spectra(theta_A, arch, device), head_spectra(theta_B, arch, device)
    t1 = time.perf_counter()
    timings["spectra"] = t1 - t0
    costs, margins, groups = {}, {}, {}
    for l in range(arch.layers):
        sb = {k: v.cpu() for k, v in spec_B[l].items()}
        sa = {k: v.cpu() for k, v in spec_A[l].items()}
        groups[l], costs[l], margins[l] = assign_groups(sb, sa, arch)
    t2 = time.perf_counter()
    timings["head_assignment"] = t2 - t1
    progress(0.05, "transfusion: matching")
    if matching == "weight":
        wm = WeightMatcher(theta_A, theta_B, arch, groups, device, within,
                           None if int(cache_mib) < 0 else int(cache_mib) << 20)
        stats = wm.run(max_iter, seed, accelerate, lambda f, m: progress(0.05 + 0.95 * f, m), order)
        perms: Perms = {k: v.to("cpu") for k, v in wm.perms.items()}
        del wm
    else:
        if calibration is None:
            raise TransportError("transfusion: activation matching needs calibration images (give a task)")
        corr = activation_similarity(theta_A, theta_B, arch, calibration, device)
        t_s = time.perf_counter()
        perms = match_activations(corr, arch, groups, within)
        stats = MatchStats(sweeps=0, hungarian_s=time.perf_counter() - t_s, similarity_s=t_s - t2)
        stats.objective.append(matching_objective(theta_A, theta_B, perms, arch))
    t3 = time.perf_counter()
    timings.update(sweeps=t3 - t2, hungarian=stats.hungarian_s, similarity=stats.similarity_s)
    check_permutations(perms, arch, "transfusion result")
    progress(1.0, "transfusion: done")
    diag = _diagnostics(arch, perms, matching, within, costs, margins, stats, timings)
    if matching == "weight":
        diag["order"] = stats.order
        diag["order_option"] = order
        if stats.confidence is not None:
            diag["match_confidence"] = {"value": stats.confidence, "threshold": stats.threshold}
    al = TransFusionAlignment(arch, perms, diag)
    al.stats = stats  # type: ignore[attr-defined]  (solver counters for benchmarks; not saved)
    return al


# ----------------------------------------------------------------------------------------------
# method contract
# ----------------------------------------------------------------------------------------------
def prepare(inputs: TransportInputs, options: dict, progress: Progress = no_progress) -> TransFusionAlignment:
    """Permutations aligning the source pretrained model to the target pretrained model (tau never read)."""
    opts = METHOD.resolve(options)
    a, b = inputs.source.arch, inputs.target.arch
    if not same_shapes(a, b):
        raise TransportError(f"transfusion needs source and target of the same architecture: {inputs.source.ref} "
                             f"is {a.name}, {inputs.target.ref} is {b.name}")
    calib = None
    if opts["matching"] == "activation":
        if inputs.task is None:
            raise TransportError("transfusion: matching 'activation' needs unlabelled images: give a task "
                                 "(--task or --data)")
        calib = inputs.task.calibration(max(1, int(opts["calibration"])), int(opts["seed"]))
    # weight matching reads every tensor in every sweep: a streamed model is read into memory once here
    return align(resident(inputs.source.params), resident(inputs.target.params), b, opts["matching"], int(opts["max_iter"]),
                 int(opts["seed"]), inputs.device, calib, True, progress, opts["within"], int(opts["cache_mib"]),
                 opts["order"])


def apply(alignment: TransFusionAlignment, tau: TaskVector, alpha: float = 1.0,
          options: Optional[dict] = None) -> TaskVector:
    """alpha * pi(tau): every axis of tau gathered by its space's permutation, in the target's canonical names."""
    if not same_shapes(tau.arch, alignment.arch):
        raise TransportError(f"task vector of {tau.arch.name} does not fit the alignment for {alignment.arch.name}")
    moved = apply_permutation(tau.tensors, alignment.perms, alignment.arch)
    return TaskVector(alignment.arch, moved, tau.meta) * float(alpha)


def axis_maps(alignment: TransFusionAlignment, options: Optional[dict] = None,
              arch: Optional[Arch] = None) -> dict[str, TensorMap]:
    """pi as per-axis index vectors: every tensor from itself, each axis gathered by its space's permutation
    (what :func:`apply` does at alpha = 1; low-rank factors move as ``(P_out L)(R P_in^T)``)."""
    if arch is not None and not same_shapes(arch, alignment.arch):
        raise TransportError(f"task vector of {arch.name} does not fit the alignment for {alignment.arch.name}")
    perms = alignment.perms
    return {name: TensorMap(name, tuple(axis_index(perms[a.space], a.role) if a is not None and a.space in perms
                                        else None for a in info.axes))
            for name, info in param_axes(alignment.arch).items()}


METHOD = MethodInfo(
    name="transfusion",
    summary="permute tau onto the target's basin: spectral head assignment + weight matching (data-free)",
    same_arch=True, data="none", prepare=prepare, apply=apply, load_alignment=TransFusionAlignment.load,
    spec=SPEC, axis_maps=axis_maps,
)

__all__ = ["METHOD", "axis_maps", "OPTIONS", "MATCHINGS", "TransFusionAlignment", "align", "apply", "prepare", "head_blocks",
           "head_spectra", "stack_spectra", "head_cost", "group_cost", "assign_heads", "assign_groups", "activation_similarity",
           "match_activations", "WeightMatcher", "matching_objective"]
