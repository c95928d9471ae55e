"""Is the demo zoo's fine-tuning in the regime GradFix relies on? One table per pair, next to CLIP ViT-B/16.

GradFix keeps the entries of the source's task vector tau_A whose sign agrees with the target's
few-shot gradient-sign vote. That works when fine-tuning is a small, nearly linear move of an
over-parameterised model, so that the sign of the target's own task vector tau_B is what its first
few-shot gradient says. Per pair (default ``next`` and ``indep``) this prints, averaged over the
zoo's tasks and seeds (min..max over seeds in brackets):

- ||tau|| / ||theta|| per layer (the source's fine-tune and the target's oracle fine-tune);
- the linearisation gap: test accuracy of the fine-tuned model theta + tau against its first-order
  Taylor model f(theta) + J_theta f . tau, and the cosine of tau_A with the first K-shot descent
  direction -grad L_A(theta_A) of A;
- the sign agreement of the K-shot majority vote on B with sign(tau_B), against K (plain, and
  weighted by |tau_B|: the share of tau_B's mass where the vote is right);
- the loss of B along the GradFix-masked tau, L_B(theta_B + alpha m*tau_A) - L_B(theta_B), on the K
  shots the vote used and on the validation split, with the first-order prediction alpha <g, m*tau_A>,
  the validation accuracy and the norm of the (centred) validation logits relative to B's own;
- parameters per training example (full fine-tuning and K-shot).

The CLIP column says what the literature reports where we know it, and says so where we do not.

    python -m bench.zoo_regime [--root DIR] [--pairs next indep] [--shots 1 2 5 10] [--seeds 0 1] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Optional

import torch

from transport.core.evaluate import accuracy
from transport.core.forward import encode
from transport.core.layout import param_axes
from transport.core.losses import mean_loss, task_loss
from transport.core.model import Model
from transport.core.stems import preprocess
from transport.core.task_vector import TaskVector
from transport.data import Task, load_task
from transport.methods import TransportInputs, no_progress
from transport.methods import gradfix
from transport.sources import load_zoo_model

ALPHAS = (0.25, 0.5, 1.0, 1.5, 2.0)
VOTE_SHOTS = (1, 2, 5, 10)
LOSS_SHOTS = 2  # the paper's main setting

# What we know of CLIP ViT-B/16 (the GradFix paper's setting) for each quantity. No number here is
# a measurement of ours; where we know of no published value we say so.
CLIP = {
    "rel_norm": "not published as far as we know; only a loose bound from the task-arithmetic recipe (AdamW, "
                "lr 1e-5, ~2000 steps: an entry moves by at most ~lr x steps = 0.02, about one typical weight)",
    "linear": "tangent-space task-arithmetic study (Ortiz-Jimenez et al., NeurIPS 2023): CLIP fine-tuning is "
              "NOT fully linear, the first-order model at theta_0 loses accuracy against the fine-tuned one "
              "(qualitative finding; we do not recall the exact numbers)",
    "cos_first": "not published as far as we know",
    "vote": "not reported in the GradFix paper's summary we have; its oracle mask sign(tau_B) reaches "
            "71-95% against GradFix's 58-70% (K = 2), so the vote is far from sign(tau_B) there too",
    "loss_alpha": "not published as far as we know (the paper picks alpha on validation)",
    "params_full": "~86M image-tower parameters / ~4k (DTD) .. ~73k (SVHN) training images: ~1.2k .. ~23k "
                   "(dataset sizes from memory, +-10%)",
    "params_few": "~86M / (2 shots x 10..47 classes = 20..94 images): ~0.9M .. ~4.3M",
}


# ----------------------------------------------------------------------------------------------
# the measured quantities (each a plain function of models and a task)
# ----------------------------------------------------------------------------------------------
def layer_rel_norms(tau: TaskVector, theta: dict[str, torch.Tensor]) -> dict[int, float]:
    """||tau_l|| / ||theta_l|| per layer l (-1: embeddings, final LayerNorm and projection)."""
    info = param_axes(tau.arch)
    num: dict[int, float] = {}
    den: dict[int, float] = {}
    for k, v in tau.items():
        layer = info[k].layer
        num[layer] = num.get(layer, 0.0) + float((v.double() ** 2).sum())
        den[layer] = den.get(layer, 0.0) + float((theta[k].double() ** 2).sum())
    return {l: (num[l] / den[l]) ** 0.5 if den[l] > 0 else float("nan") for l in sorted(num)}


def rel_norm(tau: TaskVector, theta: dict[str, torch.Tensor]) -> float:
    """||tau|| / ||theta|| over all transported tensors."""
    den = sum(float((theta[k].double() ** 2).sum()) for k in tau.keys())
    return tau.norm() / den ** 0.5


def linearisation(pre: Model, tau: TaskVector, task: Task, split: str = "test", batch: int = 256) -> dict:
    """Accuracy of theta + tau against its first-order Taylor model f(theta) + J f . tau (logits), and the
    relative error of the Taylor model's logit change: ||f(theta+tau) - f_lin|| / ||f(theta+tau) - f(theta)||."""
    head = pre.classifier(task.classnames)
    theta = {k: v.detach() for k, v in pre.params.items()}
    tangent = {k: tau[k].to(v.dtype) if k in tau.tensors else torch.zeros_like(v) for k, v in theta.items()}
    moved = tau.apply_to(theta, 1.0)
    x, y = task.split(split)

    def logits(p: dict[str, torch.Tensor], xb: torch.Tensor) -> torch.Tensor:
        return head(encode(p, pre.arch, xb))

    ok_ft = ok_lin = 0
    err = ref = 0.0
    for i in range(0, len(y), batch):
        xb = preprocess(pre.arch, x[i:i + batch])
        f0, df = torch.func.jvp(lambda p: logits(p, xb), (theta,), (tangent,))
        with torch.no_grad():
            f1 = logits(moved, xb)
        lin = f0 + df
        ok_ft += int((f1.argmax(-1) == y[i:i + batch]).sum())
        ok_lin += int((lin.argmax(-1) == y[i:i + batch]).sum())
        err += float(((f1 - lin).double() ** 2).sum())
        ref += float(((f1 - f0).double() ** 2).sum())
    n = max(len(y), 1)
    return {"acc_finetuned": ok_ft / n, "acc_linear": ok_lin / n, "taylor_rel_error": (err / ref) ** 0.5 if ref else 0.0}


