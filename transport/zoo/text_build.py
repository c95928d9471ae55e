"""The text demo zoo: tiny Llama-style decoders (grouped-query attention, rotary positions, SwiGLU, RMSNorm)
pretrained on the running interpreter's standard library mixed with synthetic sequences.

Per seed: a source ``A`` and its fine-tunes on each downstream task (:mod:`.text_tasks`), and targets of
graded difficulty, each fine-tuned on every task (the oracles):

- ``B_control``: A with its residual units, MLP units, key/value heads (each with its query heads) and
  value dims shuffled (the same function; its oracles are A's fine-tunes shuffled alike, exactly);
- ``B_next``: forked from A's run after its early steps, trained on with other data, then shuffled;
- ``B_indep`` / ``W_indep``: unrelated seeds, the second 2x wider;
- ``W_grown``: 2x wider, grown from A by duplication, trained on, shuffled;
- ``D_grown``: deeper, identity blocks inserted between A's, trained on, shuffled;
- ``V_vocab``: A with an extended vocabulary (new merges appended), trained on, shuffled.

Every model is a Hugging Face ``save_pretrained`` directory with its tokenizer. ``python -m
transport.zoo.text_build`` trains it deterministically (same seed and machine: identical files), prints the
phenomenon table and writes ``manifest.json`` last. The standard library is read at build time; only its
hash and the Python version are stored. No library module imports this one.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from transport.core.arch import Arch
from transport.core.symmetry import Perms, apply_permutation
from transport.core.vocab import map_rows, token_table, vocab_map
from transport.errors import TransportError
from transport.files import write_safetensors
from transport.sources import init_params
from transport.text import DEFAULT_TEMPLATE
from transport.zoo import workers as zoo_workers
from transport.core.symmetry import flatten
from transport.zoo.shuffle import grow_params, random_shuffle
from transport.zoo.text_corpus import make_tokenizer, pretraining_texts, read_stdlib, vocab_size
from transport.zoo.store import MANIFEST, read_manifest
from transport.zoo.text_store import TEXT_PAIRS, TEXT_ZOO_FORMAT, text_zoo_root
from transport.zoo.text_files import PRETRAINED, load_directory, load_tasks, save_directory
from transport.zoo.text_tasks import task_rows, write_task
from transport.zoo.text_train import finetune, grow_depth, pretrain, texts_batch
from transport.zoo.train import TrainConfig
from transport.zoo.workers import CallbackBar, InlineQueue, Ticker, children_cpu, drain, init_worker, progress_bar

Tensor = torch.Tensor
FAMILY = "hf_llama"


@dataclass(frozen=True)
class TextZooConfig:
    """Everything that determines a text zoo build (its JSON is the build's fingerprint)."""

    variant: str
    seeds: tuple[int, ...]
    tasks: tuple[str, ...] = ("codeprose", "brackets", "sorted")
    width: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    mlp_width: int = 160
    deep_layers: int = 3
    context: int = 192
    chars: int = 128  # characters per pretraining window
    synthetic: float = 0.25  # fraction of pretraining texts that are synthetic sequences
    pretrain: TrainConfig = TrainConfig(steps=250, batch_size=16, lr=4e-3, weight_decay=0.01)
    fork_step: int = 30
    next_train: TrainConfig = TrainConfig(steps=220, batch_size=16, lr=4e-3, weight_decay=0.01)
    grow_noise: float = 0.05
    grow_train: TrainConfig = TrainConfig(steps=60, batch_size=16, lr=2e-3, weight_decay=0.01)
    wide_pretrain: TrainConfig = TrainConfig(steps=200, batch_size=16, lr=4e-3, weight_decay=0.01)
    vocab_train: TrainConfig = TrainConfig(steps=60, batch_size=16, lr=2e-3, weight_decay=0.01)
    finetune: TrainConfig = TrainConfig(steps=200, batch_size=16, lr=2e-3, weight_decay=0.0)
    #: fine-tuning steps per task where they differ from ``finetune.steps`` (the brackets need the longest)
    finetune_steps: tuple[tuple[str, int], ...] = (("codeprose", 100), ("brackets", 500), ("sorted", 200))
    per_class: tuple[tuple[str, int], ...] = (("codeprose", 200), ("brackets", 200), ("sorted", 200))
    alpha_grid: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)

    def arch(self, name: str, width: int = 0, layers: int = 0, extended: bool = False) -> Arch:
        w = width or self.width
        k = w // self.width
        return Arch(family=FAMILY, name=name, width=w, layers=layers or self.layers, heads=k * self.heads,
                    kv_heads=k * self.kv_heads, head_dim=self.width // self.heads, mlp_width=k * self.mlp_width,
                    mlp="gated", act="silu", norm="rms", norm_eps=1e-6, norm_bias=False, qkv_bias=False,
                    o_bias=False, mlp_bias=False, position="rope", rope_theta=10000.0, causal=True, stem="tokens",
                    vocab_size=vocab_size(extended), context=self.context, ln_pre=False, cls_token=False,
                    readout="lm", tied_embeddings=False)

    def archs(self) -> dict[str, Arch]:
        w, L = self.width, self.layers
        return {"A": self.arch(f"zoo:text-llama-w{w}-l{L}"),
                "W": self.arch(f"zoo:text-llama-w{2 * w}-l{L}", width=2 * w),
                "D": self.arch(f"zoo:text-llama-w{w}-l{self.deep_layers}", layers=self.deep_layers),
                "V": self.arch(f"zoo:text-llama-w{w}-l{L}-v{vocab_size(True)}", extended=True)}

    def arch_key(self, model: str) -> str:
        pre = model.split("+")[0]
        return {"W_grown": "W", "W_indep": "W", "D_grown": "D", "V_vocab": "V"}.get(pre, "A")

    def finetune_for(self, task: str) -> TrainConfig:
        """The fine-tuning run of one task (``finetune`` with that task's steps)."""
        return replace(self.finetune, steps=dict(self.finetune_steps).get(task, self.finetune.steps))

    def fingerprint(self) -> dict:
        d = asdict(self)
        d["format"] = TEXT_ZOO_FORMAT
        return d


