"""Every method on the text zoo: per pair, task and seed, the test accuracy of the target zero-shot, naive
addition, TransFusion, GradFix and Theseus (each through :func:`transport.pipeline.transfer` with its default
options, alpha chosen on validation over the zoo's grid), the source fine-tuned and the oracle.

    python -m bench.text_zoo_methods [--root DIR] [--pairs control next ...] [--seeds 0] [--tasks codeprose]
        [--json out.json] [--order auto|random|chain]

A method that does not apply to a pair (shapes, depths) is '-'. Prints CPU seconds per method.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Optional

METHODS = ("naive", "transfusion", "gradfix", "theseus")


def run(root: Optional[str], pairs: Optional[list[str]], seeds: Optional[list[int]], tasks: Optional[list[str]] = None,
        progress: bool = True, options: Optional[dict[str, dict]] = None) -> list[dict]:
    from transport.core.vocab import to_target_vocabulary
    from transport.errors import TransportError
    from transport.methods import TransportInputs, check_compatible, get_method
    from transport.pipeline import load_text_task, transfer
    from transport.sources import load_text_zoo_model
    from transport.zoo import text_store
    from transport.zoo.text_build import VARIANTS

    info = text_store.build_info(root)
    grid = list(VARIANTS[info["variant"]].alpha_grid)
    rows = []
    for seed in seeds or info["seeds"]:
        for pair in text_store.pairs():
            if pairs and pair.key not in pairs:
                continue
            pre = load_text_zoo_model(f"{pair.source}@{seed}", root)
            target = load_text_zoo_model(f"{pair.target}@{seed}", root)
            for t in tasks or info["tasks"]:
                # a vocabulary that differs: the source's rows moved to the target's tokens first (as transfer does)
                pre_t, ft, _ = to_target_vocabulary(pre, load_text_zoo_model(f"{pair.source}+{t}@{seed}", root), target)
                oracle = load_text_zoo_model(f"{pair.target}+{t}@{seed}", root)
                task = load_text_task(text_store.task_file(t, root), target, [])
                row = {"pair": pair.key, "task": t, "seed": seed, "cpu_seconds": {}}
                for m in METHODS:
                    try:
                        check_compatible(get_method(m), TransportInputs(pre_t, target, task))
                    except TransportError as e:
                        row[m] = None
                        row.setdefault("why_not", {})[m] = str(e)
                        continue
                    c0 = time.process_time()
                    res = transfer(pre_t, ft, target, m, task, options=(options or {}).get(m), alpha_grid=grid,
                                   seed=seed, oracle=oracle)
                    row["cpu_seconds"][m] = round(time.process_time() - c0, 2)
                    row[m] = res.accuracies[m]
                    for k in ("zero_shot_target", "oracle"):
                        row[k] = res.accuracies.get(k)
                    if "source_finetuned" in res.accuracies:
                        row["source_finetuned"] = res.accuracies["source_finetuned"]
                rows.append(row)
                if progress:
                    print(f"  {pair.key:<11} {t:<10} seed {seed}: " + ", ".join(
                        f"{m} {'-' if row[m] is None else f'{100 * row[m]:.1f}'}" for m in METHODS), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    keys = ("zero_shot_target",) + METHODS + ("source_finetuned", "oracle")
    head = f"{'pair':<11} {'task':<10} " + " ".join(f"{k.replace('_target', '').replace('source_', 'A '):>12}"
                                                   for k in keys)
    lines = [head, "-" * len(head)]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["pair"], r["task"]), []).append(r)
    for (pair, task), rs in groups.items():
        cells = []
        for k in keys:
            vals = [r[k] for r in rs if r.get(k) is not None]
            if not vals:
                cells.append("-")
            else:
                m = 100 * statistics.fmean(vals)
                cells.append(f"{m:.1f}" + (f" +- {100 * statistics.pstdev(vals):.1f}" if len(vals) > 1 else ""))
        lines.append(f"{pair:<11} {task:<10} " + " ".join(f"{c:>12}" for c in cells))
    cpu = {m: sum(r["cpu_seconds"].get(m, 0.0) for r in rows) for m in METHODS}
    lines.append("CPU seconds per method (all rows): " + ", ".join(f"{m} {s:.0f}" for m, s in cpu.items()))
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    from transport.methods.weight_matching import ORDERS

    ap = argparse.ArgumentParser(prog="python -m bench.text_zoo_methods", description=__doc__.split("\n")[0])
    ap.add_argument("--root", default=None)
    ap.add_argument("--pairs", nargs="*", default=None)
    ap.add_argument("--seeds", nargs="*", type=int, default=None)
    ap.add_argument("--tasks", nargs="*", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--order", default=None, choices=ORDERS,
                    help="TransFusion's weight-matching visiting order (default: the method's)")
    args = ap.parse_args(argv)
    rows = run(args.root, args.pairs, args.seeds, args.tasks,
               options={"transfusion": {"order": args.order}} if args.order else None)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
