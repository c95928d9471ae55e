"""TransFusion on the demo zoo: does undoing the permutation symmetry carry the fine-tuning over?

Per pair (control A -> B_control, next release A -> B_next, independent A -> B_indep), task and seed:
zero-shot B, naive theta_B + alpha tau, TransFusion with data-free weight matching and with activation
matching (128 unlabelled train images of the pretraining task, upright digits), the hidden shuffle itself where one exists (control: exact;
next: naive on B_next before its shuffle), the source fine-tuned model and the oracle (B fine-tuned).
Every alpha is chosen on the validation split; accuracies are on the test split; mean (min..max) over
the zoo's seeds.

Alignment quality per pair (why a transfer falls short): accuracy on the pretraining task (digits) of
the averaged pretrained models (theta_B + pi(theta_A)) / 2 with B's head, against the plain average
without alignment and B alone; and, where the hidden shuffle is known, the share of units per kind
(residual, heads, within-head, MLP) that the recovered permutation maps where the shuffle does.

    python -m bench.zoo_transfusion [--root ZOO_DIR] [--pairs control next indep] [--json out.json]
                                    [--order auto|random|chain]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Optional

import torch
from transport.methods.transfusion import OPTIONS
from transport.methods.weight_matching import ORDERS
from transport.sources import load_zoo_model
from transport.zoo.builder import PRETRAIN_TASK, VARIANTS

from bench.common import require_zoo, spread_cell, tuned

PAIRS = {"control": "B_control", "next": "B_next", "indep": "B_indep"}
MATCHINGS = ("weight", "activation")


def _hidden_shuffle_agreement(perms: dict, arch, shuffle: dict) -> dict[str, float]:
    """Share of units the recovered permutation sends where the zoo's hidden shuffle does, per kind
    (``shuffle``: the zoo's true permutation, Perms keyed like ``perms``)."""
    from transport.core.symmetry import permutation_spec

    hits: dict[str, list[float]] = {"residual": [], "heads": [], "within-head": [], "mlp": []}
    for s, v in permutation_spec(arch).items():
        p, t = perms[s], shuffle[s]
        if v.kind == "res":
            hits["residual"].append(float((p == t).float().mean()))
        elif v.kind == "mlp":
            hits["mlp"].append(float((p == t).float().mean()))
        else:
            hits["heads"].append(float((p.kv == t.kv).float().mean()))
            hits["within-head"].append(float((p.index("k") == t.index("k")).float().mean()))
    return {k: statistics.fmean(x) for k, x in hits.items()}


def run(root: Optional[str], pairs: list[str], seeds: Optional[list[int]], tasks: Optional[list[str]],
        calibration: int = 128, progress: bool = True, order: str = OPTIONS["order"]) -> tuple[list[dict], list[dict]]:
    from transport import zoo
    from transport.data import digits_task
    from transport.core.evaluate import accuracy
    from transport.methods.transfusion import align, apply
    from transport.core.symmetry import apply_permutation
    from transport.core.task_vector import TaskVector

    grid = list(VARIANTS[zoo.build_info(root)["variant"]].alpha_grid)
    seeds = seeds or zoo.seeds(root)
    tasks = tasks or zoo.tasks(root)
    digits = digits_task(PRETRAIN_TASK)
    rows, quality = [], []
    for seed in seeds:
        A = load_zoo_model(f"A@{seed}", root)
        for key in pairs:
            tgt = PAIRS[key]
            B = load_zoo_model(f"{tgt}@{seed}", root)
            aligned = {}
            for matching in MATCHINGS:
                t0 = time.perf_counter()
                calib = digits.calibration(calibration, seed) if matching == "activation" else None
                al = align(A.params, B.params, A.arch, matching=matching, seed=0, calibration=calib, order=order)
                aligned[matching] = (al, time.perf_counter() - t0)
                avg = {k: 0.5 * (B.params[k] + v) for k, v in apply_permutation(A.params, al.perms, A.arch).items()}
                q = {"pair": key, "seed": seed, "matching": matching, "prepare_s": aligned[matching][1],
                     "sweeps": al.diagnostics()["sweeps"], "target_alone": accuracy(B, digits, "test"),
                     "averaged_aligned": accuracy(B, digits, "test", avg),
                     "averaged_unaligned": accuracy(B, digits, "test",
                                                    {k: 0.5 * (B.params[k] + A.params[k]) for k in B.params})}
                if key in ("control", "next"):
                    q.update(_hidden_shuffle_agreement(al.perms, A.arch, zoo.true_permutation(f"{tgt}@{seed}", root)))
                quality.append(q)
            for tname in tasks:
                task = digits_task(tname)
                A_ft = load_zoo_model(f"A+{tname}@{seed}", root)
                tau = TaskVector.from_models(A.params, A_ft.params, A.arch)
                row = {"pair": key, "target": tgt, "task": tname, "seed": seed, "zero_shot": accuracy(B, task),
                       "source_finetuned": accuracy(A_ft, task),
                       "oracle": accuracy(load_zoo_model(f"{tgt}+{tname}@{seed}", root), task)}
                row["naive"], row["naive_alpha"] = tuned(B, tau, task, grid)
                for matching, (al, _) in aligned.items():
                    row[f"tf_{matching}"], row[f"tf_{matching}_alpha"] = tuned(B, apply(al, tau), task, grid)
                if key == "control":  # alpha = 1 must give the source fine-tune, relabelled, exactly
                    row["tf_weight_at_1"] = accuracy(B, task, "test", apply(aligned["weight"][0], tau).apply_to(B.params, 1.0))
                    shuffled = TaskVector(B.arch, apply_permutation(tau.tensors, zoo.true_permutation(f"{tgt}@{seed}", root),
                                                                         A.arch))
                    row["hidden_shuffle"] = accuracy(B, task, "test", shuffled.apply_to(B.params, 1.0))
                elif key == "next":
                    row["hidden_shuffle"] = tuned(load_zoo_model(f"B_next_unshuffled@{seed}", root), tau, task, grid)[0]
                rows.append(row)
                if progress:
                    print(f"# seed {seed} {key} {tname}: " + ", ".join(
                        f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float) and not k.endswith("alpha")),
                        flush=True)
    return rows, quality


