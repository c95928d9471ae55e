"""The end-to-end transfer both the CLI and the app run: prepare (cached) -> apply -> pick alpha -> evaluate."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from transport import __version__, cache
from transport.core.evaluate import (AlphaSweep, check_alphas, default_alpha_grid, is_text, predictions,
                                     split_warnings, sweep_alpha, text_scores)
from transport.core.layout import same_shapes
from transport.core.model import Model
from transport.core.task_vector import TaskVector
from transport.core.vocab import to_target_vocabulary
from transport.data import Task
from transport.errors import TransportError, warn
from transport.methods import (MethodInfo, Progress, TransportInputs, check_compatible, get_method, no_progress,
                               resolve_device)
from transport.methods.theseus_inputs import shares_token_ids, tokenizer_identity
from transport.tower_only import left_out_line, tower_view


@dataclass
class Prepared:
    """A method's alignment for one (source, target, data) plus where it came from."""

    method: MethodInfo
    alignment: Any
    options: dict
    key: str
    cache_hit: bool
    seconds: float


def data_hash(task: Optional[Task], method: MethodInfo, shots: int, seed: int) -> Optional[str]:
    if task is None or method.data == "none":
        return None
    x, y = task.split("train")
    if is_text(task):  # token ids, their mask, labels and the label words' tokens
        tensors = {"ids": x.ids, "mask": x.mask, **({"y": y} if y is not None else {}),
                   **({"label_ids": task.label_ids} if task.label_ids is not None else {})}
        return cache.hash_tensors(tensors) + f":{task.name}:{shots}:{seed}"
    return cache.hash_tensors({"x": x, "y": y}) + f":{task.name}:{shots}:{seed}"


def check_token_ids(task: Any, target: Model, others: list[Optional[Model]], vocab_map: Any = None) -> None:
    """One line unless every model reads a text task's token ids as the target does: the texts were tokenised
    by the target's tokenizer, so each other model needs the same tokenizer (:func:`shares_token_ids`), or a
    vocabulary map ``vocab_map`` that moves it into the target's vocabulary (then it is not refused here)."""
    if task is None or not is_text(task):
        return
    tid, mine = getattr(task, "tokenizer_id", ""), tokenizer_identity(target.tokenizer)
    if tid and mine and tid != mine:
        raise TransportError(f"task {task.name} was tokenised by {tid}, not by the target's tokenizer ({mine})")
    for m in others:
        if m is None or m is target or vocab_map is not None or shares_token_ids(m, target):
            continue
        a, b = m.arch, target.arch
        why = (f"vocabularies of {a.vocab_size} and {b.vocab_size} tokens" if a.vocab_size != b.vocab_size else
               f"tokenizers {tokenizer_identity(m.tokenizer)} and {mine}")
        raise TransportError(f"{m.ref} and the target {target.ref} do not share token ids ({why}): the texts are "
                             "tokenised by the target's tokenizer, so every model must read the same ids (one "
                             "tokenizer, or a vocabulary map between the two)")


def prepare(method: str | MethodInfo, inputs: TransportInputs, options: Optional[dict] = None,
            progress: Progress = no_progress, use_cache: bool = True, cache_dir: Optional[Path] = None) -> Prepared:
    """Run (or fetch from the content-hashed cache) a method's expensive ``prepare``.

    Options a method reads only in ``apply`` are not part of the cache key: changing them re-applies.
    """
    info = get_method(method) if isinstance(method, str) else method
    check_compatible(info, inputs)
    opts = info.resolve(options)
    keyed = {k: v for k, v in opts.items() if k not in info.apply_only}
    key = cache.alignment_key(info.name, keyed, cache.hash_tensors(inputs.source.params),
                              cache.hash_tensors(inputs.target.params),
                              data_hash(inputs.task, info, inputs.shots, inputs.seed),
                              {"shots": inputs.shots if info.data == "labelled" else None, "seed": inputs.seed})
    t0 = time.perf_counter()
    if use_cache:
        hit = cache.load_cached(key, info.load_alignment, cache_dir)
        if hit is not None:
            progress(1.0, f"{info.name}: alignment loaded from cache")
            return Prepared(info, hit, opts, key, True, time.perf_counter() - t0)
    torch.manual_seed(inputs.seed)
    alignment = info.prepare(inputs, opts, progress)
    seconds = time.perf_counter() - t0
    if use_cache:
        cache.store(key, alignment, cache_dir)
    return Prepared(info, alignment, opts, key, False, seconds)


