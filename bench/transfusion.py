"""TransFusion ``prepare`` cost on random-init open_clip towers (ViT-B-16, ViT-L-14).

Cases per architecture, each in its own process (so peak memory is its own):

- ``indep``: two independently random-initialised towers (seeds 0 and 1), the accelerated matcher;
- ``plain`` (``--baseline``): the same pair with a plain loop (every variable re-solved by the dense
  solver in every sweep, similarities rebuilt from scratch): the objective the accelerated one must reach;
- ``planted``: theta_B = Pi(theta_A) with random head, within-head, MLP and independent residual perms;
  reports whether Pi is recovered exactly;
- ``related`` (``--cases related``): theta_B = Pi(theta_A) + noise, Gaussian with ``--noise`` times each
  tensor's standard deviation (a relabelled model that drifted on: a proxy for two releases of one model);
  reports how many of the spaces' permutations are Pi's.

Wall time of ``prepare`` is split into the sweeps' similarity and assignment-solver parts (wall and CPU
seconds: CPU seconds are the robust measure on a shared machine) and the spectra + head assignment, plus
sweep count, solver counters, the final objective (9 digits) and peak memory.

    python -m bench.transfusion [--arch ViT-B-16 ViT-L-14] [--device cpu|cuda] [--threads N] [--baseline]
                                [--order auto random chain] [--cases indep planted related] [--noise 0.5]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from transport.methods.transfusion import OPTIONS
from transport.methods.weight_matching import ORDERS
from bench.common import cpu_seconds, load_line, peak_bytes, random_model, reset_peak, run_child, sync


def _digest(perms: dict) -> str:
    """Short hash of all permutations (equal digests: identical permutations)."""
    import hashlib

    from transport.core.symmetry import flatten

    h = hashlib.sha256()
    flat = flatten(perms)
    for k in sorted(flat):
        h.update(k.encode())
        h.update(flat[k].cpu().long().numpy().tobytes())
    return h.hexdigest()[:12]


def worker(case: str, arch_name: str, device: str, order: str = OPTIONS["order"], noise: float = 0.5) -> dict:
    from transport.methods.transfusion import align
    from transport.core.symmetry import apply_permutation, perm_equal, random_permutation

    A = random_model(arch_name, 0)
    if case in ("planted", "related"):
        planted = random_permutation(A.arch, seed=7, kinds=("res", "mlp", "heads", "within"))
        theta_B = apply_permutation(A.params, planted, A.arch)
        if case == "related":
            g = torch.Generator().manual_seed(3)
            theta_B = {k: v + noise * (v.std() if v.numel() > 1 else 0.0) * torch.randn(v.shape, generator=g)
                       for k, v in theta_B.items()}
    else:
        theta_B = random_model(arch_name, 1).params
    reset_peak(device)
    sync(device)
    t0, c0 = time.perf_counter(), cpu_seconds()
    al = align(A.params, theta_B, A.arch, max_iter=100, seed=0, device=device, accelerate=case != "plain",
               order=order)
    sync(device)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    s, d = al.stats, al.diagnostics()
    out = {"case": case, "arch": arch_name, "wall_s": wall, "cpu_s": cpu, "peak_gib": peak_bytes(device) / 2**30,
           **d["timings"], "n_sweeps": s.sweeps, "solves": s.solves, "solves_skipped": s.solves_skipped,
           "visits_skipped": s.visits_skipped, "dense_solves": s.dense_solves,
           "solver_cpu": sum(k["solve_cpu"] for k in s.by_kind.values()),
           "similarity_cpu": sum(k["similarity_cpu"] for k in s.by_kind.values()),
           "objective": d["objective_per_sweep"][-1], "perms": _digest(al.perms),
           "kept": d["similarity_cache"]["kept"], "rebuilt": d["similarity_cache"]["rebuilt"],
           "order": d["order"], "confidence": d.get("match_confidence")}
    if case == "planted":
        out["recovered"] = all(perm_equal(al.perms[k], planted[k]) for k in planted)
    elif case == "related":
        out["recovered"] = f"{sum(perm_equal(al.perms[k], planted[k]) for k in planted)}/{len(planted)}"
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", nargs="+", default=["ViT-B-16", "ViT-L-14"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--baseline", action="store_true", help="also run the plain full-sweep loop (slow on CPU)")
    ap.add_argument("--order", nargs="+", default=[OPTIONS["order"]], choices=ORDERS,
                    help="weight-matching visiting orders to run (TransFusion option order)")
    ap.add_argument("--cases", nargs="+", default=None, choices=("indep", "plain", "planted", "related"),
                    help="pairs to run (default: indep [plain] planted)")
    ap.add_argument("--noise", type=float, default=0.5, help="related: noise per tensor, in its standard deviations")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.worker:
        case, arch, order = a.worker.split("@")
        print(json.dumps(worker(case, arch, a.device, order, a.noise)))
        return
    cases = a.cases or (["indep"] + (["plain"] if a.baseline else []) + ["planted"])
    print(f"# TransFusion prepare (weight matching), device {a.device}, threads "
          f"{a.threads or torch.get_num_threads()}, torch {torch.__version__}"
          + (f", related: noise {a.noise:g} standard deviations" if "related" in cases else ""))
    print(f"# load average at start: {load_line()}")
    print("| arch | case | order | prepare s | cpu s | sweeps | solver s (cpu) | similarity s (cpu) | spectra + heads s "
          "| solves (dense) | skipped solves / visits | similarities kept / rebuilt | objective | perms digest | peak GiB "
          "| recovered |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for arch in a.arch:
        for case in cases:
            for order in a.order:
                r = run_child("bench.transfusion", ["--worker", f"{case}@{arch}@{order}", "--device", a.device,
                                                    "--threads", str(a.threads), "--noise", repr(a.noise)])
                got = r.get("recovered")
                rec = got if isinstance(got, str) else {True: "exact", False: "NO"}.get(got, "")
                conf = r.get("confidence")
                shown = order if conf is None else (f"{order}: {r['order']} ({conf['value']:.1f} "
                                                    f"{'>' if r['order'] == 'chain' else '<='} {conf['threshold']:.1f})")
                print(f"| {arch} | {case} | {shown} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['n_sweeps']} | "
                      f"{r['hungarian']:.1f} ({r['solver_cpu']:.1f}) | {r['similarity']:.1f} ({r['similarity_cpu']:.1f}) | "
                      f"{r['spectra'] + r['head_assignment']:.2f} | {r['solves']} ({r['dense_solves']}) | "
                      f"{r['solves_skipped']} / {r['visits_skipped']} | {r['kept']} / {r['rebuilt']} | "
                      f"{r['objective']:.9e} | {r['perms']} | "
                      f"{r['peak_gib']:.2f} | {rec} |",
                      flush=True)
    print(f"# load average at end: {load_line()}")
    print("# prepare: wall seconds of align; cpu: process user+system seconds (all threads); solver / similarity: "
          "wall seconds in the sweeps' assignment solves / similarity builds, with their process CPU seconds; peak: "
          "peak RSS of the process (cpu) or peak allocated CUDA memory; objective: sum_t <W_B, pi(W_A)> at the end "
          "(higher is better; the plain case is the loop the accelerated one must reproduce); similarities kept / "
          "rebuilt: residual/MLP variables whose similarity stays between visits within the budget / is rebuilt at "
          "each visit; perms digest: sha256 "
          "of all permutations (equal digests: identical permutations); recovered: planted, Pi found exactly; related, "
          "spaces whose permutation is Pi's; order auto: the order it took (the first space's match confidence "
          "against the threshold)")


if __name__ == "__main__":
    main()
