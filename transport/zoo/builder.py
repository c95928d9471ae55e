"""The built-in demo zoo: tiny open_clip ViTs trained offline on scikit-learn digits.

Per seed it holds a source ``A`` pretrained on upright digits (tower + a linear head), ``A``
fine-tuned on each downstream task (the task vectors; head frozen, like CLIP's text head), and
targets of graded difficulty, each with its own oracle fine-tunes:

- ``B_control``: A with its units shuffled by a random permutation (the same function, exactly);
- ``B_next``: forked from A's run after its early steps, trained on with other augmentation and
  seed, then shuffled; ``B_next_unshuffled`` keeps the weights before the shuffle;
- ``B_indep``: pretrained from an unrelated seed;
- ``W_grown``: 2x wider, grown from A by a function-preserving widening, trained on, then shuffled;
- ``W_indep``: 2x wider, pretrained from an unrelated seed.

``python -m transport zoo build`` trains it deterministically, measures the phenomenon (naive
theta_B + alpha * tau against fine-tuning B) and writes ``manifest.json`` last. Models load with
:func:`transport.sources.load_model` (``zoo:NAME[@SEED]`` references); :mod:`transport.zoo.store`
locates them. No library module imports this one.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import statistics
import sys
import time
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import torch

from transport.core.arch import Arch
from transport.core.evaluate import accuracy, sweep_alpha
from transport.core.layout import same_shapes
from transport.core.model import Model
from transport.core.symmetry import Perms, apply_permutation
from transport.core.task_vector import TaskVector
from transport.data import DIGIT_NAMES, digits_task
from transport.errors import TransportError
from transport.files import read_safetensors, write_safetensors
from transport.sources import load_file_model, save_model, tiny_arch
from transport.zoo import workers as zoo_workers
from transport.zoo.shuffle import grow_params, random_shuffle, shuffle_from_tensors, shuffle_tensors, widening_map
from transport.zoo.store import (
    _PAIRS,
    MANIFEST,
    ZOO_FORMAT,
    ZooEntry,
    _file,
    _perm_file,
    read_manifest,
    _root,
    list_models,
)
from transport.zoo.train import Augment, TrainConfig, TrainResult, finetune, init_head, init_params, train
from transport.zoo.workers import CallbackBar, InlineQueue, Ticker, children_cpu, progress_bar, run_pool

Tensor = torch.Tensor

PRETRAIN_TASK = "digits"
PRETRAINED = ("A", "B_control", "B_next", "B_next_unshuffled", "B_indep", "W_grown", "W_indep")


# ----------------------------------------------------------------------------------------------
# configurations
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ZooConfig:
    """Everything that determines a zoo build (its JSON is the build's fingerprint)."""

    variant: str
    seeds: tuple[int, ...]
    tasks: tuple[str, ...]
    width: int = 64
    layers: int = 3
    heads: int = 4
    output_dim: int = 32
    pretrain: TrainConfig = TrainConfig(steps=400, batch_size=128, lr=2e-3, augment=Augment(shift=1, noise=0.05))
    fork_step: int = 40  # B_next shares A's initialisation and its first fork_step steps
    next_train: TrainConfig = TrainConfig(steps=360, batch_size=128, lr=2e-3,
                                          augment=Augment(shift=1, noise=0.1, cutout=3))
    grow_noise: float = 0.1  # std of the symmetry-breaking noise added after widening, relative to each tensor's
    grow_train: TrainConfig = TrainConfig(steps=150, batch_size=128, lr=2e-3, augment=Augment(shift=1, noise=0.05))
    wide_pretrain: TrainConfig = TrainConfig(steps=300, batch_size=128, lr=2e-3, augment=Augment(shift=1, noise=0.05))
    finetune: TrainConfig = TrainConfig(steps=80, batch_size=64, lr=3e-3, augment=Augment(shift=0))
    alpha_grid: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0)

    @property
    def arch(self) -> Arch:
        return tiny_arch(self.width, self.layers, self.heads, output_dim=self.output_dim)

    @property
    def wide_arch(self) -> Arch:
        return tiny_arch(2 * self.width, self.layers, 2 * self.heads, output_dim=self.output_dim)

    def fingerprint(self) -> dict:
        d = asdict(self)
        d["format"] = ZOO_FORMAT
        return d