def on_target(moved: TaskVector, prep: Prepared, target: Model) -> TaskVector:
    """A method's output labelled with the target's architecture (same shapes required)."""
    if moved.arch == target.arch:
        return moved
    if not same_shapes(moved.arch, target.arch):
        raise TransportError(f"{prep.method.name} returned a task vector for {moved.arch.name}, "
                             f"not for the target {target.arch.name}")
    return TaskVector(target.arch, moved.tensors, moved.meta)  # same shapes: the target's names


def load_text_task(path: str | Path, target: Model, others: list[Optional[Model]], template: Optional[str] = None,
                   seed: int = 0) -> Any:
    """A JSONL / CSV text file (:func:`transport.text.load_text_file`) tokenised with the target's tokenizer;
    every model of ``others`` must read the same token ids (:func:`check_token_ids`)."""
    from transport.text import DEFAULT_TEMPLATE, load_text_file

    if target.arch.stem != "tokens" or target.arch.readout != "lm":
        raise TransportError(f"{path}: texts are scored by a language model's next-token logits; {target.ref} "
                             f"({target.arch.name}) is not one")
    if target.tokenizer is None:
        raise TransportError(f"{path}: {target.ref} has no tokenizer to read the texts with (a model directory "
                             "needs its tokenizer files, e.g. tokenizer.json)")
    task = load_text_file(path, target.tokenizer, target.arch.vocab_size, target.arch.context,
                          DEFAULT_TEMPLATE if template is None else template, seed,
                          tokenizer_identity(target.tokenizer) or "")
    check_token_ids(task, target, others)
    return task


@dataclass
class TransferResult:
    """Everything a report, a table or a figure needs about one transfer."""

    method: str
    options: dict
    transported: TaskVector  # the transported tau at alpha = 1, target canonical names
    alpha: float
    sweep: Optional[AlphaSweep]
    accuracies: dict[str, float] = field(default_factory=dict)
    naive_sweep: Optional[AlphaSweep] = None
    timings: dict[str, float] = field(default_factory=dict)
    diagnostics: dict = field(default_factory=dict)
    cache_hit: bool = False
    inputs: dict[str, str] = field(default_factory=dict)
    test_predictions: dict[str, torch.Tensor] = field(default_factory=dict)  # accuracy row -> predicted class [N]
    shots_per_class: Optional[dict[str, int]] = None  # labelled samples really drawn per class (K or fewer)
    warnings: list[str] = field(default_factory=list)  # splits too small to trust, tied alpha candidates
    perplexities: Optional[dict[str, float]] = None  # texts: row -> test perplexity (None for images)

    def report(self) -> dict:
        out = {
            "transport_version": __version__, "method": self.method, "options": self.options,
            "inputs": self.inputs, "alpha": self.alpha,
            "alpha_sweep": None if self.sweep is None else self.sweep.to_dict(),
            "naive_alpha_sweep": None if self.naive_sweep is None else self.naive_sweep.to_dict(),
            "accuracies": self.accuracies, "timings_s": self.timings, "cache_hit": self.cache_hit,
            "diagnostics": self.diagnostics, "shots_per_class": self.shots_per_class, "warnings": self.warnings,
        }
        if self.perplexities is not None:
            out["perplexities"] = self.perplexities
        return out


