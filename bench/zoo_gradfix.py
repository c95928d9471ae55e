"""GradFix on the demo zoo: does naive < few-shot fine-tuning < GradFix hold at K = 1, 2, 5 shots per class?

For each zoo seed, pair (default ``indep`` and ``next``), task and K it reports test accuracy (%) of:
zero-shot B, naive theta_B + alpha tau, TransFusion pi(tau) (when the method is available), GradFix
(majority and mean vote), GradFix on TransFusion's pi(tau), a random mask with GradFix's keep-rate per
tensor, few-shot fine-tuning of B on the same K samples per class, the oracle mask sign(tau_B) and B
fine-tuned on all the task's data. Mean +- spread (population std) over the zoo seeds; the pair summary
gives mean (min..max) over seeds and whether naive < few-shot FT < GradFix < oracle mask holds.

Protocol (the same labels for every method): GradFix votes on the K samples per class that few-shot
fine-tuning trains on (``Task.shots(K, seed)``, train split). Every transported update's alpha is chosen
on the task's validation split, and so are few-shot fine-tuning's learning rate (1e-3 or 3e-3) and step
count (0, 5, 10, 20, 40, 80, 160 or 320; 0 = B itself): one validation split for all, no other labels.
Few-shot fine-tuning is AdamW (weight decay 0.05, 5% warm-up, cosine decay over 320 steps, the shorter
runs are snapshots of that run), full batch over the K x C shots, no augmentation, B's head frozen like
the zoo's own fine-tuning.

    python -m bench.zoo_gradfix [--root DIR] [--pairs indep next] [--shots 1 2 5] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Optional

import torch

from transport.data import Task, load_task
from transport.core.evaluate import accuracy, default_alpha_grid, sweep_alpha
from transport.methods import TransportInputs, available_methods, get_method, no_progress
from transport.methods import gradfix
from transport.core.model import Model
from transport.core.task_vector import TaskVector
from transport.sources import load_zoo_model
from transport.zoo.ordering import ORDERING, ordered
from transport.zoo.train import fewshot_finetune

METHODS = ("zero-shot B", "naive", "TransFusion", "few-shot FT", "GradFix", "GradFix mean", "GradFix on TF",
           "random mask", "oracle mask", "B fine-tuned")


def tuned(target: Model, delta: TaskVector, task: Task, grid: list[float], device: str) -> tuple[float, float]:
    """Test accuracy of theta_B + alpha delta with alpha chosen on validation; (accuracy, alpha)."""
    sw = sweep_alpha(target, delta, task, grid, device)
    return accuracy(target, task, "test", delta.apply_to(target.params, sw.best_alpha), device=device), sw.best_alpha


def run_one(A: Model, A_ft: Model, B: Model, B_ft: Model, task: Task, shots: list[int], seed: int, grid: list[float],
            device: str, transfusion: bool) -> dict:
    """Every method's test accuracy on one (seed, pair, task), per K."""
    tau = TaskVector.from_models(A.params, A_ft.params, A.arch)
    tau_B = TaskVector.from_models(B.params, B_ft.params, B.arch)
    out: dict = {"fixed": {}, "per_k": {}}
    fx = out["fixed"]
    fx["zero-shot B"] = accuracy(B, task, "test", device=device)
    fx["naive"] = tuned(B, tau, task, grid, device)[0]
    fx["B fine-tuned"] = accuracy(B_ft, task, "test", device=device)
    fx["cos_tau_tauB"] = tau.dot(tau_B) / max(tau.norm() * tau_B.norm(), 1e-30)
    tau_tf = None
    if transfusion:
        tf = get_method("transfusion")
        al_tf = tf.prepare(TransportInputs(A, B, task, 1, seed, device), dict(tf.options), no_progress)
        tau_tf = tf.apply(al_tf, tau, 1.0, dict(tf.options))
        fx["TransFusion"] = tuned(B, tau_tf, task, grid, device)[0]
        fx["cos_tftau_tauB"] = tau_tf.dot(tau_B) / max(tau_tf.norm() * tau_B.norm(), 1e-30)
    for k in shots:
        r: dict = {}
        t0 = time.perf_counter()
        al = gradfix.prepare(TransportInputs(A, B, task, k, seed, device), {}, no_progress)
        r["prepare_s"] = time.perf_counter() - t0
        r["GradFix"], r["alpha"] = tuned(B, gradfix.apply(al, tau, 1.0, {}), task, grid, device)
        d = al.diagnostics()
        r["agreement"], r["keep_rate"], r["first_order"] = d["agreement_total"], d["keep_rate_total"], \
            d["first_order_total"]
        # how often the few-shot vote has the sign of B's own full fine-tuning (0.5: no information)
        r["vote_vs_tauB"] = al.agreement(tau_B)["agreement_total"]
        r["GradFix mean"] = tuned(B, gradfix.apply(al, tau, 1.0, {"vote": "mean"}), task, grid, device)[0]
        r["random mask"] = tuned(B, gradfix.apply(al, tau, 1.0, {"variant": "random", "mask_seed": seed}), task,
                                 grid, device)[0]
        r["oracle mask"] = tuned(B, gradfix.apply(al, tau, 1.0, {"variant": "oracle", "oracle_tau": tau_B}), task,
                                 grid, device)[0]
        if tau_tf is not None:
            r["GradFix on TF"] = tuned(B, gradfix.apply(al, tau_tf, 1.0, {}), task, grid, device)[0]
        r["few-shot FT"], r["ft_choice"] = fewshot_finetune(B, task, k, seed, device)
        out["per_k"][k] = r
    return out


