"""What the explorer does, without Streamlit: resolve inputs, run a transfer, re-apply cheaply, ablate layers.

The pages call these functions; ``bench/app_interaction.py`` times them. Expensive objects (models,
tasks, alignments) live in a process-wide :class:`MemoryCache` keyed by content hashes; everything a
user selects lives in that user's session (the pages keep :class:`Run` objects in ``st.session_state``).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from transport import cache as disk_cache
from transport.data import Task, builtin_tasks, load_task
from transport.errors import NotImplementedYet, TransportError
from transport.core.evaluate import accuracy, default_alpha_grid, parse_alpha_grid, predictions, sweep_alpha
from transport.methods import METHOD_NAMES, MethodInfo, Progress, TransportInputs, check_compatible, get_method
from transport.core.model import Model
from transport.pipeline import Prepared, TransferResult, on_target, prepare, transfer
from transport.core.task_vector import TaskVector
from transport.core.layout import same_shapes
from transport.tower_only import tower_view
from transport.sources import load_task_vector
from transport.lora import is_adapter_dir

# ----------------------------------------------------------------------------------------------
# where the app may write
# ----------------------------------------------------------------------------------------------
def output_dir() -> Path:
    """``$TRANSPORT_APP_DIR``, else ``<system temp>/task-transport-app``: uploads go here, nowhere else."""
    env = os.environ.get("TRANSPORT_APP_DIR")
    return Path(env) if env else Path(tempfile.gettempdir()) / "task-transport-app"


def save_upload(name: str, data: bytes) -> Path:
    """Store an uploaded file under the app's output dir (content-addressed: never overwrites a user file)."""
    if not data:
        raise TransportError(f"{name}: the uploaded file is empty")
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).name).lstrip(".") or "upload"
    digest = hashlib.sha256(data).hexdigest()[:16]
    d = output_dir() / "uploads" / digest
    d.mkdir(parents=True, exist_ok=True)
    path = d / safe
    if not path.exists():
        tmp = d / f".{safe}.{uuid.uuid4().hex}"
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------------------
# a process-wide cache (the app wraps one in st.cache_resource)
# ----------------------------------------------------------------------------------------------
class MemoryCache:
    """A small thread-safe LRU: ``get_or_make(key, make)`` computes once even when two sessions ask at once."""

    def __init__(self, max_items: int = 24):
        self.max_items = max_items
        self._data: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._key_locks: dict[str, threading.Lock] = {}

    def get(self, key: str) -> Any:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return self._data[key]
        return None

    def get_or_make(self, key: str, make: Callable[[], Any]) -> Any:
        hit = self.get(key)
        if hit is not None:
            return hit
        with self._lock:
            lock = self._key_locks.setdefault(key, threading.Lock())
        with lock:
            hit = self.get(key)
            if hit is not None:
                return hit
            value = make()
            with self._lock:
                self._data[key] = value
                self._data.move_to_end(key)
                while len(self._data) > self.max_items:
                    self._data.popitem(last=False)
                self._key_locks.pop(key, None)
            return value

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


DEFAULT_CACHE = MemoryCache()


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelRef:
    """A model the user picked: a reference ``transport.sources.load_model`` reads, plus an architecture for
    files that do not record theirs. ``task_vector``: the file is a task vector (source fine-tuned side)."""

    ref: str
    arch: str = ""
    task_vector: bool = False

    def key(self) -> str:
        """The reference plus a file's size and mtime, so an edited file is reloaded."""
        p = Path(self.ref)
        stat = ""
        if not self.ref.startswith(("zoo:", "open_clip:", "hf:")) and p.exists():
            s = p.stat()
            stat = f"{s.st_size}:{s.st_mtime_ns}"
        if self.ref.startswith("zoo:"):
            stat = os.environ.get("TRANSPORT_TEXT_ZOO_DIR" if self.ref.startswith("zoo:text/") else "TRANSPORT_ZOO_DIR",
                                  "")
        return json.dumps([self.ref, self.arch, self.task_vector, stat])

    @property
    def short(self) -> str:
        r = self.ref
        if r.startswith("zoo:"):
            return r[4:]
        return Path(r).name if Path(r).exists() else r