COLS = [("zero_shot", "zero-shot B"), ("naive", "naive"), ("tf_weight", "TransFusion (weight)"),
        ("tf_activation", "TransFusion (activation)"),
        ("tf_weight_at_1", "TransFusion (weight), alpha = 1"), ("hidden_shuffle", "hidden shuffle undone"),
        ("source_finetuned", "source fine-tuned"), ("oracle", "oracle (B fine-tuned)")]


def table(rows: list[dict], quality: list[dict]) -> str:
    out = []
    for key in dict.fromkeys(r["pair"] for r in rows):
        sub = [r for r in rows if r["pair"] == key]
        cols = [(c, n) for c, n in COLS if any(r.get(c) is not None for r in sub)]
        n_seeds = len({r["seed"] for r in sub})
        out.append(f"\nA -> {sub[0]['target']} ({key}); test accuracy %, mean (min..max) over {n_seeds} seed(s)")
        out.append("| task | " + " | ".join(n for _, n in cols) + " |")
        out.append("|---" * (len(cols) + 1) + "|")
        task_names = list(dict.fromkeys(r["task"] for r in sub))
        for tname in task_names:
            rs = [r for r in sub if r["task"] == tname]
            out.append(f"| {tname} | " + " | ".join(spread_cell([r.get(c) for r in rs]) for c, _ in cols) + " |")
        seed_ids = list(dict.fromkeys(r["seed"] for r in sub))  # mean over tasks per seed, spread over seeds
        out.append("| mean | " + " | ".join(spread_cell([statistics.fmean(r[c] for r in sub if r["seed"] == s)
                                                         for s in seed_ids]) for c, _ in cols) + " |")
        alphas = {n: statistics.fmean(r[f"{c}_alpha"] for r in sub) for c, n in cols if f"{c}_alpha" in sub[0]}
        out.append("mean alpha: " + ", ".join(f"{n} {a:.2f}" for n, a in alphas.items()))
        gaps = {m: [(r[f"tf_{m}"] - r["naive"]) / max(r["oracle"] - r["naive"], 1e-9) for r in sub]
                for m in MATCHINGS}
        out.append("share of the naive -> oracle gap closed: " + ", ".join(
            f"{m} {100 * statistics.fmean(g):.0f}%" for m, g in gaps.items()))
    out.append("\nAlignment quality: digits (pretraining task) test accuracy %, mean (min..max) over seeds; "
               "'agree' = share of units mapped as the hidden shuffle maps them")
    kinds = ["residual", "heads", "within-head", "mlp"]
    out.append("| pair | matching | B alone | average, unaligned | average, aligned | "
               + " | ".join(f"agree {k}" for k in kinds) + " | sweeps | prepare s |")
    out.append("|---" * (8 + len(kinds)) + "|")
    for key in dict.fromkeys(q["pair"] for q in quality):
        for m in MATCHINGS:
            qs = [q for q in quality if q["pair"] == key and q["matching"] == m]
            agree = [spread_cell([q.get(k) for q in qs]) for k in kinds]
            out.append(f"| {key} | {m} | {spread_cell([q['target_alone'] for q in qs])} | "
                       f"{spread_cell([q['averaged_unaligned'] for q in qs])} | "
                       f"{spread_cell([q['averaged_aligned'] for q in qs])} | " + " | ".join(agree) +
                       f" | {statistics.fmean(q['sweeps'] for q in qs):.1f} | "
                       f"{statistics.fmean(q['prepare_s'] for q in qs):.2f} |")
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=None, help="zoo directory (default: $TRANSPORT_ZOO_DIR or the cache)")
    p.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    p.add_argument("--seeds", nargs="+", type=int, default=None)
    p.add_argument("--tasks", nargs="+", default=None)
    p.add_argument("--calibration", type=int, default=128, help="unlabelled images for activation matching")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    p.add_argument("--order", default=OPTIONS["order"], choices=list(ORDERS),
                   help="weight matching's visiting order (TransFusion option order)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transport import zoo

    require_zoo(args.root)
    t0 = time.perf_counter()
    rows, quality = run(args.root, args.pairs, args.seeds, args.tasks, args.calibration, order=args.order)
    info = zoo.build_info(args.root)
    print(f"# zoo variant {info.get('variant')}, seeds {info.get('seeds')}; alpha on val; "
          f"{time.perf_counter() - t0:.0f} s")
    print(table(rows, quality))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "quality": quality}, f, indent=1)


if __name__ == "__main__":
    main()