VARIANTS: dict[str, ZooConfig] = {
    "full": ZooConfig(variant="full", seeds=(0, 1, 2), tasks=("rot90", "invert", "hflip")),
    "test": ZooConfig(
        variant="test", seeds=(0,), tasks=("rot90", "invert"), width=32, layers=2, heads=4,
        pretrain=TrainConfig(steps=150, batch_size=64, lr=3e-3, augment=Augment(shift=1, noise=0.05)),
        fork_step=15,
        next_train=TrainConfig(steps=135, batch_size=64, lr=3e-3, augment=Augment(shift=1, noise=0.1, cutout=3)),
        grow_train=TrainConfig(steps=20, batch_size=64, lr=2e-3, augment=Augment(shift=1, noise=0.05)),
        wide_pretrain=TrainConfig(steps=60, batch_size=64, lr=3e-3, augment=Augment(shift=1, noise=0.05)),
        finetune=TrainConfig(steps=40, batch_size=64, lr=3e-3, augment=Augment(shift=0)),
        alpha_grid=(0.0, 0.5, 1.0, 1.5),
    ),
}


def _seed(seed: int, label: str) -> int:
    """A stable sub-seed for one random draw of one zoo seed (same on every machine and run)."""
    return zlib.crc32(f"{seed}:{label}".encode()) & 0x7FFFFFFF


# ----------------------------------------------------------------------------------------------
# building
# ----------------------------------------------------------------------------------------------
_DESCRIPTIONS = {
    "A": "source: pretrained on upright digits",
    "B_control": "A with its units shuffled (identical function)",
    "B_next": "forked from A's run after its early steps, trained on with other augmentation and seed, then shuffled",
    "B_next_unshuffled": "B_next before its hidden shuffle (what naive addition could hope for)",
    "B_indep": "pretrained from an unrelated seed",
    "W_grown": "2x wider, grown from A by a function-preserving widening, trained on, then shuffled",
    "W_indep": "2x wider, pretrained from an unrelated seed",
}

@functools.lru_cache(maxsize=None)
def _task(name: str):
    """A built-in digits task, loaded once per process."""
    return digits_task(name)


def _digits_train(name: str) -> tuple[Tensor, Tensor]:
    return _task(name).split("train")


def _head_classes(head, classnames: list[str]):
    head.classnames = list(classnames)
    return head


class _Writer:
    """Saves models of one seed and remembers their manifest records and training seconds."""

    def __init__(self, root: Path, seed: int, cfg: ZooConfig):
        self.root, self.seed, self.cfg = root, seed, cfg
        self.records: list[dict] = []

    def save(self, name: str, model: Model, kind: str, task: Optional[str] = None, base: Optional[str] = None,
             run: Optional[TrainResult] = None, perm: Optional[Perms] = None) -> None:
        pre = name.split("+")[0]
        desc = _DESCRIPTIONS[pre] if task is None else f"{pre} fine-tuned on {task} (head frozen)"
        entry = ZooEntry(name, kind, self.seed, task, model.arch.name, desc, base)
        path = _file(self.root, name, self.seed)
        save_model(model.with_params(model.params, ref=f"zoo:{name}@{self.seed}"), path, zoo_name=name,
                   zoo_seed=str(self.seed), zoo_kind=kind, zoo_task=task or "", description=desc)
        rec = {"entry": asdict(entry), "file": str(path.relative_to(self.root)),
               "seconds": round(run.seconds, 3) if run else 0.0,
               "cpu_seconds": round(run.cpu_seconds, 3) if run else 0.0}
        if perm is not None:
            pf = _perm_file(self.root, name, self.seed)
            write_safetensors(pf, {k: v.contiguous() for k, v in shuffle_tensors(perm, model.arch).items()})
            rec["perm_file"] = str(pf.relative_to(self.root))
        self.records.append(rec)


def _finetune_all(w: _Writer, name: str, model: Model, tick: Ticker) -> dict[str, dict[str, Tensor]]:
    """Fine-tune ``model`` on every downstream task (same recipe and data order for every model)."""
    out = {}
    for task in w.cfg.tasks:
        x, y = _digits_train(task)
        cfg = w.cfg.finetune.with_seed(_seed(w.seed, f"finetune:{task}"))
        run = finetune(model, x, y, cfg, on_step=tick)
        w.save(f"{name}+{task}", model.with_params(run.params), "finetuned", task, name, run)
        out[task] = run.params
    return out