def _voted(al: gradfix.GradFixAlignment) -> list[str]:
    return [k for k in al.counts if k not in al.no_grad]


def cos_first_gradient(al: gradfix.GradFixAlignment, tau: TaskVector) -> float:
    """Cosine of tau with the descent direction -g of the vote's mean gradient (voted tensors only)."""
    dot = nt = ng = 0.0
    for k in _voted(al):
        g, t = al.grad[k].double(), tau[k].double()
        dot -= float((g * t).sum())
        nt += float((t ** 2).sum())
        ng += float((g ** 2).sum())
    return dot / max((nt * ng) ** 0.5, 1e-300)


def vote_agreement(al: gradfix.GradFixAlignment, tau: TaskVector) -> dict:
    """Share of the voted entries (ties excluded) where the majority vote equals sign(tau), plain and
    weighted by |tau| (the share of tau's L1 mass on which the vote is right)."""
    agree = voted = 0
    w_agree = w_voted = 0.0
    for k in _voted(al):
        s, st, a = al.sign(k), torch.sign(tau[k]).to(torch.int8), tau[k].abs().double()
        on = s != 0
        hit = (s == st) & on
        agree, voted = agree + int(hit.sum()), voted + int(on.sum())
        w_agree += float(a[hit].sum())
        w_voted += float(a[on].sum())
    return {"plain": agree / max(voted, 1), "weighted": w_agree / max(w_voted, 1e-300)}