@dataclass(frozen=True)
class Setup:
    """One transfer question: source pretrained + source fine-tuned -> target, on a task."""

    source_pre: ModelRef
    source_ft: ModelRef
    target: ModelRef
    task: str
    oracle: Optional[ModelRef] = None
    seed: int = 0
    device: str = "cpu"
    alpha_grid: str = ""  # 'LO:HI:N'; '' = the default grid
    pair: str = ""  # the demo zoo's pair key ('control', 'next', ...) when the models are a zoo pair
    tower_only: bool = False  # towers differing only in their output projection: move the tower alone

    def signature(self) -> str:
        parts = [self.source_pre.key(), self.source_ft.key(), self.target.key(), self.task,
                 self.oracle.key() if self.oracle else "", self.seed, self.device, self.alpha_grid]
        if self.tower_only:  # older signatures stay as they were
            parts.append("tower_only")
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]

    @property
    def label(self) -> str:
        return f"{self.source_ft.short} ({self.source_pre.short}) -> {self.target.short} on {self.task}"


ZERO_TAU = "tau is zero (source fine-tuned equals source pretrained): there is nothing to transport"


@dataclass
class Loaded:
    """The loaded inputs of a setup (shared, read-only objects from the cache) plus their content hashes."""

    source_pre: Model
    source_ft: Model
    target: Model
    oracle: Optional[Model]
    task: Task
    tau: TaskVector
    hashes: dict[str, str]
    adapter: Optional[Any] = None  # the source's PEFT LoRA adapter when source_ft is one (transport.lora.Adapter)
    tower_only: bool = False  # the setup moves the tower alone (transport.tower_only)

    def moved_source(self) -> tuple[Model, tuple[str, ...]]:
        """The source pretrained model the methods see (in the target's architecture when moving the tower
        alone) and the target tensors left out of the transport."""
        if not self.tower_only:
            return self.source_pre, ()
        view = tower_view(self.source_pre, self.source_ft, self.target)
        return view.source_pre, tuple(view.left_out)

    @property
    def tau_is_zero(self) -> bool:
        """The fine-tuned source is the pretrained source itself (same content hash, or every entry of tau 0)."""
        return self.hashes["source_pre"] == self.hashes["source_ft"] or all(
            not bool(t.any()) for t in self.tau.tensors.values())


def _load_model(mref: ModelRef, cache: MemoryCache) -> tuple[Model, str]:
    from transport.sources import load_model

    def make() -> tuple[Model, str]:
        m = load_model(mref.ref, arch=mref.arch or None)
        return m, disk_cache.hash_tensors(m.params)

    return cache.get_or_make("model:" + mref.key(), make)


def _load_task(name: str, image_size: int, cache: MemoryCache) -> tuple[Task, str]:
    def make() -> tuple[Task, str]:
        if not name or not name.strip():
            raise TransportError("no task given: pick a built-in task or give an ImageFolder directory")
        t = load_task(name.strip(), image_size=image_size)
        x, y = t.split("train")
        if len(y) == 0:
            raise TransportError(f"task {name}: the train split is empty")
        return t, disk_cache.hash_tensors({"x": x, "y": y})

    return cache.get_or_make(f"task:{name}:{image_size}", make)


def _load_text_task(path: str, target: Model, h_target: str, cache: MemoryCache) -> tuple[Any, str]:
    """A text task file read with the target's tokenizer (the models' token ids are checked by the transfer,
    after a vocabulary map where the source's vocabulary differs)."""
    from transport.pipeline import load_text_task
    from transport.textfile import is_text_file

    def make() -> tuple[Any, str]:
        if not path or not is_text_file(path):
            raise TransportError(f"{target.ref} reads token ids: give a text file (.jsonl or .csv with a 'text' "
                                 f"column), not '{path}'")
        t = load_text_task(path, target, [])
        x, y = t.split("train")
        tensors = {"ids": x.ids, "mask": x.mask, **({"y": y} if y is not None else {})}
        return t, disk_cache.hash_tensors(tensors)

    return cache.get_or_make(f"text-task:{path}:{h_target}", make)