def pretrain_source(cfg: ZooConfig, seed: int, on_step: Optional[Callable[[int], None]] = None):
    """Train A of one zoo seed; returns the :class:`~transport.train.TrainResult` (with the fork snapshot)."""
    arch = cfg.arch
    x, y = _digits_train(PRETRAIN_TASK)
    res = train(init_params(arch, _seed(seed, "A:init")), init_head(arch, 10, _seed(seed, "A:head"), DIGIT_NAMES),
                arch, x, y, cfg.pretrain.with_seed(_seed(seed, "A:data")), snapshot_at=(cfg.fork_step,),
                on_step=on_step)
    return res


def _job_source_chain(root: str, cfg: ZooConfig, seed: int) -> dict:
    """A and everything made from its run: fine-tunes, B_control, B_next, W_grown."""
    torch.set_num_threads(1)
    w, tick = _Writer(Path(root), seed, cfg), Ticker(zoo_workers.report)
    arch, wide = cfg.arch, cfg.wide_arch
    x, y = _digits_train(PRETRAIN_TASK)

    res = pretrain_source(cfg, seed, tick)
    A = Model(arch, res.params, f"zoo:A@{seed}", _head_classes(res.head, DIGIT_NAMES))
    w.save("A", A, "pretrained", run=res)
    a_ft = _finetune_all(w, "A", A, tick)

    perm_c = random_shuffle(arch, _seed(seed, "B_control:perm"))
    w.save("B_control", A.with_params(apply_permutation(A.params, perm_c, arch)), "pretrained", perm=perm_c)
    for task in cfg.tasks:  # the oracle of a shuffled A is A's fine-tune shuffled alike (exact)
        w.save(f"B_control+{task}", A.with_params(apply_permutation(a_ft[task], perm_c, arch)), "finetuned", task,
               "B_control")

    snap_params, snap_head = res.snapshots[cfg.fork_step]
    nxt = train(snap_params, snap_head, arch, x, y, cfg.next_train.with_seed(_seed(seed, "B_next:data")),
                on_step=tick)
    Bu = Model(arch, nxt.params, f"zoo:B_next_unshuffled@{seed}", _head_classes(nxt.head, DIGIT_NAMES))
    w.save("B_next_unshuffled", Bu, "pretrained", run=nxt)
    perm_n = random_shuffle(arch, _seed(seed, "B_next:perm"))
    Bn = Bu.with_params(apply_permutation(Bu.params, perm_n, arch))
    w.save("B_next", Bn, "pretrained", perm=perm_n)
    _finetune_all(w, "B_next", Bn, tick)

    g = torch.Generator().manual_seed(_seed(seed, "W_grown:noise"))
    grown = grow_params(A.params, arch, wide)
    grown = {k: v + cfg.grow_noise * float(v.std() if v.numel() > 1 else 0.0) * torch.randn(v.shape, generator=g)
             for k, v in grown.items()}
    wg = train(grown, A.head, wide, x, y, cfg.grow_train.with_seed(_seed(seed, "W_grown:data")), on_step=tick)
    # shuffled like B_next: otherwise its first d units ARE A's units and zero-padding tau is a hidden alignment
    perm_w = random_shuffle(wide, _seed(seed, "W_grown:perm"))
    W = Model(wide, apply_permutation(wg.params, perm_w, wide), f"zoo:W_grown@{seed}", _head_classes(wg.head, DIGIT_NAMES))
    w.save("W_grown", W, "pretrained", run=wg, perm=perm_w)
    _finetune_all(w, "W_grown", W, tick)
    tick.flush()
    return {"records": w.records}


def _job_independent(root: str, cfg: ZooConfig, seed: int) -> dict:
    """B_indep and W_indep (unrelated seeds) with their fine-tunes."""
    torch.set_num_threads(1)
    w, tick = _Writer(Path(root), seed, cfg), Ticker(zoo_workers.report)
    x, y = _digits_train(PRETRAIN_TASK)
    for name, arch, tcfg in (("B_indep", cfg.arch, cfg.pretrain), ("W_indep", cfg.wide_arch, cfg.wide_pretrain)):
        res = train(init_params(arch, _seed(seed, f"{name}:init")),
                    init_head(arch, 10, _seed(seed, f"{name}:head"), DIGIT_NAMES), arch, x, y,
                    tcfg.with_seed(_seed(seed, f"{name}:data")), on_step=tick)
        M = Model(arch, res.params, f"zoo:{name}@{seed}", _head_classes(res.head, DIGIT_NAMES))
        w.save(name, M, "pretrained", run=res)
        _finetune_all(w, name, M, tick)
    tick.flush()
    return {"records": w.records}