VARIANTS: dict[str, TextZooConfig] = {
    "full": TextZooConfig(variant="full", seeds=(0, 1)),
    "test": TextZooConfig(
        variant="test", seeds=(0,), width=32, layers=2, heads=4, kv_heads=2, mlp_width=64, deep_layers=3,
        context=160, chars=64, pretrain=TrainConfig(steps=40, batch_size=8, lr=4e-3, weight_decay=0.01),
        fork_step=8, next_train=TrainConfig(steps=32, batch_size=8, lr=4e-3, weight_decay=0.01),
        grow_train=TrainConfig(steps=8, batch_size=8, lr=2e-3, weight_decay=0.01),
        wide_pretrain=TrainConfig(steps=20, batch_size=8, lr=4e-3, weight_decay=0.01),
        vocab_train=TrainConfig(steps=8, batch_size=8, lr=2e-3, weight_decay=0.01),
        finetune=TrainConfig(steps=40, batch_size=8, lr=5e-3, weight_decay=0.0), finetune_steps=(),
        per_class=(("codeprose", 30), ("brackets", 30), ("sorted", 30)), alpha_grid=(0.0, 0.5, 1.0, 1.5)),
}


def sub_seed(seed: int, label: str) -> int:
    """A stable sub-seed for one random draw of one zoo seed (same on every machine and run)."""
    return zlib.crc32(f"text:{seed}:{label}".encode()) & 0x7FFFFFFF


_DESCRIPTIONS = {
    "A": "source: pretrained on the standard library and synthetic sequences",
    "B_control": "A with its units and heads shuffled (identical function)",
    "B_next": "forked from A's run after its early steps, trained on with other data, then shuffled",
    "B_next_unshuffled": "B_next before its hidden shuffle",
    "B_indep": "pretrained from an unrelated seed",
    "W_grown": "2x wider, grown from A by duplication, trained on, then shuffled",
    "W_indep": "2x wider, pretrained from an unrelated seed",
    "D_grown": "deeper, identity blocks inserted between A's, trained on, then shuffled",
    "V_vocab": "A with an extended vocabulary, trained on with it, then shuffled",
}