def _cell(vals: list[float]) -> str:
    if not vals:
        return "-"
    m = 100 * statistics.fmean(vals)
    s = 100 * statistics.pstdev(vals) if len(vals) > 1 else 0.0
    return f"{m:4.1f}" + (f"±{s:.1f}" if len(vals) > 1 else "")


def summarize(results: list[dict], methods: list[str]) -> tuple[str, list[dict]]:
    """A plain-text table (rows: pair, task, K; columns: methods) and the ordering check per row."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        for k, rk in r["per_k"].items():
            groups.setdefault((r["pair"], r["task"], int(k)), []).append({**r["fixed"], **rk})
    w = 10
    head = f"{'pair':<6}{'task':<7}{'K':>2} " + "".join(f"{m[:w]:>{w + 1}}" for m in methods) + \
        f"{'keep':>6}{'agree':>6}{'voteB':>6}{'cos':>6}  naive<FT<GF"
    lines, checks = [head, "-" * len(head)], []
    head = head.replace("naive<FT<GF", "naive<FT<GF<oracle")
    lines[0], lines[1] = head, "-" * len(head)
    for (pair, task, k), rows in sorted(groups.items()):
        mean = {m: statistics.fmean([x[m] for x in rows if m in x]) for m in methods if any(m in x for x in rows)}
        ok = ordered(mean)
        checks.append({"pair": pair, "task": task, "K": k, "ordering": ok, **mean})
        lines.append(f"{pair:<6}{task:<7}{k:>2} " + "".join(
            f"{_cell([x[m] for x in rows if m in x]):>{w + 1}}" for m in methods)
            + f"{100 * statistics.fmean([x['keep_rate'] for x in rows]):6.1f}"
            + f"{100 * statistics.fmean([x['agreement'] for x in rows]):6.1f}"
            + f"{100 * statistics.fmean([x['vote_vs_tauB'] for x in rows]):6.1f}"
            + f"{statistics.fmean([x['cos_tau_tauB'] for x in rows]):6.2f}  {'yes' if ok else 'no'}")
    return "\n".join(lines), checks


def pair_summary(results: list[dict], methods: list[str]) -> str:
    """Per pair and K: every method's accuracy averaged over tasks, mean (min..max) over seeds (markdown)."""
    out = ["| pair | K | " + " | ".join(methods) + " | naive < FT < GradFix < oracle |",
           "|---" * (len(methods) + 3) + "|"]
    seeds = list(dict.fromkeys(r["seed"] for r in results))
    for pair in dict.fromkeys(r["pair"] for r in results):
        for k in sorted({int(k) for r in results for k in r["per_k"]}):
            cells, by_seed = [], {s: {} for s in seeds}
            for m in methods:
                per_seed = [statistics.fmean({**r["fixed"], **r["per_k"][str(k)]}[m] for r in results
                                             if r["pair"] == pair and r["seed"] == s) for s in seeds]
                for s, v in zip(seeds, per_seed):
                    by_seed[s][m] = v
                cells.append(f"{100 * statistics.fmean(per_seed):.1f} ({100 * min(per_seed):.1f}.."
                             f"{100 * max(per_seed):.1f})")
            mean = {m: statistics.fmean(by_seed[s][m] for s in seeds) for m in ORDERING}
            held = sum(ordered(by_seed[s]) for s in seeds)
            out.append(f"| {pair} | {k} | " + " | ".join(cells) +
                       f" | {'yes' if ordered(mean) else 'no'} ({held} of {len(seeds)} seeds) |")
    return "\n".join(out)