def _evaluate_seed(root: Path, cfg: ZooConfig, seed: int, models: dict[str, dict]) -> dict:
    """The phenomenon rows of one seed plus every pretrained model's accuracy on the pretraining task."""
    torch.set_num_threads(1)
    grid = list(cfg.alpha_grid)

    def get(name: str) -> Model:
        rec = models[name]
        return load_file_model(str(root / rec["file"]), None)

    def tuned(target: Model, tau: TaskVector, task) -> tuple[float, float]:
        sw = sweep_alpha(target, tau, task, grid)
        return accuracy(target, task, "test", tau.apply_to(target.params, sw.best_alpha)), sw.best_alpha

    pre = {n: get(n) for n in PRETRAINED}
    digits = _task(PRETRAIN_TASK)
    pretrain_acc = {n: round(accuracy(m, digits), 4) for n, m in pre.items()}
    perm_c, perm_w = (shuffle_from_tensors(read_safetensors(root / models[n]["perm_file"])[0], pre[n].arch)
                      for n in ("B_control", "W_grown"))
    A = pre["A"]
    rows: list[dict] = []
    for tname in cfg.tasks:
        task = _task(tname)
        A_ft = get(f"A+{tname}")
        tau = TaskVector.from_models(A.params, A_ft.params, A.arch)
        src_ft, src_zs = accuracy(A_ft, task), accuracy(A, task)
        for pair in _PAIRS:
            T = pre[pair.target]
            row = {"pair": pair.key, "target": pair.target, "task": tname, "seed": seed,
                   "zero_shot_target": accuracy(T, task), "naive": None, "naive_alpha": None,
                   "source_zero_shot": src_zs, "source_finetuned": src_ft,
                   "oracle": accuracy(get(f"{pair.target}+{tname}"), task),
                   "true_map": None, "true_map_alpha": None, "naive_unshuffled": None, "naive_unshuffled_alpha": None}
            if same_shapes(A.arch, T.arch):
                row["naive"], row["naive_alpha"] = tuned(T, tau, task)
            if pair.key == "control":  # the true shuffle of tau at alpha = 1 gives A's fine-tune exactly
                ptau = TaskVector(T.arch, apply_permutation(tau.tensors, perm_c, A.arch))
                row["true_map"], row["true_map_alpha"] = accuracy(T, task, "test", ptau.apply_to(T.params, 1.0)), 1.0
            elif pair.key == "next":
                # B_next + perm(tau) is B_next_unshuffled + tau relabelled: the true shuffle gives exactly this
                row["naive_unshuffled"], row["naive_unshuffled_alpha"] = tuned(pre["B_next_unshuffled"], tau, task)
                row["true_map"], row["true_map_alpha"] = row["naive_unshuffled"], row["naive_unshuffled_alpha"]
            elif pair.key == "wide_grown":
                gtau = TaskVector(T.arch, widening_map(tau.tensors, A.arch, T.arch, perm_w))
                row["true_map"], row["true_map_alpha"] = tuned(T, gtau, task)
            rows.append(row)
        zoo_workers.report(1)
    return {"rows": rows, "pretrain_accuracy": pretrain_acc}


def summarize(table: list[dict]) -> list[dict]:
    """Mean and spread (population std) over seeds, per pair and task."""
    keys = ("zero_shot_target", "naive", "true_map", "source_finetuned", "oracle")
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in table:
        groups.setdefault((r["pair"], r["task"]), []).append(r)
    out = []
    for (pair, task), rs in groups.items():
        s = {"pair": pair, "target": rs[0]["target"], "task": task, "seeds": len(rs)}
        for k in keys:
            vals = [r[k] for r in rs if r.get(k) is not None]
            s[k] = None if not vals else statistics.fmean(vals)
            s[k + "_std"] = None if not vals else statistics.pstdev(vals)
        out.append(s)
    return out