# ----------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------
class _Writer:
    """Saves the models of one seed and remembers their manifest records."""

    def __init__(self, root: Path, seed: int, cfg: TextZooConfig):
        self.root, self.seed, self.cfg = root, seed, cfg
        self.records: list[dict] = []
        self.archs = cfg.archs()

    def save(self, name: str, params: dict[str, Tensor], tokenizer, task: Optional[str] = None,
             base: Optional[str] = None, run=None, perm: Optional[Perms] = None) -> None:
        pre = name.split("+")[0]
        key = self.cfg.arch_key(name)
        arch = self.archs[key]
        d = self.root / f"seed{self.seed}" / name
        save_directory(d, arch, params, tokenizer)
        desc = _DESCRIPTIONS[pre] if task is None else f"{pre} fine-tuned on {task}"
        rec = {"name": name, "seed": self.seed, "kind": "pretrained" if task is None else "finetuned", "task": task,
               "base": base, "arch": arch.name, "description": desc, "dir": str(d.relative_to(self.root)),
               "seconds": round(run.seconds, 3) if run else 0.0, "cpu_seconds": round(run.cpu_seconds, 3) if run else 0.0}
        if perm is not None:
            pf = self.root / f"seed{self.seed}" / f"{name}.perm.safetensors"
            write_safetensors(pf, {k: v.contiguous() for k, v in flatten(perm).items()})
            rec["perm_file"] = str(pf.relative_to(self.root))
        self.records.append(rec)


# ----------------------------------------------------------------------------------------------
# tasks and data
# ----------------------------------------------------------------------------------------------
def write_tasks(root: Path, cfg: TextZooConfig) -> dict[str, dict]:
    """The downstream tasks' JSON Lines files (seed 0 of the rows; splits are load_text_file's)."""
    import hashlib

    lib = read_stdlib()
    per = dict(cfg.per_class)
    out = {}
    for t in cfg.tasks:
        p = write_task(root / "tasks" / f"{t}.jsonl", task_rows(t, lib, 0, per[t]))
        out[t] = {"file": str(p.relative_to(root)), "sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
                  "template": DEFAULT_TEMPLATE}
    return out


def drawer(cfg: TextZooConfig, tokenizer) -> Callable[[np.random.Generator, int], object]:
    lib = read_stdlib()
    return lambda rng, n: texts_batch(tokenizer, pretraining_texts(lib, rng, n, cfg.chars, cfg.synthetic), cfg.context)


def _finetune_all(w: _Writer, name: str, params: dict[str, Tensor], tokenizer, tasks: dict, tick) -> dict:
    arch = w.archs[w.cfg.arch_key(name)]
    out = {}
    for t, task in tasks.items():
        run = finetune(params, arch, task, w.cfg.finetune_for(t).with_seed(sub_seed(w.seed, f"finetune:{t}")), tick)
        w.save(f"{name}+{t}", run.params, tokenizer, t, name, run)
        out[t] = run.params
    return out


# ----------------------------------------------------------------------------------------------
# the jobs (each in a worker process, one thread)
# ----------------------------------------------------------------------------------------------
def _job_source(root: str, cfg: TextZooConfig, seed: int) -> dict:
    """A, its fine-tunes, B_control (+ exact oracles) and B_next (forked from A's run)."""
    torch.set_num_threads(1)
    w, tick, tok = _Writer(Path(root), seed, cfg), Ticker(zoo_workers.report), make_tokenizer()
    arch, tasks, draw = w.archs["A"], load_tasks(Path(root), cfg, tok, cfg.context), drawer(cfg, tok)
    res = pretrain(init_params(arch, sub_seed(seed, "A:init")), arch, draw,
                   cfg.pretrain.with_seed(sub_seed(seed, "A:data")), (cfg.fork_step,), tick)
    w.save("A", res.params, tok, run=res)
    a_ft = _finetune_all(w, "A", res.params, tok, tasks, tick)
    perm = random_shuffle(arch, sub_seed(seed, "B_control:perm"))
    w.save("B_control", apply_permutation(res.params, perm, arch), tok, perm=perm)
    for t in cfg.tasks:  # the oracle of a shuffled A is A's fine-tune shuffled alike (exact)
        w.save(f"B_control+{t}", apply_permutation(a_ft[t], perm, arch), tok, t, "B_control")
    nxt = pretrain(res.snapshots[cfg.fork_step], arch, draw, cfg.next_train.with_seed(sub_seed(seed, "B_next:data")),
                   on_step=tick)
    w.save("B_next_unshuffled", nxt.params, tok, run=nxt)
    perm = random_shuffle(arch, sub_seed(seed, "B_next:perm"))
    b = apply_permutation(nxt.params, perm, arch)
    w.save("B_next", b, tok, perm=perm)
    _finetune_all(w, "B_next", b, tok, tasks, tick)
    tick.flush()
    return {"records": w.records}