def load_setup(setup: Setup, cache: MemoryCache = DEFAULT_CACHE, progress: Progress = lambda f, m: None) -> Loaded:
    """Load (or fetch) the models and the task of ``setup``; a task-vector file gives source_ft = pre + tau."""
    progress(0.0, f"loading source {setup.source_pre.short}")
    pre, h_pre = _load_model(setup.source_pre, cache)
    adapter = None
    if is_adapter_dir(setup.source_ft.ref):  # a LoRA adapter of the source: source_ft = pre + scale * B A
        progress(0.03, f"reading LoRA adapter {setup.source_ft.short}")

        def make_adapter() -> tuple[Model, str, Any]:
            from transport.lora_run import adapter_source

            ad, ft = adapter_source(setup.source_ft.ref, pre)
            return ft, disk_cache.hash_tensors(ft.params), ad

        ft, h_ft, adapter = cache.get_or_make("lora:" + setup.source_ft.key() + h_pre, make_adapter)
    elif setup.source_ft.task_vector:
        progress(0.03, f"loading task vector {setup.source_ft.short}")

        def make_ft() -> tuple[Model, str]:
            tau = load_task_vector(setup.source_ft.ref, arch=pre.arch if setup.source_ft.arch else None)
            if not same_shapes(tau.arch, pre.arch):
                raise TransportError(f"{setup.source_ft.ref}: task vector is for {tau.arch.name}, the source "
                                     f"pretrained model {pre.ref} is {pre.arch.name}")
            ft = pre.with_params(tau.apply_to(pre.params), ref=setup.source_ft.ref)
            return ft, disk_cache.hash_tensors(ft.params)

        ft, h_ft = cache.get_or_make("tv:" + setup.source_ft.key() + h_pre, make_ft)
    else:
        progress(0.03, f"loading fine-tuned source {setup.source_ft.short}")
        ft, h_ft = _load_model(setup.source_ft, cache)
    if not same_shapes(pre.arch, ft.arch):
        raise TransportError(f"{ft.ref} ({ft.arch.name}) does not have the architecture of the source "
                             f"pretrained model {pre.ref} ({pre.arch.name})")
    progress(0.06, f"loading target {setup.target.short}")
    tgt, h_tgt = _load_model(setup.target, cache)
    oracle = None
    if setup.oracle is not None:
        oracle, _ = _load_model(setup.oracle, cache)
        if not same_shapes(oracle.arch, tgt.arch):
            raise TransportError(f"oracle {oracle.ref} ({oracle.arch.name}) does not have the target's "
                                 f"architecture ({tgt.arch.name})")
    if tgt.arch.stem == "tokens" and pre.arch.stem == "tokens":
        # another vocabulary (a new release's tokenizer): both source models' rows moved to the target's tokens
        # by token identity first, as the transfer does, so every page sees one vocabulary
        from transport.core.vocab import to_target_vocabulary

        def make_mapped() -> tuple[Model, Model, str, str]:
            p, f, _ = to_target_vocabulary(pre, ft, tgt)
            return p, f, disk_cache.hash_tensors(p.params), disk_cache.hash_tensors(f.params)

        if pre.arch.vocab_size != tgt.arch.vocab_size or pre.tokenizer is not None:
            pre, ft, h_pre, h_ft = cache.get_or_make(f"vocab:{h_pre}:{h_ft}:{h_tgt}", make_mapped)
    progress(0.08, f"loading task {setup.task}")
    if tgt.arch.stem == "tokens":  # texts: a JSONL / CSV file tokenised by the target's tokenizer
        task, h_task = _load_text_task(setup.task, tgt, h_tgt, cache)
    else:
        task, h_task = _load_task(setup.task, max(pre.arch.image_size, tgt.arch.image_size), cache)
    tau = cache.get_or_make(f"tau:{h_pre}:{h_ft}", lambda: TaskVector.from_models(pre.params, ft.params, pre.arch))
    return Loaded(pre, ft, tgt, oracle, task, tau, {"source_pre": h_pre, "source_ft": h_ft, "target": h_tgt,
                                                       "task": h_task}, adapter, setup.tower_only)