def format_table(table: list[dict]) -> str:
    """A plain-text table of :func:`summarize` (accuracies in %, mean +- spread over seeds)."""
    def cell(m, s):
        return "-" if m is None else f"{100 * m:.1f}" + (f" +- {100 * s:.1f}" if s else "")

    head = f"{'pair':<11} {'task':<7} {'zero-shot B':>13} {'naive':>13} {'true map':>13} {'A ft':>13} {'oracle':>13}"
    lines = [head, "-" * len(head)]
    for s in summarize(table):
        lines.append(f"{s['pair']:<11} {s['task']:<7} " + " ".join(
            f"{cell(s[k], s[k + '_std']):>13}" for k in ("zero_shot_target", "naive", "true_map", "source_finetuned",
                                                       "oracle")))
    return "\n".join(lines)


def _total_units(cfg: ZooConfig) -> int:
    nt = len(cfg.tasks)
    per_seed = (cfg.pretrain.steps + cfg.next_train.steps + cfg.grow_train.steps + cfg.pretrain.steps
                + cfg.wide_pretrain.steps + 5 * nt * cfg.finetune.steps + nt)
    return per_seed * len(cfg.seeds)


def build(root: Optional[str | os.PathLike] = None, variant: str = "full", seeds: Optional[list[int]] = None,
          force: bool = False, progress: bool = True, workers: Optional[int] = None,
          on_progress: Optional[Callable[[float, str], None]] = None) -> dict:
    """Train the zoo (deterministically), measure the phenomenon and write ``manifest.json`` last.

    Skips the work when a zoo of the same configuration is already built (unless ``force``).
    ``progress``: a tqdm bar on stderr and the table printed at the end; ``on_progress(fraction, message)``
    is called as training steps complete (for an app's own progress bar).
    ``workers``: processes (default: up to 2, one thread each; results do not depend on it).
    Returns the build summary (seconds, per-model seconds, pretraining accuracies, the phenomenon table).
    """
    if variant not in VARIANTS:
        raise TransportError(f"unknown zoo variant '{variant}' (known: {', '.join(VARIANTS)})")
    cfg = VARIANTS[variant]
    if seeds is not None:
        if not seeds or len(set(seeds)) != len(seeds) or any(int(s) < 0 for s in seeds):
            raise TransportError(f"zoo seeds must be distinct non-negative integers, got {list(seeds)}")
        cfg = replace(cfg, seeds=tuple(int(s) for s in seeds))
    r = _root(root)
    fingerprint = cfg.fingerprint()
    old = read_manifest(r)
    if old is not None and not force and old.get("format", 0) < ZOO_FORMAT:
        if progress:  # our own cache from an older release of this package: rebuild it, nothing else is touched
            print(f"the zoo at {r} has format {old.get('format')}, this version needs {ZOO_FORMAT}: rebuilding",
                  file=sys.stderr)
        force = True
    if old is not None and not force:
        if old.get("fingerprint") == json.loads(json.dumps(fingerprint)):
            info = {k: v for k, v in old.items() if k not in ("models",)}
            info["skipped"], info["summary"] = True, summarize(info["table"])
            return info
        raise TransportError(f"{r}: holds a zoo built with another configuration (variant "
                             f"'{old.get('variant')}', seeds {old.get('seeds')}); rebuild with --force")
    if r.exists() and any(r.iterdir()) and old is None and not (r / ".zoo-building").exists() and not force:
        raise TransportError(f"{r}: exists and is not a zoo directory; choose another TRANSPORT_ZOO_DIR or use --force")
    r.mkdir(parents=True, exist_ok=True)
    (r / MANIFEST).unlink(missing_ok=True)
    for sub in r.glob("seed*"):
        shutil.rmtree(sub, ignore_errors=True)
    (r / ".zoo-building").write_text("incomplete build; run `python -m transport zoo build --force`\n")

    t0, c0, k0 = time.perf_counter(), time.process_time(), children_cpu()
    n_workers = workers if workers is not None else max(1, min(2, os.cpu_count() or 1, 2 * len(cfg.seeds)))
    bar = progress_bar(_total_units(cfg), variant, progress)
    if on_progress is not None:
        bar = CallbackBar(bar, _total_units(cfg), variant, on_progress)
    records: dict[int, dict[str, dict]] = {s: {} for s in cfg.seeds}
    seconds: dict[str, float] = {}
    cpu_seconds: dict[str, float] = {}
    rows: list[dict] = []
    pre_acc: dict[str, float] = {}
    jobs = [(_job_source_chain, s) for s in cfg.seeds] + [(_job_independent, s) for s in cfg.seeds]
    jobs = [j for pair in zip(jobs[: len(cfg.seeds)], jobs[len(cfg.seeds):]) for j in pair]

    def take_models(seed: int, out: dict) -> None:
        for rec in out["records"]:
            records[seed][rec["entry"]["name"]] = rec
            seconds[f"{rec['entry']['name']}@{seed}"] = rec["seconds"]
            cpu_seconds[f"{rec['entry']['name']}@{seed}"] = rec["cpu_seconds"]

    def take_eval(seed: int, out: dict) -> None:
        rows.extend(out["rows"])
        pre_acc.update({f"{k}@{seed}": v for k, v in out["pretrain_accuracy"].items()})

    old_threads = torch.get_num_threads()
    try:
        if n_workers <= 1:
            zoo_workers._progress_queue = InlineQueue(bar)
            torch.set_num_threads(1)
            for fn, s in jobs:
                take_models(s, fn(str(r), cfg, s))
            for s in cfg.seeds:
                take_eval(s, _evaluate_seed(r, cfg, s, records[s]))
        else:
            run_pool(r, cfg, jobs, n_workers, bar, records, take_models, take_eval, _evaluate_seed)
    finally:
        zoo_workers._progress_queue = None
        torch.set_num_threads(old_threads)
        bar.close()

    rows.sort(key=lambda x: ([p.key for p in _PAIRS].index(x["pair"]), list(cfg.tasks).index(x["task"]), x["seed"]))
    archs = {cfg.arch.name: cfg.arch.to_json(), cfg.wide_arch.name: cfg.wide_arch.to_json()}
    order = {n: i for i, n in enumerate(PRETRAINED)}
    models = [rec for s in cfg.seeds for rec in sorted(
        records[s].values(), key=lambda rc: (order[rc["entry"]["name"].split("+")[0]], rc["entry"]["task"] or ""))]
    elapsed = time.perf_counter() - t0
    manifest = {
        "format": ZOO_FORMAT, "variant": variant, "seeds": list(cfg.seeds), "tasks": list(cfg.tasks),
        "pretrain_task": PRETRAIN_TASK, "archs": archs, "fingerprint": fingerprint,
        "build_seconds": round(elapsed, 1), "workers": n_workers, "model_seconds": seconds,
        "model_cpu_seconds": cpu_seconds, "cpu_seconds": round(time.process_time() - c0 + children_cpu() - k0, 1),
        "pretrain_accuracy": pre_acc, "pairs": [asdict(p) for p in _PAIRS], "models": models, "table": rows,
    }
    tmp = r / f".{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, r / MANIFEST)
    (r / ".zoo-building").unlink(missing_ok=True)
    if progress:
        print(f"zoo ({variant}, seeds {', '.join(map(str, cfg.seeds))}) built in {elapsed:.0f} s "
              f"({manifest['cpu_seconds']:.0f} CPU s, {n_workers} worker(s)) at {r}")
        print(format_table(rows))
    info = {k: v for k, v in manifest.items() if k != "models"}
    info["skipped"], info["summary"] = False, summarize(rows)
    return info