def _evaluate(result: TransferResult, timings: dict[str, float], source_pre: Model, source_ft: Model, target: Model,
              oracle: Optional[Model], tau: TaskVector, task: Task, alpha: Optional[float], grid: list[float],
              device: str, progress: Progress) -> None:
    """The alpha sweep(s) on validation (timings['sweep']), then every test accuracy (timings['evaluate']).

    Progress: 0.75-0.95 over the sweeps, one step per alpha; 0.95-1.0 over the test accuracies.
    """
    name = result.method
    naive_too = name != "naive" and same_shapes(tau.arch, target.arch)
    sweeps = (1 + int(naive_too)) if alpha is None else 0
    t2 = time.perf_counter()

    def on_alpha(k: int, label: str):
        def report(i: int, n: int) -> None:
            progress(0.75 + 0.2 * (k + i / n) / max(1, sweeps), f"alpha sweep ({label}): {i}/{n} on validation")
        return report

    if alpha is None:
        progress(0.75, f"alpha sweep ({name}): 0/{len(grid)} on validation")
        result.sweep = sweep_alpha(target, result.transported, task, grid, device, on_alpha=on_alpha(0, name))
        result.alpha = result.sweep.best_alpha
        if naive_too:
            result.naive_sweep = sweep_alpha(target, tau, task, grid, device, on_alpha=on_alpha(1, "naive"))
    t3 = time.perf_counter()
    timings["sweep"] = t3 - t2
    a_naive = result.naive_sweep.best_alpha if result.naive_sweep is not None else result.alpha
    rows = [("zero_shot_target", target, None), (name, target, result.transported.apply_to(target.params, result.alpha))]
    if naive_too:
        rows.append(("naive", target, tau.apply_to(target.params, a_naive)))
    if not is_text(task) or shares_token_ids(source_pre, target):  # the source reads the target's token ids
        rows += [("source_finetuned", source_ft, None), ("source_zero_shot", source_pre, None)]
    if oracle is not None:
        rows.append(("oracle", oracle, None))
    y = task.split("test")[1]
    if is_text(task):
        _score_texts(result, rows, task, device, progress)
    else:
        for i, (key, model, params) in enumerate(rows):
            progress(0.95 + 0.05 * i / len(rows), f"test accuracy: {key} ({i + 1}/{len(rows)})")
            # the predictions behind the accuracy are kept: which examples flip, paired noise of a gain
            pred = predictions(model, task, "test", params, device=device)
            result.test_predictions[key] = pred
            result.accuracies[key] = int((pred == y).sum()) / len(y) if len(y) else float("nan")
    timings["evaluate"] = time.perf_counter() - t3
    for w in split_warnings(task, result.sweep):
        result.warnings.append(w)
        warn(w)


def _score_texts(result: TransferResult, rows: list, task: Any, device: str, progress: Progress) -> None:
    """Test perplexity of every row, and its label-word accuracy when the texts have labels."""
    y = task.split("test")[1]
    result.perplexities = {}
    for i, (key, model, params) in enumerate(rows):
        progress(0.95 + 0.05 * i / len(rows), f"test scores: {key} ({i + 1}/{len(rows)})")
        sc = text_scores(model, task, "test", params, device)
        result.perplexities[key] = sc.perplexity
        if sc.predictions is not None:
            result.test_predictions[key] = sc.predictions
            result.accuracies[key] = int((sc.predictions == y).sum()) / len(y) if len(y) else float("nan")


def _held(p: Optional[Prepared], method: str, what: str) -> Optional[Prepared]:
    if p is not None and p.method.name != method:
        raise TransportError(f"transfer: {what} is an alignment of {p.method.name}, not of {method}")
    return p


