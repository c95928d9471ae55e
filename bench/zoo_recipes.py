"""What would put the demo zoo in CLIP's regime? GradFix under other fine-tuning recipes and heads.

Takes A and a same-width target of a built zoo (default ``B_indep``), fine-tunes both on a task with
each recipe (learning rate x steps, batch 64, the zoo's AdamW schedule, head frozen) and reports, per
recipe: the two fine-tunes' test accuracy, the K-shot vote's agreement with sign(tau_B), naive,
GradFix and the oracle mask sign(tau_B) (alpha on validation), next to zero-shot B and few-shot
fine-tuning of B (:func:`transport.zoo.train.fewshot_finetune`, same protocol). ``--clip-head`` first
re-pretrains A and B_indep from the zoo's seeds with a CLIP-like head (unit features, unit class
embeddings, fixed logit scale, no bias) instead of the zoo's linear head.

    python -m bench.zoo_recipes [--root DIR] [--source A --target B_indep] [--tasks hflip rot90] [--seed 0]
        [--recipes 0 1] [--clip-head [--scale 10]]
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Optional

import torch

from bench.zoo_gradfix import tuned
from transport.zoo.train import fewshot_finetune
from transport.core.evaluate import accuracy, default_alpha_grid
from transport.core.heads import Classifier
from transport.core.model import Model
from transport.core.task_vector import TaskVector
from transport.data import DIGIT_NAMES, digits_task, load_task
from transport.methods import TransportInputs, gradfix, no_progress
from transport.sources import load_zoo_model

RECIPES = ((3e-3, 80), (1e-3, 20), (3e-4, 40), (1e-4, 40))  # (lr, steps); the first is the zoo's own


def clip_like_pretrain(name: str, seed: int, scale: float) -> Model:
    """A zoo model of the full variant pretrained like the zoo's, but through a cosine head of fixed scale
    whose class embeddings are renormalised to unit length afterwards (as CLIP's text embeddings are)."""
    from transport.zoo.builder import PRETRAIN_TASK, VARIANTS, _seed
    from transport.zoo.train import init_params, train

    cfg, arch = VARIANTS["full"], VARIANTS["full"].arch
    g = torch.Generator().manual_seed(_seed(seed, f"{name}:head"))
    w = torch.randn(10, arch.feature_dim, generator=g)
    head = Classifier(w / w.norm(dim=1, keepdim=True), None, True, scale, list(DIGIT_NAMES))
    x, y = digits_task(PRETRAIN_TASK).split("train")
    r = train(init_params(arch, _seed(seed, f"{name}:init")), head, arch, x, y,
              cfg.pretrain.with_seed(_seed(seed, f"{name}:data")))
    unit = r.head.weight / r.head.weight.norm(dim=1, keepdim=True)
    return Model(arch, r.params, f"{name}@{seed} (CLIP-like head)", Classifier(unit, None, True, scale, list(DIGIT_NAMES)))


def one_task(A: Model, B: Model, tname: str, seed: int, shots: int,
             recipes: tuple[tuple[float, int], ...] = RECIPES) -> list[str]:
    """The printed lines of one task: zero-shot and few-shot FT, then one line per recipe."""
    from transport.zoo.train import Augment, TrainConfig, finetune

    task, grid = load_task(tname), default_alpha_grid()
    x, y = task.split("train")
    al = gradfix.prepare(TransportInputs(A, B, task, shots, seed), {}, no_progress)
    fs, choice = fewshot_finetune(B, task, shots, seed)
    out = [f"{tname}: zero-shot A {100 * accuracy(A, task):.1f}, B {100 * accuracy(B, task):.1f}; few-shot FT of B "
           f"(K = {shots}) {100 * fs:.1f} (lr {choice['lr']:g}, {choice['steps']} steps)"]
    for lr, steps in recipes:
        c0 = time.process_time()
        cfg = TrainConfig(steps=steps, batch_size=64, lr=lr, augment=Augment(shift=0), seed=seed)
        ra, rb = finetune(A, x, y, cfg.with_seed(2 * seed + 1)), finetune(B, x, y, cfg.with_seed(2 * seed + 2))
        tau = TaskVector.from_models(A.params, ra.params, A.arch)
        tau_b = TaskVector.from_models(B.params, rb.params, B.arch)
        vote_b = al.agreement(tau_b, {})["agreement_total"]
        gf, _ = tuned(B, gradfix.apply(al, tau, 1.0, {}), task, grid, "cpu")
        om, _ = tuned(B, gradfix.apply(al, tau, 1.0, {"variant": "oracle", "oracle_tau": tau_b}), task, grid, "cpu")
        nv, _ = tuned(B, tau, task, grid, "cpu")
        out.append(f"  lr {lr:<6g} {steps:>3} steps: A ft {100 * accuracy(A.with_params(ra.params), task):5.1f}  "
                   f"B ft {100 * accuracy(B.with_params(rb.params), task):5.1f}  vote==sign(tau_B) {100 * vote_b:5.1f}  "
                   f"naive {100 * nv:5.1f}  GradFix {100 * gf:5.1f}  oracle mask {100 * om:5.1f}  "
                   f"({time.process_time() - c0:.0f} CPU s)")
    return out


def main(argv: Optional[list[str]] = None) -> int:
    from transport import zoo

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=None, help="zoo directory (default: $TRANSPORT_ZOO_DIR or the cache)")
    ap.add_argument("--source", default="A", help="the source's pretrained zoo model (W_grown: a 2x wider pair)")
    ap.add_argument("--target", default="B_indep")
    ap.add_argument("--recipes", nargs="+", type=int, default=None,
                    help="indices into RECIPES (default: all); 0 is the zoo's own")
    ap.add_argument("--tasks", nargs="+", default=["hflip", "rot90"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shots", type=int, default=2)
    ap.add_argument("--clip-head", action="store_true", help="re-pretrain A and B_indep with a CLIP-like head")
    ap.add_argument("--scale", type=float, default=10.0, help="the CLIP-like head's fixed logit scale")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    if a.clip_head:
        if a.target != "B_indep":
            print("--clip-head re-pretrains A and B_indep only", file=sys.stderr)
            return 2
        A, B = clip_like_pretrain("A", a.seed, a.scale), clip_like_pretrain("B_indep", a.seed, a.scale)
        print(f"CLIP-like head (scale {a.scale:g}): pretraining accuracy A {100 * accuracy(A, digits_task('digits')):.1f}, "
              f"B_indep {100 * accuracy(B, digits_task('digits')):.1f}")
    else:
        if not zoo.is_built(a.root):
            print("the demo zoo is not built; run `python -m transport zoo build` (or give --root)", file=sys.stderr)
            return 2
        A, B = load_zoo_model(f"{a.source}@{a.seed}", a.root), load_zoo_model(f"{a.target}@{a.seed}", a.root)
        print(f"the zoo's {a.source} and {a.target} (seed {a.seed}), test accuracy %:")
    recipes = RECIPES if a.recipes is None else tuple(RECIPES[i] for i in a.recipes)
    for t in a.tasks:
        print("\n".join(one_task(A, B, t, a.seed, a.shots, recipes)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