@torch.no_grad()
def logit_norm(target: Model, params: dict[str, torch.Tensor], task: Task, split: str = "val") -> float:
    """Mean over the split's images of the L2 norm of the logit vector (after centring: softmax ignores shifts)."""
    x, _ = task.split(split)
    z = target.classifier(task.classnames)(encode(params, target.arch, preprocess(target.arch, x)))
    return float((z - z.mean(-1, keepdim=True)).norm(dim=-1).mean())


def loss_along(target: Model, delta: TaskVector, task: Task, shots: tuple[torch.Tensor, torch.Tensor],
               first_order: float, alphas: tuple[float, ...] = ALPHAS) -> list[dict]:
    """L(theta + alpha delta) - L(theta) on the vote's shots and on validation, with alpha <g, delta>, and the
    validation logits' norm relative to the target's own (below 1: the update mostly makes B less confident)."""
    loss_fn, _ = task_loss(target, task)
    xs, ys = shots
    xs = preprocess(target.arch, xs)
    xv, yv = task.split("val")
    xv = preprocess(target.arch, xv)
    base_s, base_v = mean_loss(loss_fn, target.params, xs, ys), mean_loss(loss_fn, target.params, xv, yv)
    base_n = logit_norm(target, target.params, task)
    out = []
    for a in alphas:
        p = delta.apply_to(target.params, a)
        out.append({"alpha": a, "shots": mean_loss(loss_fn, p, xs, ys) - base_s,
                    "val": mean_loss(loss_fn, p, xv, yv) - base_v, "first_order": a * first_order,
                    "val_acc": accuracy(target, task, "val", p), "logit_norm": logit_norm(target, p, task) / base_n})
    return out


def measure(A: Model, A_ft: Model, B: Model, B_ft: Model, task: Task, seed: int,
            vote_shots: tuple[int, ...] = VOTE_SHOTS, loss_shots: int = LOSS_SHOTS) -> dict:
    """Every quantity of the table for one (pair, task, seed)."""
    tau = TaskVector.from_models(A.params, A_ft.params, A.arch)
    tau_B = TaskVector.from_models(B.params, B_ft.params, B.arch)
    r: dict = {"rel_A": layer_rel_norms(tau, A.params), "rel_B": layer_rel_norms(tau_B, B.params),
               "rel_A_total": rel_norm(tau, A.params), "rel_B_total": rel_norm(tau_B, B.params),
               "lin_A": linearisation(A, tau, task), "lin_B": linearisation(B, tau_B, task),
               "zero_shot_B": accuracy(B, task, "test"), "vote": {}}
    n_par = sum(v.numel() for v in tau.tensors.values())
    r["params_full"] = n_par / len(task.split("train")[1])
    r["params_few"] = n_par / (loss_shots * len(task.classnames))
    al_A = gradfix.prepare(TransportInputs(A, A, task, loss_shots, seed), {}, no_progress)
    r["cos_tauA_firstA"] = cos_first_gradient(al_A, tau)
    for k in vote_shots:
        al = gradfix.prepare(TransportInputs(A, B, task, k, seed), {}, no_progress)
        r["vote"][k] = vote_agreement(al, tau_B)
        if k == loss_shots:
            r["cos_tauB_firstB"] = cos_first_gradient(al, tau_B)
            delta = gradfix.apply(al, tau, 1.0, {})
            fo = al.last["first_order_total"]
            r["loss"] = loss_along(B, delta, task, task.shots(k, seed), fo)
    return r


# ----------------------------------------------------------------------------------------------
# the table
# ----------------------------------------------------------------------------------------------
def _cell(vals: list[float], pct: bool = False, fmt: str = "{:.3g}") -> str:
    """mean (min..max) over seeds of values already averaged over tasks."""
    if not vals:
        return "-"
    f = (lambda v: f"{100 * v:.1f}") if pct else (lambda v: fmt.format(v))
    return f(statistics.fmean(vals)) + ("" if len(vals) == 1 else f" ({f(min(vals))}..{f(max(vals))})")