def rank_kept(run: "Run") -> str:
    """For a LoRA adapter source: the rank the run's transport keeps (exact factors), or the rank it is
    re-factorised to (the source's) with the largest relative truncation error; '' for other sources."""
    ad = run.loaded.adapter
    if ad is None:
        return ""
    if "rank_kept" not in run.memo:
        from transport.lora import transport_lowrank
        from transport.lora_write import adapter_files

        steps = [(p.method, p.alignment, p.options) for p in (run.base, run.prepared) if p is not None]
        moved = transport_lowrank(ad.tau, steps, run.loaded.target.arch)
        report = adapter_files(ad, moved, run.loaded.target)[1]
        ranks = "/".join(str(r) for r in report["ranks"])
        run.memo["rank_kept"] = (f"{ranks} (exact)" if not report["refactorised"] else
                                 f"{ranks} (SVD, error {report['max_rel_error']:.2g})")
    return run.memo["rank_kept"]


# ----------------------------------------------------------------------------------------------
# methods
# ----------------------------------------------------------------------------------------------
def method_status(name: str) -> tuple[Optional[MethodInfo], str]:
    """(MethodInfo, '') when the method is built, else (None, the one-line reason)."""
    try:
        return get_method(name), ""
    except NotImplementedYet as e:
        return None, str(e)


def built_methods() -> list[str]:
    return [n for n in METHOD_NAMES if method_status(n)[0] is not None]


def incompatibility(name: str, loaded: Loaded) -> str:
    """'' when ``name`` can run on the loaded pair and task, else the one-line reason."""
    info, why = method_status(name)
    if info is None:
        return why
    try:
        check_compatible(info, TransportInputs(loaded.moved_source()[0], loaded.target, loaded.task))
    except TransportError as e:
        return str(e)
    return ""


# ----------------------------------------------------------------------------------------------
# a run
# ----------------------------------------------------------------------------------------------
@dataclass
class Run:
    """One transfer in one session: inputs, the cached alignment and the evaluated result."""

    id: str
    setup: Setup
    method: str
    options: dict
    shots: int
    loaded: Loaded
    prepared: Prepared
    result: TransferResult
    seconds: float
    ablation: dict = field(default_factory=dict)  # (alpha, split) -> ablation table
    memo: dict = field(default_factory=dict)  # accuracies already measured for this run's sliders
    baselines: dict = field(default_factory=dict)  # extra baseline name -> AlphaSweep (cross-width naive)
    base: Optional[Prepared] = None  # composition: this method is applied to what ``base`` transported
    timings: dict = field(default_factory=dict)  # seconds: load, prepare, apply, sweep, evaluate, total

    def sweeps(self) -> dict:
        """Every alpha sweep of this run: the method's, the naive baseline's (same shapes or zero-padded)."""
        out = {}
        if self.result.sweep is not None:
            out[self.method] = self.result.sweep
        if self.result.naive_sweep is not None:
            out["naive"] = self.result.naive_sweep
        out.update({k: v for k, v in self.baselines.items() if v is not None})
        return out

    @property
    def info(self) -> MethodInfo:
        return self.prepared.method

    @property
    def arch(self):
        return self.loaded.target.arch

    def apply(self, alpha: float, **override: Any) -> TaskVector:
        """alpha * (transported tau) through the method's cheap ``apply`` (options may override apply-time ones)."""
        opts = {**self.prepared.options, **override}
        if self.method == "gradfix" and opts.get("variant") == "oracle":
            opts["oracle_tau"] = oracle_tau(self)
        tau = self.loaded.tau
        if self.base is not None:
            b = self.base
            tau = on_target(b.method.apply(b.alignment, tau, 1.0, b.options), b, self.loaded.target)
        return self.info.apply(self.prepared.alignment, tau, float(alpha), opts)

    def accuracy(self, delta: Optional[TaskVector], split: str = "test") -> float:
        t = self.loaded.target
        params = t.params if delta is None else delta.apply_to(t.params, 1.0)
        return accuracy(t, self.loaded.task, split, params, device=self.setup.device)


