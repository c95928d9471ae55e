"""Replay the assignment problems of a real weight-matching run: exactness and CPU seconds per solver.

``--record DIR`` runs TransFusion weight matching on two random-init towers (seeds 0 and 1) and saves, for
the chosen variables, every similarity matrix S handed to the large-problem solver with the permutation
in force (the hint) and the one returned. ``--replay DIR`` solves the same sequence again, single-threaded,
with scipy's dense linear_sum_assignment, the certified solver started cold (no potentials: the
pre-warm-start behaviour) and warm (potentials carried from the variable's previous solve, as the matcher
does), and checks every answer against scipy's optimum (objective to 1e-12 relative, same permutation).

    python -m bench.assignment --record .data/lap-L14 --arch ViT-L-14 --vars mlp:0 mlp:12 res:0 res:12a
    python -m bench.assignment --replay .data/lap-L14 [--no-dense]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def record(out: Path, arch_name: str, keep: set[str]) -> None:
    import transport.methods.transfusion as tf
    import transport.methods.weight_matching as wm
    from bench.common import random_model

    out.mkdir(parents=True, exist_ok=True)
    current = {"var": ""}
    counts: dict[str, int] = {}
    visit, solve = wm.WeightMatcher.visit, wm.solve_assignment

    def visit_hook(self, name, accelerate=True):
        current["var"] = name
        return visit(self, name, accelerate)

    def solve_hook(S, hint=None, *args, **kw):
        p, y, dense = solve(S, hint, *args, **kw)
        name = current["var"]
        if name in keep:
            i = counts.get(name, 0)
            counts[name] = i + 1
            d = out / name.replace(":", "_")
            d.mkdir(exist_ok=True)
            np.savez(d / f"{i:03d}.npz", S=S.cpu().numpy(), hint=hint.cpu().numpy(), perm=p.cpu().numpy())
        return p, y, dense

    wm.WeightMatcher.visit, wm.solve_assignment = visit_hook, solve_hook
    A, B = random_model(arch_name, 0), random_model(arch_name, 1)
    al = tf.align(A.params, B.params, A.arch, max_iter=100, seed=0)
    (out / "run.json").write_text(json.dumps({"arch": arch_name, "sweeps": al.stats.sweeps,
                                              "objective": al.diagnostics()["objective_per_sweep"][-1],
                                              "solves": counts}))
    print(f"recorded {sum(counts.values())} problems of {', '.join(sorted(counts))} in {out}")


def _objective(S: np.ndarray, p: np.ndarray) -> float:
    return float(S[np.arange(S.shape[0]), p].astype(np.float64).sum())


def replay(root: Path, dense: bool) -> None:
    from scipy.optimize import linear_sum_assignment

    from transport.core.assignment import solve_assignment

    torch.set_num_threads(1)
    print("| variable | n | solves | scipy dense cpu s | cold cpu s | warm cpu s | warm paths | exact |")
    print("|---|---|---|---|---|---|---|---|")
    tot = {"dense": 0.0, "cold": 0.0, "warm": 0.0}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(d.glob("*.npz"))
        t = {"dense": 0.0, "cold": 0.0, "warm": 0.0}
        paths: dict[str, int] = {}
        exact, y, n = True, None, 0
        for f in files:
            z = np.load(f)
            S, hint = torch.from_numpy(z["S"]), torch.from_numpy(z["hint"])
            n = S.shape[0]
            ref = z["perm"]
            if dense:
                c = time.process_time()
                _, ref = linear_sum_assignment(z["S"].astype(np.float64), maximize=True)
                t["dense"] += time.process_time() - c
            opt = _objective(z["S"], ref)
            c = time.process_time()
            p_cold, _, _ = solve_assignment(S, hint)
            t["cold"] += time.process_time() - c
            st: dict = {}
            c = time.process_time()
            p_warm, y, _ = solve_assignment(S, hint, y, stats=st)
            t["warm"] += time.process_time() - c
            paths[st["path"]] = paths.get(st["path"], 0) + 1
            for p in (p_cold.numpy(), p_warm.numpy()):
                exact &= bool(np.array_equal(p, ref)) and abs(_objective(z["S"], p) - opt) <= 1e-12 * abs(opt)
        for k in tot:
            tot[k] += t[k]
        ps = ", ".join(f"{k} {v}" for k, v in sorted(paths.items()))
        dn = f"{t['dense']:.2f}" if dense else "-"
        print(f"| {d.name.replace('_', ':', 1)} | {n} | {len(files)} | {dn} | {t['cold']:.2f} | {t['warm']:.2f} | {ps} | "
              f"{'yes' if exact else 'NO'} |", flush=True)
    dn = f"{tot['dense']:.2f}" if dense else "-"
    print(f"| all | | | {dn} | {tot['cold']:.2f} | {tot['warm']:.2f} | | |")
    print("# cpu: process time of the solves, one thread; exact: every solve (cold and warm) returned scipy's "
          "permutation" + (" (recomputed)" if dense else " (as recorded)") + " with its objective to 1e-12 relative")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--record", type=Path, default=None)
    ap.add_argument("--replay", type=Path, default=None)
    ap.add_argument("--arch", default="ViT-L-14")
    ap.add_argument("--vars", nargs="+", default=["mlp:0", "mlp:12", "mlp:23", "res:0", "res:12a", "res:23m"])
    ap.add_argument("--no-dense", action="store_true", help="compare with the recorded answers, skip scipy")
    a = ap.parse_args(argv)
    if a.record:
        record(a.record, a.arch, set(a.vars))
    if a.replay:
        replay(a.replay, not a.no_dense)
    if not (a.record or a.replay):
        ap.error("give --record DIR and/or --replay DIR")


if __name__ == "__main__":
    main()