def _per_seed(rows: list[dict], get) -> list[float]:
    """The value averaged over tasks, one per seed."""
    seeds = dict.fromkeys(r["seed"] for r in rows)
    return [statistics.fmean(get(r) for r in rows if r["seed"] == s) for s in seeds]


def pair_table(pair: str, rows: list[dict]) -> str:
    """One printed table: quantity | zoo | CLIP ViT-B/16 (literature)."""
    lines: list[tuple[str, str, str]] = []
    layers = sorted(rows[0]["rel_A"], key=lambda l: (l < 0, l))
    for who in ("A", "B"):
        for l in layers:
            name = f"||tau_{who}|| / ||theta_{who}||, " + ("embed/ln/proj" if l < 0 else f"layer {l}")
            lines.append((name, _cell(_per_seed(rows, lambda r: r[f"rel_{who}"][l])), CLIP["rel_norm"] if
                          (who, l) == ("A", layers[0]) else ""))
        lines.append((f"||tau_{who}|| / ||theta_{who}||, all", _cell(_per_seed(rows, lambda r: r[f"rel_{who}_total"])), ""))
    lines.append(("zero-shot B, test acc %", _cell(_per_seed(rows, lambda r: r["zero_shot_B"]), True), "49-68 (paper, K = 2 table)"))
    for who in ("A", "B"):
        lin = f"lin_{who}"
        lines.append((f"theta_{who} + tau_{who}: test acc %", _cell(_per_seed(rows, lambda r: r[lin]["acc_finetuned"]), True),
                      "83-99 (B fine-tuned, paper)" if who == "B" else ""))
        lines.append(("  first-order Taylor model: test acc %", _cell(_per_seed(rows, lambda r: r[lin]["acc_linear"]), True),
                      CLIP["linear"] if who == "A" else ""))
        lines.append(("  Taylor error of the logit change", _cell(_per_seed(rows, lambda r: r[lin]["taylor_rel_error"])),
                      ""))
    lines.append((f"cos(tau_A, first {LOSS_SHOTS}-shot descent dir. of A)",
                  _cell(_per_seed(rows, lambda r: r["cos_tauA_firstA"])), CLIP["cos_first"]))
    lines.append((f"cos(tau_B, first {LOSS_SHOTS}-shot descent dir. of B)",
                  _cell(_per_seed(rows, lambda r: r["cos_tauB_firstB"])), ""))
    for k in sorted(rows[0]["vote"]):
        lines.append((f"K = {k}: vote == sign(tau_B), % of entries", _cell(_per_seed(rows, lambda r: r["vote"][k]["plain"]), True),
                      CLIP["vote"] if k == min(rows[0]["vote"]) else ""))
        lines.append((f"K = {k}:   same, weighted by |tau_B| %", _cell(_per_seed(rows, lambda r: r["vote"][k]["weighted"]), True), ""))
    for i, a in enumerate(r["alpha"] for r in rows[0]["loss"]):
        for what, label in (("shots", f"{LOSS_SHOTS}-shot loss"), ("val", "val loss"), ("first_order", "first-order")):
            lines.append((f"alpha {a:g}: change of B's {label}", _cell(_per_seed(rows, lambda r: r["loss"][i][what]), fmt="{:+.3f}"),
                          CLIP["loss_alpha"] if (i, what) == (0, "shots") else ""))
        lines.append((f"alpha {a:g}: B + alpha m*tau_A, val acc %", _cell(_per_seed(rows, lambda r: r["loss"][i]["val_acc"]), True), ""))
        if "logit_norm" in rows[0]["loss"][i]:
            lines.append((f"alpha {a:g}:   val logit norm / B's", _cell(_per_seed(rows, lambda r: r["loss"][i]["logit_norm"])),
                          "CLIP's head: unit features and class embeddings, fixed scale" if i == 0 else ""))
    lines.append(("parameters per example, full fine-tuning", _cell(_per_seed(rows, lambda r: r["params_full"]), fmt="{:.0f}"),
                  CLIP["params_full"]))
    lines.append((f"parameters per example, {LOSS_SHOTS}-shot", _cell(_per_seed(rows, lambda r: r["params_few"]), fmt="{:.0f}"),
                  CLIP["params_few"]))
    w0, w1 = max(len(a) for a, _, _ in lines), max(len(b) for _, b, _ in lines)
    seeds = sorted({r["seed"] for r in rows})
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    head = (f"pair {pair}: mean over tasks {', '.join(tasks)}; mean (min..max) over seeds {', '.join(map(str, seeds))}\n"
            f"{'quantity':<{w0}}  {'zoo':<{w1}}  CLIP ViT-B/16 (literature)")
    return "\n".join([head, "-" * len(head.splitlines()[-1])] + [f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in lines])


