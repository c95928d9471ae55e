"""The text zoo's phenomenon: per pair, task and seed, the target's zero-shot accuracy, naive addition,
the true map where the build knows one, the source fine-tuned and the oracle (alpha chosen on validation).

True maps: the hidden shuffle of tau (control, next, with the extended vocabulary's rows moved by token
identity first), the widening of tau then the shuffle (wide_grown), A's blocks placed where the depth
growth put them then the shuffle (deep_grown).
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Optional

import torch

from transport.core.evaluate import accuracy, sweep_alpha, text_scores
from transport.core.layout import same_shapes
from transport.core.model import Model
from transport.core.symmetry import apply_permutation
from transport.core.task_vector import TaskVector
from transport.core.vocab import map_rows, token_table, vocab_map
from transport.files import read_safetensors
from transport.zoo import workers as zoo_workers
from transport.core.symmetry import unflatten
from transport.zoo.shuffle import widening_map
from transport.zoo.text_corpus import make_tokenizer
from transport.zoo.text_files import PRETRAINED, load_directory, load_tasks
from transport.zoo.text_store import TEXT_PAIRS
from transport.zoo.text_train import depth_map

Tensor = torch.Tensor
KEYS = ("zero_shot_target", "naive", "true_map", "source_finetuned", "oracle")


def evaluate_seed(root: Path, cfg, seed: int, records: dict[str, dict]) -> dict:
    """The phenomenon rows of one seed and each pretrained model's next-token loss on held-out task texts."""
    torch.set_num_threads(1)
    archs, grid = cfg.archs(), list(cfg.alpha_grid)

    def get(name: str) -> Model:
        return load_directory(root / records[name]["dir"], archs[cfg.arch_key(name)])

    def perm(name: str):
        return unflatten(read_safetensors(root / records[name]["perm_file"])[0], archs[cfg.arch_key(name)])

    def tuned(target: Model, tensors: dict[str, Tensor], task) -> tuple[float, float]:
        tau = TaskVector(target.arch, tensors)
        sw = sweep_alpha(target, tau, task, grid)
        return accuracy(target, task, "test", tau.apply_to(target.params, sw.best_alpha)), sw.best_alpha

    tok, vtok = make_tokenizer(), make_tokenizer(extended=True)
    tasks = load_tasks(root, cfg, tok, cfg.context)
    vtasks = load_tasks(root, cfg, vtok, cfg.context)
    pre = {n: get(n) for n in PRETRAINED}
    A = pre["A"]
    vmap = vocab_map(token_table(tok), token_table(vtok), A.arch.vocab_size, archs["V"].vocab_size)
    loss = {n: round(text_scores(m, vtasks[cfg.tasks[0]] if n == "V_vocab" else tasks[cfg.tasks[0]], "test").loss, 4)
            for n, m in pre.items()}
    rows: list[dict] = []
    for t in cfg.tasks:
        A_ft = get(f"A+{t}")
        tau = TaskVector.from_models(A.params, A_ft.params, A.arch).tensors
        src_ft, src_zs = accuracy(A_ft, tasks[t]), accuracy(A, tasks[t])
        for pair in TEXT_PAIRS:
            T = pre[pair.target]
            task = vtasks[t] if pair.key == "vocab" else tasks[t]
            row = {"pair": pair.key, "target": pair.target, "task": t, "seed": seed,
                   "zero_shot_target": accuracy(T, task), "naive": None, "naive_alpha": None,
                   "source_zero_shot": src_zs, "source_finetuned": src_ft,
                   "oracle": accuracy(get(f"{pair.target}+{t}"), task), "true_map": None, "true_map_alpha": None}
            moved = map_rows(tau, A.arch, vmap)[0] if pair.key == "vocab" else tau
            if same_shapes(A.arch, T.arch) or pair.key == "vocab":
                row["naive"], row["naive_alpha"] = tuned(T, moved, task)
            if pair.key == "control":  # the exact answer at alpha = 1
                ptau = TaskVector(T.arch, apply_permutation(tau, perm("B_control"), A.arch))
                row["true_map"], row["true_map_alpha"] = accuracy(T, task, "test", ptau.apply_to(T.params, 1.0)), 1.0
            elif pair.key in ("next", "vocab"):
                row["true_map"], row["true_map_alpha"] = tuned(T, apply_permutation(moved, perm(pair.target), T.arch),
                                                               task)
            elif pair.key == "wide_grown":
                row["true_map"], row["true_map_alpha"] = tuned(T, widening_map(tau, A.arch, T.arch, perm("W_grown")),
                                                               task)
            elif pair.key == "deep_grown":
                row["true_map"], row["true_map_alpha"] = tuned(
                    T, apply_permutation(depth_map(tau, A.arch, T.arch), perm("D_grown"), T.arch), task)
            rows.append(row)
        zoo_workers.report(1)
    return {"rows": rows, "pretrain_loss": loss}


def summarize(table: list[dict]) -> list[dict]:
    """Mean and spread (population std) over seeds, per pair and task."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in table:
        groups.setdefault((r["pair"], r["task"]), []).append(r)
    out = []
    for (pair, task), rs in groups.items():
        s = {"pair": pair, "target": rs[0]["target"], "task": task, "seeds": len(rs)}
        for k in KEYS:
            vals = [r[k] for r in rs if r.get(k) is not None]
            s[k] = statistics.fmean(vals) if vals else None
            s[k + "_std"] = statistics.pstdev(vals) if vals else None
        out.append(s)
    return out


def format_table(table: list[dict]) -> str:
    """A plain-text table of :func:`summarize` (accuracies in %, mean +- spread over seeds)."""
    def cell(m: Optional[float], s: Optional[float]) -> str:
        return "-" if m is None else f"{100 * m:.1f}" + (f" +- {100 * s:.1f}" if s else "")

    head = (f"{'pair':<11} {'task':<10} {'zero-shot T':>13} {'naive':>13} {'true map':>13} {'A ft':>13} "
            f"{'oracle':>13}")
    lines = [head, "-" * len(head)]
    for s in summarize(table):
        lines.append(f"{s['pair']:<11} {s['task']:<10} " + " ".join(f"{cell(s[k], s[k + '_std']):>13}" for k in KEYS))
    return "\n".join(lines)


__all__ = ["evaluate_seed", "summarize", "format_table", "KEYS"]