def main(argv: Optional[list[str]] = None) -> int:
    from transport import zoo

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=None, help="zoo directory (default: $TRANSPORT_ZOO_DIR or the cache)")
    ap.add_argument("--pairs", nargs="+", default=["indep", "next"])
    ap.add_argument("--tasks", nargs="+", default=None)
    ap.add_argument("--seeds", nargs="+", type=int, default=None)
    ap.add_argument("--shots", nargs="+", type=int, default=[1, 2, 5])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="write every raw number here")
    ap.add_argument("--from-json", default=None, help="only print the tables of a JSON an earlier run wrote")
    a = ap.parse_args(argv)
    if a.from_json:
        with open(a.from_json) as f:
            results = json.load(f)["results"]
        has_tf = any("TransFusion" in r["fixed"] for r in results)
        methods = [m for m in METHODS if m not in ("TransFusion", "GradFix on TF") or has_tf]
        print(summarize(results, methods)[0])
        print("\nmean over tasks, mean (min..max) over seeds:\n" + pair_summary(results, methods))
        return 0
    torch.set_num_threads(a.threads)
    if not zoo.is_built(a.root):
        print("the demo zoo is not built; run `python -m transport zoo build` (or give --root)", file=sys.stderr)
        return 2
    pairs = {p.key: p for p in zoo.pairs()}
    unknown = [p for p in a.pairs if p not in pairs]
    if unknown:
        print(f"unknown pair(s) {', '.join(unknown)} (known: {', '.join(pairs)})", file=sys.stderr)
        return 2
    tasks = a.tasks or zoo.tasks(a.root)
    seeds = a.seeds if a.seeds is not None else zoo.seeds(a.root)
    has_tf = "transfusion" in available_methods()
    grid = default_alpha_grid()
    results, t0 = [], time.perf_counter()
    for seed in seeds:
        A = load_zoo_model(f"A@{seed}", a.root)
        for pk in a.pairs:
            tgt = pairs[pk].target
            B = load_zoo_model(f"{tgt}@{seed}", a.root)
            for tname in tasks:
                task = load_task(tname)
                r = run_one(A, load_zoo_model(f"A+{tname}@{seed}", a.root), B, load_zoo_model(f"{tgt}+{tname}@{seed}", a.root),
                            task, a.shots, seed, grid, a.device, has_tf)
                results.append({"seed": seed, "pair": pk, "task": tname, **r})
                print(f"seed {seed} {pk} {tname}: done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    results = json.loads(json.dumps(results, default=str))  # K keys as strings, as --from-json reads them
    methods = [m for m in METHODS if m not in ("TransFusion", "GradFix on TF") or has_tf]
    table, checks = summarize(results, methods)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"results": results, "checks": checks}, f, indent=1, default=str)
    print(f"GradFix on the demo zoo: test accuracy %, mean±std over seeds {seeds}; alpha on validation; "
          f"K samples per class")
    print(table)
    print("\nmean over tasks, mean (min..max) over seeds:\n" + pair_summary(results, methods))
    held = sum(c["ordering"] for c in checks)
    print(f"naive < few-shot FT < GradFix < oracle mask holds in {held}/{len(checks)} (pair, task, K) rows "
          f"(on seed means)")
    print("keep: GradFix keep-rate; agree: sign(tau) vs the vote; voteB: sign(tau_B) (B's own full fine-tune) vs "
          "the vote, 50 = no information; cos: cosine(tau, tau_B); all in % except cos")
    return 0


if __name__ == "__main__":
    sys.exit(main())