def transfer(source_pre: Model, source_ft: Model, target: Model, method: str, task: Optional[Task] = None,
             options: Optional[dict] = None, alpha: Optional[float] = None, alpha_grid: Optional[list[float]] = None,
             shots: int = 2, seed: int = 0, device: str | None = "cpu", oracle: Optional[Model] = None,
             progress: Progress = no_progress, use_cache: bool = True, cache_dir: Optional[Path] = None,
             evaluate: bool = True, on: Optional[str] = None, prepared: Optional[Prepared] = None,
             prepared_on: Optional[Prepared] = None, tower_only: bool = False) -> TransferResult:
    """Transport tau = source_ft - source_pre onto ``target`` with ``method``; evaluate when a task is given.

    alpha: fixed if given, else chosen on the task's validation split over ``alpha_grid``.
    on: compose: ``method`` is applied to the task vector that method ``on`` transported (e.g. GradFix's
    mask on TransFusion's pi(tau)); both alignments are prepared (and cached) on the same inputs.
    prepared / prepared_on: alignments the caller already holds for these inputs (from :func:`prepare`),
    used instead of preparing (or loading from the cache) again.
    tower_only: towers that differ only in their output projection move the tower alone
    (:mod:`transport.tower_only`): the projection's update is zero (or dropped); the report names what was left out.
    """
    device = resolve_device(device)
    if not same_shapes(source_pre.arch, source_ft.arch):
        raise TransportError(f"{source_ft.ref} does not have the architecture of {source_pre.ref}")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    # a new release's vocabulary: both source models' embedding rows moved to the target's tokens (one error
    # line when they cannot be matched); the map's counts go into the report's diagnostics
    source_pre, source_ft, vocabulary = to_target_vocabulary(source_pre, source_ft, target)
    check_token_ids(task, target, [source_pre, source_ft, oracle], vocab_map=vocabulary)
    left_out: dict[str, str] = {}
    moved_pre, moved_ft = source_pre, source_ft
    if tower_only:
        view = tower_view(source_pre, source_ft, target)
        moved_pre, moved_ft, left_out = view.source_pre, view.source_ft, view.left_out
        if left_out:
            warn(left_out_line(left_out))
    tau = TaskVector.from_models(moved_pre.params, moved_ft.params, moved_pre.arch)
    # images without classes: no accuracies; texts: perplexity always, accuracy with labels
    scored = task is not None and evaluate and (task.labelled or is_text(task))
    check_alphas([alpha] if alpha is not None else (alpha_grid or default_alpha_grid()) if scored else [1.0],
                 tau, target.params)
    inputs = TransportInputs(moved_pre, target, task, shots, seed, device, left_out=tuple(left_out))
    base = None
    name = method if isinstance(method, str) else method.name
    if on is not None:
        if on == name:
            raise TransportError(f"cannot compose {on} with itself")
        base = _held(prepared_on, on, "prepared_on") or prepare(on, inputs, None, lambda f, m: progress(0.35 * f, m),
                                                                 use_cache, cache_dir)
        timings["prepare_" + base.method.name] = base.seconds
    lo = 0.0 if base is None else 0.35
    prep = _held(prepared, name, "prepared") or prepare(
        method, inputs, options, lambda f, m: progress(lo + (0.7 - lo) * f, m), use_cache, cache_dir)
    timings["prepare"] = prep.seconds
    t1 = time.perf_counter()
    moved = tau if base is None else on_target(base.method.apply(base.alignment, tau, 1.0, base.options), base, target)
    transported = on_target(prep.method.apply(prep.alignment, moved, 1.0, prep.options), prep, target)
    timings["apply"] = time.perf_counter() - t1
    result = TransferResult(method=prep.method.name, options={**prep.options, **({"on": on} if on else {})},
                            transported=transported,
                            alpha=1.0 if alpha is None else float(alpha), sweep=None, cache_hit=prep.cache_hit,
                            diagnostics=prep.alignment.diagnostics(),
                            inputs={"source_pre": source_pre.ref, "source_ft": source_ft.ref, "target": target.ref,
                                    "task": task.name if task else "", "shots": str(shots), "seed": str(seed)})
    if vocabulary is not None:
        result.diagnostics["vocabulary"] = vocabulary
    if left_out:
        result.diagnostics["tower_only"] = {"left_out": left_out}
        result.warnings.append(left_out_line(left_out))
    if task is not None and task.labelled and "labelled" in (prep.method.data, base.method.data if base else ""):
        result.shots_per_class = task.shot_counts(shots)
    if scored:
        _evaluate(result, timings, source_pre, source_ft, target, oracle, tau, task, alpha,
                  alpha_grid or default_alpha_grid(), device, progress)
    timings["total"] = time.perf_counter() - t0
    result.timings = timings
    progress(1.0, "done")
    return result