def oracle_tau(run: Run) -> TaskVector:
    if run.loaded.oracle is None:
        raise TransportError("the oracle variant needs the target's own fine-tuned model (an oracle)")
    o, t = run.loaded.oracle, run.loaded.target
    return TaskVector.from_models(t.params, o.params, t.arch)


def _prepare_key(method: str, options: dict, loaded: Loaded, shots: int, seed: int, device: str) -> str:
    """Memory-cache key of a prepared alignment: options the method reads only in ``apply`` are left out."""
    apply_only = get_method(method).apply_only
    return json.dumps(["prepare", method, sorted((k, str(v)) for k, v in options.items() if k not in apply_only),
                       loaded.hashes["source_pre"], loaded.hashes["target"], loaded.hashes["task"], shots, seed,
                       device])


def run_transfer(setup: Setup, method: str, options: Optional[dict] = None, shots: int = 2,
                 progress: Progress = lambda f, m: None, cache: MemoryCache = DEFAULT_CACHE,
                 alpha: Optional[float] = None) -> Run:
    """Load, prepare (memory cache, then the on-disk content-hashed cache), apply, pick alpha on validation,
    evaluate on test. Progress: loading 0-10 %, prepare 10-60 %, alpha sweeps 60-95 %, test accuracies 95-100 %.
    ``Run.timings`` says where the time went (load, prepare, apply, sweep, evaluate, total)."""
    t0 = time.perf_counter()
    info = get_method(method)
    loaded = load_setup(setup, cache, lambda f, m: progress(f, m))
    t_load = time.perf_counter() - t0
    opts = {**info.options, **(options or {})}
    on = opts.pop("on", None)  # composition: apply `method` to what method `on` transported
    moved, left_out = loaded.moved_source()
    check_compatible(info, TransportInputs(moved, loaded.target, loaded.task))
    if loaded.tau_is_zero:
        raise TransportError(ZERO_TAU)
    inputs = TransportInputs(moved, loaded.target, loaded.task, shots, setup.seed, setup.device, left_out=left_out)
    base = None
    t_prep = time.perf_counter()
    if on:
        b_info = get_method(on)
        check_compatible(b_info, inputs)
        base = cache.get_or_make(_prepare_key(on, dict(b_info.options), loaded, shots, setup.seed, setup.device),
                                 lambda: prepare(b_info, inputs, dict(b_info.options),
                                                 lambda f, m: progress(0.1 + 0.2 * f, m)))
    prepared: Prepared = cache.get_or_make(
        _prepare_key(method, opts, loaded, shots, setup.seed, setup.device),
        lambda: prepare(info, inputs, opts, lambda f, m: progress(0.1 + 0.5 * f, m)))
    t_prep = time.perf_counter() - t_prep  # this run's share: near zero when the alignment was cached
    grid = parse_alpha_grid(setup.alpha_grid) if setup.alpha_grid.strip() else None
    cross = not same_shapes(loaded.source_pre.arch, loaded.target.arch) and loaded.task is not None
    hi = 0.9 if cross else 1.0  # across widths the zero-padded baseline's sweep follows

    def later(f: float, m: str) -> None:  # the pipeline's evaluation (its 0.7-1.0) onto 0.6-hi
        progress(0.6 + (hi - 0.6) * max(0.0, (f - 0.7) / 0.3), m)

    progress(0.6, "applying the alignment to tau")
    result = transfer(loaded.source_pre, loaded.source_ft, loaded.target, method, loaded.task,
                      options=opts, alpha=alpha, shots=shots, seed=setup.seed, alpha_grid=grid,
                      device=setup.device, oracle=loaded.oracle, progress=later, use_cache=True, on=on,
                      prepared=prepared, prepared_on=base, tower_only=setup.tower_only)
    baselines = _cross_width_baseline(loaded, result, grid, alpha, setup.device,
                                      lambda f, m: progress(hi + (1.0 - hi) * f, m)) if cross else {}
    progress(1.0, "done")
    total = time.perf_counter() - t0
    rt = result.timings
    timings = {"load": t_load, "prepare": t_prep, "apply": rt.get("apply", 0.0),
        "sweep": rt.get("sweep", 0.0) + baselines.pop("_sweep_s", 0.0),
        "evaluate": rt.get("evaluate", 0.0) + baselines.pop("_evaluate_s", 0.0), "total": total}
    return Run(uuid.uuid4().hex[:12], setup, method, {**opts, **({"on": on} if on else {})}, shots, loaded, prepared,
               result, total, baselines=baselines, base=base, timings=timings)