def _int_keys(r: dict) -> dict:
    """Layer and K keys as integers (a JSON round trip makes them strings)."""
    return {**r, "rel_A": {int(k): v for k, v in r["rel_A"].items()}, "rel_B": {int(k): v for k, v in r["rel_B"].items()},
            "vote": {int(k): v for k, v in r["vote"].items()}}


def main(argv: Optional[list[str]] = None) -> int:
    from transport import zoo

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=None, help="zoo directory (default: $TRANSPORT_ZOO_DIR or the cache)")
    ap.add_argument("--pairs", nargs="+", default=["next", "indep"])
    ap.add_argument("--tasks", nargs="+", default=None)
    ap.add_argument("--seeds", nargs="+", type=int, default=None)
    ap.add_argument("--shots", nargs="+", type=int, default=list(VOTE_SHOTS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="write every raw number here")
    ap.add_argument("--from-json", default=None, help="only print the tables of a JSON an earlier run wrote")
    a = ap.parse_args(argv)
    if a.from_json:
        with open(a.from_json) as f:
            results = json.load(f)["results"]
    else:
        torch.set_num_threads(a.threads)
        if not zoo.is_built(a.root):
            print("the demo zoo is not built; run `python -m transport zoo build` (or give --root)", file=sys.stderr)
            return 2
        pairs = {p.key: p for p in zoo.pairs()}
        bad = [p for p in a.pairs if p not in pairs or pairs[p].target.startswith("W_")]
        if bad:
            print(f"pair(s) {', '.join(bad)}: not a same-width pair (known: "
                  f"{', '.join(k for k, p in pairs.items() if not p.target.startswith('W_'))})", file=sys.stderr)
            return 2
        shots = tuple(sorted(set(a.shots) | {LOSS_SHOTS}))
        seeds = a.seeds if a.seeds is not None else zoo.seeds(a.root)
        results, t0 = [], time.perf_counter()
        for seed in seeds:
            A = load_zoo_model(f"A@{seed}", a.root)
            for pk in a.pairs:
                tgt = pairs[pk].target
                B = load_zoo_model(f"{tgt}@{seed}", a.root)
                for tname in a.tasks or zoo.tasks(a.root):
                    task = load_task(tname)
                    r = measure(A, load_zoo_model(f"A+{tname}@{seed}", a.root), B,
                                load_zoo_model(f"{tgt}+{tname}@{seed}", a.root), task, seed, shots)
                    results.append({"seed": seed, "pair": pk, "task": tname, **r})
                    print(f"seed {seed} {pk} {tname}: done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"results": results}, f, indent=1, default=str)
    results = [_int_keys(r) for r in results]
    for pk in dict.fromkeys(r["pair"] for r in results):
        print(pair_table(pk, [r for r in results if r["pair"] == pk]) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
