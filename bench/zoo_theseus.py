"""Theseus on the demo zoo: does the closed-form cross-width transport carry the fine-tuning over?

Per pair (A -> W_grown, A -> W_indep across widths; A -> B_next at equal width), task and seed:
zero-shot target, the naive baseline (tau zero-padded / truncated to the target's shapes; plain tau at
equal width), Theseus with 1, 4 and 16 calibration batches of 32 unlabelled train images, and the
oracle (the target fine-tuned on the task). For W_grown the known widening map (how W_grown was made
from A, before its further training) is shown as a reference. alpha is chosen on the validation split
for every transfer (same grid for all); accuracies are on the test split. Mean and spread (min..max)
over the zoo's seeds.

    python -m bench.zoo_theseus [--root ZOO_DIR] [--batches 1 4 16] [--pairs wide_grown wide_indep next]
                                [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Optional

import torch
from transport.sources import load_zoo_model

from bench.common import require_zoo, spread_cell, tuned
from transport.core.layout import same_shapes

GRID = [round(0.25 * i, 2) for i in range(0, 13)]  # 0 .. 3
PAIRS = {"wide_grown": "W_grown", "wide_indep": "W_indep", "next": "B_next"}


def run(root: Optional[str], pairs: list[str], batches: list[int], calib_size: int, seeds: Optional[list[int]],
        tasks: Optional[list[str]], options: Optional[dict] = None, progress: bool = True) -> list[dict]:
    from transport import zoo
    from transport.data import digits_task
    from transport.core.evaluate import accuracy
    from transport.methods import TransportInputs
    from transport.methods.theseus import apply, naive_resize, prepare
    from transport.core.task_vector import TaskVector

    seeds = seeds or zoo.seeds(root)
    tasks = tasks or zoo.tasks(root)
    rows = []
    for seed in seeds:
        A = load_zoo_model(f"A@{seed}", root)
        for tname in tasks:
            task = digits_task(tname)
            A_ft = load_zoo_model(f"A+{tname}@{seed}", root)
            tau = TaskVector.from_models(A.params, A_ft.params, A.arch)
            for key in pairs:
                tgt = PAIRS[key]
                T = load_zoo_model(f"{tgt}@{seed}", root)
                row = {"pair": key, "target": tgt, "task": tname, "seed": seed,
                       "zero_shot": accuracy(T, task), "oracle": accuracy(load_zoo_model(f"{tgt}+{tname}@{seed}", root), task),
                       "source_finetuned": accuracy(A_ft, task)}
                naive = tau if same_shapes(A.arch, T.arch) else naive_resize(tau, T.arch)
                row["naive"], row["naive_alpha"] = tuned(T, naive, task, GRID)
                if key == "wide_grown":
                    grown = zoo.grown_task_vector(tau, f"{tgt}@{seed}", root)
                    row["grow_map"], row["grow_map_alpha"] = tuned(T, grown, task, GRID)
                for nb in batches:
                    t0 = time.perf_counter()
                    al = prepare(TransportInputs(A, T, task, seed=seed),
                                 {**(options or {}), "calib_batches": nb, "calib_size": calib_size}, lambda f, m: None)
                    t_prep = time.perf_counter() - t0
                    moved = apply(al, tau, 1.0)
                    acc, alpha = tuned(T, moved, task, GRID)
                    maps = al.diagnostics()["maps"]
                    row[f"theseus_{nb}"], row[f"theseus_{nb}_alpha"] = acc, alpha
                    row[f"theseus_{nb}_prepare_s"] = round(t_prep, 3)
                    row[f"theseus_{nb}_residual"] = statistics.fmean(m["residual_after"] for m in maps)
                    row[f"theseus_{nb}_residual_naive"] = statistics.fmean(m["residual_before"] for m in maps)
                rows.append(row)
                if progress:
                    print(f"# seed {seed} {tname} {key}: " + ", ".join(
                        f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float) and not k.endswith(("_s", "alpha"))),
                        flush=True)
    return rows


def table(rows: list[dict], batches: list[int]) -> str:
    out = []
    for key in dict.fromkeys(r["pair"] for r in rows):
        sub = [r for r in rows if r["pair"] == key]
        cols = ["zero_shot", "naive"] + [f"theseus_{b}" for b in batches] + \
            (["grow_map"] if key == "wide_grown" else []) + ["oracle"]
        names = ["zero-shot target", "naive"] + [f"Theseus {b}x32" for b in batches] + \
            (["widening map"] if key == "wide_grown" else []) + ["oracle (target fine-tuned)"]
        n_seeds = len({r["seed"] for r in sub})
        out.append(f"\nA -> {sub[0]['target']} ({key}); test accuracy %, mean (min..max) over {n_seeds} seed(s)")
        out.append("| task | " + " | ".join(names) + " |")
        out.append("|---" * (len(cols) + 1) + "|")
        for tname in dict.fromkeys(r["task"] for r in sub):
            rs = [r for r in sub if r["task"] == tname]
            out.append(f"| {tname} | " + " | ".join(spread_cell([r.get(c) for r in rs]) for c in cols) + " |")
        seed_ids = list(dict.fromkeys(r["seed"] for r in sub))  # mean over tasks per seed, spread over seeds
        out.append("| mean | " + " | ".join(spread_cell([statistics.fmean(r[c] for r in sub if r["seed"] == s)
                                                    for s in seed_ids
                                                    if all(r.get(c) is not None for r in sub if r["seed"] == s)])
                                              for c in cols) + " |")
        alphas = {c: statistics.fmean(r[f"{c}_alpha"] for r in sub) for c in cols if f"{c}_alpha" in sub[0]}
        res = {b: (statistics.fmean(r[f"theseus_{b}_residual_naive"] for r in sub),
                   statistics.fmean(r[f"theseus_{b}_residual"] for r in sub)) for b in batches}
        out.append("mean alpha: " + ", ".join(f"{c} {a:.2f}" for c, a in alphas.items()))
        out.append("mean Procrustes residual (naive -> mapped): " +
                   ", ".join(f"{b}x32 {x:.3f} -> {y:.3f}" for b, (x, y) in res.items()))
        out.append("mean prepare seconds: " + ", ".join(
            f"{b}x32 {statistics.fmean(r[f'theseus_{b}_prepare_s'] for r in sub):.2f}" for b in batches))
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=None, help="zoo directory (default: $TRANSPORT_ZOO_DIR or the cache)")
    p.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 4, 16])
    p.add_argument("--calib-size", type=int, default=32)
    p.add_argument("--seeds", nargs="+", type=int, default=None)
    p.add_argument("--tasks", nargs="+", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--options", default="{}", help='other Theseus options as JSON, e.g. \'{"center": true}\'')
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transport import zoo

    require_zoo(args.root)
    t0 = time.perf_counter()
    options = json.loads(args.options)
    rows = run(args.root, args.pairs, args.batches, args.calib_size, args.seeds, args.tasks, options)
    info = zoo.build_info(args.root)
    print(f"# zoo variant {info.get('variant')}, seeds {info.get('seeds')}, Theseus options {options or 'default'}, "
          f"alpha grid {GRID[0]}..{GRID[-1]} (step 0.25) on val; {time.perf_counter() - t0:.0f} s")
    print(table(rows, args.batches))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