def _cross_width_baseline(loaded: Loaded, result: TransferResult, grid: Optional[list[float]],
                          alpha: Optional[float], device: str, progress: Progress = lambda f, m: None) -> dict:
    """Across widths theta_B + alpha * tau does not exist; the baseline is tau zero-padded / truncated to the
    target's shapes (Theseus' ``naive_resize``), alpha picked on validation like every other row.
    Returns ``{"naive_resize": sweep, "_sweep_s": s, "_evaluate_s": s}`` (the seconds for the timings)."""
    try:
        from transport.methods.theseus import naive_resize
    except ImportError:
        return {}
    t, task = loaded.target, loaded.task
    delta = naive_resize(loaded.tau, t.arch)
    t0 = time.perf_counter()
    grid = grid or default_alpha_grid()
    sweep = sweep_alpha(t, delta, task, grid, device, on_alpha=lambda i, n: progress(
        0.9 * i / n, f"alpha sweep (naive, zero-padded): {i}/{n} on validation")) if alpha is None else None
    t1 = time.perf_counter()
    a = sweep.best_alpha if sweep is not None else float(alpha)
    progress(0.95, "test accuracy: naive, zero-padded")
    pred = predictions(t, task, "test", delta.apply_to(t.params, a), device=device)
    y = task.split("test")[1]
    result.test_predictions["naive_resize"] = pred
    result.accuracies["naive_resize"] = int((pred == y).sum()) / len(y) if len(y) else float("nan")
    return {"naive_resize": sweep, "_sweep_s": t1 - t0, "_evaluate_s": time.perf_counter() - t1}


class RunHistory:
    """A session's recent runs by their full request, so returning to earlier settings (a K slider moved
    back) shows the earlier run again instead of re-evaluating. Bounded: runs hold transported taus."""

    def __init__(self, max_runs: int = 8):
        self.max_runs = max_runs
        self._runs: OrderedDict[str, Run] = OrderedDict()

    @staticmethod
    def key(setup: Setup, method: str, options: Optional[dict], shots: int, alpha: Optional[float]) -> str:
        return json.dumps([setup.signature(), method, sorted((k, str(v)) for k, v in (options or {}).items()),
                           int(shots), alpha])

    def lookup(self, setup: Setup, method: str, options: Optional[dict] = None, shots: int = 2,
               alpha: Optional[float] = None) -> Optional[Run]:
        """The session's earlier run of exactly this request, or None."""
        k = self.key(setup, method, {**get_method(method).options, **(options or {})}, shots, alpha)
        if k in self._runs:
            self._runs.move_to_end(k)
            return self._runs[k]
        return None

    def get_or_run(self, setup: Setup, method: str, options: Optional[dict] = None, shots: int = 2,
                   alpha: Optional[float] = None, progress: Progress = lambda f, m: None,
                   cache: MemoryCache = DEFAULT_CACHE) -> Run:
        k = self.key(setup, method, {**get_method(method).options, **(options or {})}, shots, alpha)
        if k in self._runs:
            self._runs.move_to_end(k)
            progress(1.0, "shown again from this session's earlier run")
            return self._runs[k]
        run = run_transfer(setup, method, options, shots, progress, cache, alpha)
        self._runs[k] = run
        while len(self._runs) > self.max_runs:
            self._runs.popitem(last=False)
        return run


# ----------------------------------------------------------------------------------------------
# cheap interactions
# ----------------------------------------------------------------------------------------------
def _memo(run: Run, key: tuple, compute: Callable[[], float]) -> float:
    if key not in run.memo:
        run.memo[key] = compute()
    return run.memo[key]