def _job_independent(root: str, cfg: TextZooConfig, seed: int) -> dict:
    """B_indep and W_indep (unrelated seeds) with their fine-tunes."""
    torch.set_num_threads(1)
    w, tick, tok = _Writer(Path(root), seed, cfg), Ticker(zoo_workers.report), make_tokenizer()
    tasks, draw = load_tasks(Path(root), cfg, tok, cfg.context), drawer(cfg, tok)
    for name, key, tcfg in (("B_indep", "A", cfg.pretrain), ("W_indep", "W", cfg.wide_pretrain)):
        arch = w.archs[key]
        res = pretrain(init_params(arch, sub_seed(seed, f"{name}:init")), arch, draw,
                       tcfg.with_seed(sub_seed(seed, f"{name}:data")), on_step=tick)
        w.save(name, res.params, tok, run=res)
        _finetune_all(w, name, res.params, tok, tasks, tick)
    tick.flush()
    return {"records": w.records}


def _noisy(params: dict[str, Tensor], scale: float, seed: int) -> dict[str, Tensor]:
    """Symmetry-breaking noise: std ``scale`` x each tensor's std (seeded)."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * float(v.std() if v.numel() > 1 else 0.0) * torch.randn(v.shape, generator=g)
            for k, v in params.items()}


def _job_grown(root: str, cfg: TextZooConfig, seed: int) -> dict:
    """W_grown, D_grown and V_vocab, each made from A (read back from its directory)."""
    torch.set_num_threads(1)
    r = Path(root)
    w, tick, tok = _Writer(r, seed, cfg), Ticker(zoo_workers.report), make_tokenizer()
    archs, tasks, draw = w.archs, load_tasks(r, cfg, tok, cfg.context), drawer(cfg, tok)
    A = load_directory(r / f"seed{seed}" / "A", archs["A"]).params
    made = {"W_grown": grow_params(A, archs["A"], archs["W"]),
            "D_grown": grow_depth(A, archs["A"], archs["D"], init_params(archs["D"], sub_seed(seed, "D:init")))}
    for name, key in (("W_grown", "W"), ("D_grown", "D")):
        arch = archs[key]
        g = pretrain(_noisy(made[name], cfg.grow_noise, sub_seed(seed, f"{name}:noise")), arch, draw,
                     cfg.grow_train.with_seed(sub_seed(seed, f"{name}:data")), on_step=tick)
        perm = random_shuffle(arch, sub_seed(seed, f"{name}:perm"))
        p = apply_permutation(g.params, perm, arch)
        w.save(name, p, tok, run=g, perm=perm)
        _finetune_all(w, name, p, tok, tasks, tick)
    vtok = make_tokenizer(extended=True)
    vmap = vocab_map(token_table(tok), token_table(vtok), archs["A"].vocab_size, archs["V"].vocab_size)
    v0, _ = map_rows(A, archs["A"], vmap)
    gen = torch.Generator().manual_seed(sub_seed(seed, "V_vocab:rows"))
    new = vmap.rows < 0  # new tokens: small random rows (the embedding's scale)
    for k in ("embed.tokens", "head.unembed"):
        v0[k][new] = float(A[k].std()) * torch.randn(int(new.sum()), A[k].shape[1], generator=gen)
    vt = pretrain(v0, archs["V"], drawer(cfg, vtok), cfg.vocab_train.with_seed(sub_seed(seed, "V_vocab:data")),
                  on_step=tick)
    perm = random_shuffle(archs["V"], sub_seed(seed, "V_vocab:perm"))
    p = apply_permutation(vt.params, perm, archs["V"])
    w.save("V_vocab", p, vtok, run=vt, perm=perm)
    _finetune_all(w, "V_vocab", p, vtok, load_tasks(r, cfg, vtok, cfg.context), tick)
    tick.flush()
    return {"records": w.records}


def total_units(cfg: TextZooConfig) -> int:
    nt, ft = len(cfg.tasks), sum(cfg.finetune_for(t).steps for t in cfg.tasks)
    per_seed = (cfg.pretrain.steps * 2 + cfg.next_train.steps + cfg.wide_pretrain.steps + 2 * cfg.grow_train.steps
                + cfg.vocab_train.steps + 7 * ft + nt)
    return per_seed * len(cfg.seeds)


# ----------------------------------------------------------------------------------------------
# the build
# ----------------------------------------------------------------------------------------------
def _schedule(r: Path, cfg: TextZooConfig, n_workers: int, bar, take_models, take_eval) -> None:
    """Per seed: the source and independent jobs, the grown job once A is saved, the evaluation once all three
    are done. ``n_workers`` <= 1 runs them in this process in that order."""
    from transport.zoo.text_eval import evaluate_seed

    records: dict[int, dict[str, dict]] = {s: {} for s in cfg.seeds}

    def took(seed: int, out: dict) -> None:
        for rec in out["records"]:
            records[seed][rec["name"]] = rec
        take_models(seed, out)

    if n_workers <= 1:
        zoo_workers._progress_queue = InlineQueue(bar)
        for s in cfg.seeds:
            for fn in (_job_source, _job_independent, _job_grown):
                took(s, fn(str(r), cfg, s))
            take_eval(s, evaluate_seed(r, cfg, s, records[s]))
        return
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    done = {s: 0 for s in cfg.seeds}
    with cf.ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx, initializer=init_worker,
                                initargs=(queue,)) as pool:
        pending = {}
        for s in cfg.seeds:
            pending[pool.submit(_job_source, str(r), cfg, s)] = ("source", s)
            pending[pool.submit(_job_independent, str(r), cfg, s)] = ("indep", s)
        while pending:
            finished, _ = cf.wait(list(pending), timeout=0.2, return_when=cf.FIRST_COMPLETED)
            drain(queue, bar)
            for f in finished:
                what, s = pending.pop(f)
                out = f.result()
                if what == "eval":
                    take_eval(s, out)
                    continue
                took(s, out)
                done[s] += 1
                if what == "source":
                    pending[pool.submit(_job_grown, str(r), cfg, s)] = ("grown", s)
                if done[s] == 3:
                    pending[pool.submit(evaluate_seed, r, cfg, s, records[s])] = ("eval", s)
        drain(queue, bar)


def _prepare_root(r: Path, force: bool, fingerprint: dict, progress: bool) -> Optional[dict]:
    """The manifest of an equal build already there (nothing to do), else None with the directory ready."""
    old = read_manifest(r)
    if old is not None and not force:
        if old.get("format") == TEXT_ZOO_FORMAT and old.get("fingerprint") == json.loads(json.dumps(fingerprint)) \
                and old.get("corpus", {}).get("stdlib_sha256") == read_stdlib().sha256:
            return old
        if old.get("format") == TEXT_ZOO_FORMAT and old.get("corpus", {}).get("python") == read_stdlib().python \
                and old.get("fingerprint") != json.loads(json.dumps(fingerprint)):
            raise TransportError(f"{r}: holds a text zoo built with another configuration (variant "
                                 f"'{old.get('variant')}', seeds {old.get('seeds')}); rebuild with --force")
        if progress:  # our own cache from another release or interpreter: rebuilt
            print(f"the text zoo at {r} was built by another version or interpreter: rebuilding", file=sys.stderr)
    if r.exists() and any(r.iterdir()) and old is None and not (r / ".zoo-building").exists() and not force:
        raise TransportError(f"{r}: exists and is not a text zoo directory; choose another directory or use --force")
    r.mkdir(parents=True, exist_ok=True)
    (r / MANIFEST).unlink(missing_ok=True)
    for sub in list(r.glob("seed*")) + [r / "tasks"]:
        shutil.rmtree(sub, ignore_errors=True)
    (r / ".zoo-building").write_text("incomplete build; run `python -m transport.zoo.text_build --force`\n")
    return None


def _marker_progress(r: Path, on_progress: Optional[Callable[[float, str], None]]) -> Callable[[float, str], None]:
    """Progress written into the build marker's first line (``FRACTION MESSAGE``, at most every percent), so
    another process (the app) can show a build running in the background; then ``on_progress``."""
    last = [-1.0]

    def report(frac: float, msg: str) -> None:
        if frac - last[0] >= 0.01 or frac >= 1.0:
            last[0] = frac
            marker = r / ".zoo-building"
            if marker.exists():
                tmp = r / f".zoo-building.tmp-{os.getpid()}"
                tmp.write_text(f"{frac:.3f} {msg}\nincomplete build; run `python -m transport.zoo.text_build --force`\n")
                os.replace(tmp, marker)
        if on_progress is not None:
            on_progress(frac, msg)

    return report


def build(root: Optional[str | os.PathLike] = None, variant: str = "full", seeds: Optional[list[int]] = None,
          force: bool = False, progress: bool = True, workers: Optional[int] = None,
          on_progress: Optional[Callable[[float, str], None]] = None) -> dict:
    """Train the text zoo deterministically, measure the phenomenon and write ``manifest.json`` last.

    Skips the work when an equal build (configuration, standard library hash) is there, unless ``force``.
    ``workers``: processes (default up to 2, one thread each; the files do not depend on it).
    """
    from transport.zoo.text_eval import format_table, summarize

    if variant not in VARIANTS:
        raise TransportError(f"unknown text zoo variant '{variant}' (known: {', '.join(VARIANTS)})")
    cfg = VARIANTS[variant]
    if seeds is not None:
        if not seeds or len(set(seeds)) != len(seeds) or any(int(s) < 0 for s in seeds):
            raise TransportError(f"text zoo seeds must be distinct non-negative integers, got {list(seeds)}")
        cfg = replace(cfg, seeds=tuple(int(s) for s in seeds))
    r = Path(root) if root is not None else text_zoo_root()
    fingerprint = cfg.fingerprint()
    old = _prepare_root(r, force, fingerprint, progress)
    if old is not None:
        info = {k: v for k, v in old.items() if k != "models"}
        info["skipped"], info["summary"] = True, summarize(info["table"])
        return info
    t0, c0, k0 = time.perf_counter(), time.process_time(), children_cpu()
    lib = read_stdlib()
    task_files = write_tasks(r, cfg)
    n_workers = workers if workers is not None else max(1, min(2, os.cpu_count() or 1))
    bar = CallbackBar(progress_bar(total_units(cfg), f"text ({variant})", progress), total_units(cfg),
                      f"text ({variant})", _marker_progress(r, on_progress))
    models: dict[int, list[dict]] = {s: [] for s in cfg.seeds}
    rows: list[dict] = []
    losses: dict[str, float] = {}

    def take_models(seed: int, out: dict) -> None:
        models[seed].extend(out["records"])

    def take_eval(seed: int, out: dict) -> None:
        rows.extend(out["rows"])
        losses.update({f"{k}@{seed}": v for k, v in out["pretrain_loss"].items()})

    old_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _schedule(r, cfg, n_workers, bar, take_models, take_eval)
    finally:
        zoo_workers._progress_queue = None
        torch.set_num_threads(old_threads)
        bar.close()
    keys = [p.key for p in TEXT_PAIRS]
    rows.sort(key=lambda x: (keys.index(x["pair"]), list(cfg.tasks).index(x["task"]), x["seed"]))
    order = {n: i for i, n in enumerate(PRETRAINED)}
    recs = [rc for s in cfg.seeds for rc in sorted(models[s], key=lambda x: (order[x["name"].split("+")[0]],
                                                                             x["task"] or ""))]
    elapsed = time.perf_counter() - t0
    manifest = {
        "format": TEXT_ZOO_FORMAT, "variant": variant, "seeds": list(cfg.seeds), "tasks": list(cfg.tasks),
        "corpus": lib.record(), "archs": {a.name: a.to_json() for a in cfg.archs().values()},
        "fingerprint": fingerprint, "task_files": task_files, "build_seconds": round(elapsed, 1),
        "cpu_seconds": round(time.process_time() - c0 + children_cpu() - k0, 1), "workers": n_workers,
        "pretrain_loss": losses, "pairs": [asdict(p) for p in TEXT_PAIRS], "models": recs, "table": rows,
    }
    tmp = r / f".{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, r / MANIFEST)
    (r / ".zoo-building").unlink(missing_ok=True)
    if progress:
        print(f"text zoo ({variant}, seeds {', '.join(map(str, cfg.seeds))}) built in {elapsed:.0f} s "
              f"({manifest['cpu_seconds']:.0f} CPU s, {n_workers} worker(s)) at {r}")
        print(format_table(rows))
    info = {k: v for k, v in manifest.items() if k != "models"}
    info["skipped"], info["summary"] = False, summarize(rows)
    return info


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    from transport.zoo.text_eval import format_table

    ap = argparse.ArgumentParser(prog="python -m transport.zoo.text_build",
                                 description="Build the text demo zoo (deterministic) and print its phenomenon table.")
    ap.add_argument("--out", default=None, help="zoo directory (default: $TRANSPORT_TEXT_ZOO_DIR or the cache)")
    ap.add_argument("--variant", default="full", choices=sorted(VARIANTS))
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=None, help="e.g. 0,1")
    ap.add_argument("--force", action="store_true", help="rebuild even if an equal zoo is already built there")
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args(argv)
    try:
        info = build(args.out, args.variant, args.seeds, args.force, True, args.workers)
        if info["skipped"]:
            print(f"text zoo already built ({info['build_seconds']} s, {info['cpu_seconds']} CPU s); --force rebuilds")
            print(format_table(info["table"]))
    except TransportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


__all__ = ["TextZooConfig", "VARIANTS", "build", "save_directory", "load_directory", "PRETRAINED", "total_units"]

if __name__ == "__main__":
    sys.exit(main())