def _main(argv: Optional[list[str]] = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m transport.zoo", description="Build or list the demo zoo.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="train the zoo (deterministic) and print the phenomenon table")
    b.add_argument("--variant", default="full", choices=sorted(VARIANTS))
    b.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=None, help="e.g. 0,1,2")
    b.add_argument("--force", action="store_true", help="rebuild even if a zoo is already built there")
    b.add_argument("--workers", type=int, default=None)
    b.add_argument("--root", default=None, help="zoo directory (default: $TRANSPORT_ZOO_DIR or the cache)")
    ls = sub.add_parser("list", help="list the models of the built zoo")
    ls.add_argument("--root", default=None)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "build":
            info = build(args.root, args.variant, args.seeds, args.force, True, args.workers)
            if info["skipped"]:
                print(f"zoo already built at {_root(args.root)} ({info['build_seconds']} s); --force rebuilds")
                print(format_table(info["table"]))
        else:
            for e in list_models(args.root):
                print(f"{e.ref:<24} {e.kind:<10} {e.arch:<20} {e.description}")
    except TransportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


__all__ = ["ZooConfig", "VARIANTS", "build", "summarize", "format_table", "pretrain_source", "PRETRAINED",
           "PRETRAIN_TASK"]

if __name__ == "__main__":
    sys.exit(_main())