def accuracy_at_alpha(run: Run, alpha: float, split: str = "val", **override: Any) -> tuple[TaskVector, float]:
    """Re-apply at ``alpha`` (never re-prepare) and the accuracy on ``split``.

    Validation accuracies at the grid's alphas are read from the run's own sweep; any other value is
    evaluated once and remembered on the run (a slider moved back costs only the re-apply).
    """
    delta = run.apply(alpha, **override)
    sweep = run.result.sweep
    if split == "val" and not override and sweep is not None and float(alpha) in sweep.alphas:
        return delta, sweep.val[sweep.alphas.index(float(alpha))]
    key = ("alpha", round(float(alpha), 9), split, tuple(sorted((k, str(v)) for k, v in override.items())))
    return delta, _memo(run, key, lambda: run.accuracy(delta, split))


def layer_groups(run: Run) -> list[int]:
    """Layer indices of the target, then -1 for the global tensors (embeddings, final norm, projection)."""
    return list(range(run.arch.layers)) + [-1]


def restricted(delta: TaskVector, layers: set[int], with_global: bool) -> TaskVector:
    return delta.restrict(layers, keep_global=with_global)


def range_accuracy(run: Run, first: int, last: int, alpha: float, with_global: bool = True,
                   split: str = "val") -> float:
    """Accuracy when only layers first..last (and optionally the global tensors) are transported."""
    def compute() -> float:
        delta = run.apply(alpha)
        return run.accuracy(restricted(delta, set(range(first, last + 1)), with_global), split)

    return _memo(run, ("range", first, last, bool(with_global), round(float(alpha), 9), split), compute)


def layer_ablation(run: Run, alpha: float, split: str = "val") -> dict:
    """Per layer group: accuracy with ONLY that group transported and with ALL BUT that group; plus the
    full transfer and none (zero-shot). Cached on the run per (alpha, split)."""
    key = f"{alpha:.6g}:{split}"
    if key in run.ablation:
        return run.ablation[key]
    delta = run.apply(alpha)
    all_layers = set(range(run.arch.layers))
    only, without = [], []
    groups = layer_groups(run)
    for g in groups:
        if g < 0:
            only.append(run.accuracy(restricted(delta, set(), True), split))
            without.append(run.accuracy(restricted(delta, all_layers, False), split))
        else:
            only.append(run.accuracy(restricted(delta, {g}, False), split))
            without.append(run.accuracy(restricted(delta, all_layers - {g}, True), split))
    out = {"layers": groups, "only": only, "without": without, "full": run.accuracy(delta, split),
           "zero_shot": run.accuracy(None, split), "split": split, "alpha": alpha}
    run.ablation[key] = out
    return out


def diagnostics(run: Run, **override: Any) -> dict:
    """The alignment's diagnostics for this run's tau (GradFix's depend on tau and the apply options)."""
    a = run.prepared.alignment
    if run.method == "gradfix" and hasattr(a, "agreement"):
        opts = {**run.prepared.options, **override}
        if opts.get("variant") == "oracle":
            opts["oracle_tau"] = oracle_tau(run)
        return a.agreement(run.loaded.tau, opts)
    if run.result.diagnostics:
        return run.result.diagnostics
    return a.diagnostics()


def oracle_agreement(run: Run) -> Optional[dict]:
    """The vote against the oracle sign: GradFix's diagnostics with the target's own task vector tau_B in the
    place of tau (its ``agreement`` = share of the voted entries where the vote equals sign(tau_B), per layer x
    block and in total); None when the run has no oracle or is not GradFix. Computed once per run."""
    a = run.prepared.alignment
    if run.method != "gradfix" or run.loaded.oracle is None or not hasattr(a, "agreement"):
        return None
    if "oracle_agreement" not in run.memo:
        vote = {**run.prepared.options}.get("vote")
        run.memo["oracle_agreement"] = a.agreement(oracle_tau(run), {"variant": "normal", "vote": vote})
    return run.memo["oracle_agreement"]


def builtin_task_names() -> list[str]:
    return builtin_tasks()
