"""A run whose fine-tuning is a PEFT LoRA adapter: the source fine-tuned model it makes, the transfer with the
alignments kept, the adapter's factors moved by the same alignments, and the target adapter's files.

The dense transfer (what ``task_vector.safetensors`` holds, what the accuracies are measured on) and the
factor transport use the SAME prepared alignments; :func:`transfer_adapter` checks that both agree on every
tensor before anything is written.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from transport.core.lowrank import LowRankTaskVector
from transport.core.model import Model
from transport.errors import TransportError
from transport.lora import CONFIG_FILE, WEIGHTS_FILE, Adapter, is_adapter_dir, read_adapter, transport_lowrank
from transport.lora_write import Rank, adapter_files, parse_rank
from transport.methods import Progress, TransportInputs, no_progress, resolve_device
from transport.pipeline import TransferResult, prepare, transfer

#: files a run with an adapter input writes besides report.json (task_vector.safetensors only when asked)
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
#: largest relative difference allowed between the factor transport and the dense one (float32 rounding of
#: the other association of the products, (T^T B)(A T) vs T^T (B A) T)
AGREEMENT = 1e-4


def adapter_source(ref: str, source_pre: Model, trust_pickle: bool = False) -> tuple[Adapter, Model]:
    """The adapter at ``ref`` (a directory) read for ``source_pre``, and the fine-tuned source it makes."""
    adapter = read_adapter(ref, source_pre, trust_pickle)
    tau = adapter.tau.to_task_vector()
    return adapter, source_pre.with_params(tau.apply_to(source_pre.params, 1.0), ref=str(ref))


def _agreement(moved: LowRankTaskVector, result: TransferResult) -> float:
    """max over tensors of ||low-rank path - dense path||_F / ||dense path||_F (0 where both are zero); tensors
    the adapter has no update for must be zero on the dense path too."""
    dense, worst = result.transported.tensors, 0.0
    mine = moved.tensors()
    for k, t in dense.items():
        ref = t.double()
        got = mine[k].double() if k in mine else torch.zeros_like(ref)
        norm = float(ref.norm())
        diff = float((got - ref).norm())
        worst = max(worst, diff / norm if norm > 0 else (0.0 if diff == 0 else float("inf")))
    return worst


@dataclass
class AdapterRun:
    """A transfer of an adapter: the dense result and the adapter's low-rank transport."""

    adapter: Adapter
    result: TransferResult
    moved: LowRankTaskVector


def transfer_adapter(adapter: Adapter, source_pre: Model, source_ft: Model, target: Model, method: str,
                     on: Optional[str] = None, options: Optional[dict] = None, task: Any = None, shots: int = 2,
                     seed: int = 0, device: Optional[str] = "cpu", progress: Progress = no_progress,
                     use_cache: bool = True, cache_dir: Optional[Path] = None, **kwargs: Any) -> AdapterRun:
    """:func:`transport.pipeline.transfer` of ``source_ft`` (made from ``adapter``) with the alignments kept,
    and the adapter moved through them (factors wherever a method is a per-axis map)."""
    device = resolve_device(device)
    inputs = TransportInputs(source_pre, target, task, shots, seed, device)
    if on is not None and on == method:
        raise TransportError(f"cannot compose {on} with itself")
    base = prepare(on, inputs, None, lambda f, m: progress(0.35 * f, m), use_cache, cache_dir) if on else None
    lo = 0.0 if base is None else 0.35
    prep = prepare(method, inputs, options, lambda f, m: progress(lo + (0.7 - lo) * f, m), use_cache, cache_dir)
    result = transfer(source_pre, source_ft, target, method, task=task, options=options, shots=shots, seed=seed,
                      device=device, progress=progress, use_cache=use_cache, cache_dir=cache_dir, on=on,
                      prepared=prep, prepared_on=base, **kwargs)
    steps = ([(base.method, base.alignment, base.options)] if base else []) + [(prep.method, prep.alignment,
                                                                                 prep.options)]
    moved = transport_lowrank(adapter.tau, steps, target.arch)
    gap = _agreement(moved, result)
    if not gap <= AGREEMENT:
        raise TransportError(f"{adapter.directory}: the adapter's factor transport differs from the dense "
                             f"transport by {gap:.3g} (relative); nothing written")
    return AdapterRun(adapter, result, moved)


def adapter_outputs(run: AdapterRun, target: Model, rank: Rank = "same", alpha: float = 1.0,
                    extra_meta: Optional[dict[str, str]] = None) -> tuple[dict[str, bytes], dict]:
    """The target adapter's files (at alpha = 1, like every task-vector file) and report.json's ``lora``
    section: per module exact or re-factorised (relative error and SVD tail), the ranks kept."""
    from transport.sources import scaling_metadata

    meta = {**scaling_metadata(alpha), **(extra_meta or {})}
    files, section = adapter_files(run.adapter, run.moved, target, rank, meta)
    section["factor_vs_dense"] = _agreement(run.moved, run.result)
    section["source_ranks"] = run.adapter.ranks
    return files, section


def check_adapter_flags(ref: Optional[str], rank: Optional[str], dense: bool) -> Optional[Rank]:
    """``--adapter-rank`` / ``--dense-task-vector`` only with an adapter input (one line otherwise)."""
    if ref is None or not is_adapter_dir(ref):
        for flag, given in (("--adapter-rank", rank is not None), ("--dense-task-vector", dense)):
            if given:
                raise TransportError(f"{flag} is only for a LoRA adapter given as --source-ft or --task-vector "
                                     f"(a directory with {CONFIG_FILE})")
        return None
    return parse_rank(rank)


# ----------------------------------------------------------------------------------------------
# the command line's hooks (``python -m transport run``): the adapter state rides on its namespace
# ----------------------------------------------------------------------------------------------
def cli_check(args: Any) -> None:
    """Before anything is loaded: the adapter flags fit the input (``args.lora_rank``: None unless an adapter)."""
    args.lora_rank = check_adapter_flags(args.source_ft or args.task_vector, args.adapter_rank,
                                         args.dense_task_vector)


def cli_source(args: Any, source_pre: Model) -> Optional[Model]:
    """The fine-tuned source an adapter input makes (None when the input is not an adapter)."""
    if getattr(args, "lora_rank", None) is None:
        return None
    args.lora_adapter, ft = adapter_source(args.source_ft or args.task_vector, source_pre, args.trust_pickle)
    return ft


def cli_transfer(args: Any, transfer_fn: Any) -> Any:
    """``transfer_fn`` itself, or for an adapter input the same call through :func:`transfer_adapter`."""
    if getattr(args, "lora_adapter", None) is None:
        return transfer_fn

    def run(source_pre: Model, source_ft: Model, target: Model, method: str, **kwargs: Any) -> TransferResult:
        args.lora_run = transfer_adapter(args.lora_adapter, source_pre, source_ft, target, method, **kwargs)
        return args.lora_run.result
    return run


def cli_outputs(args: Any, target: Model, alpha: float, report: dict, meta: dict) -> tuple[dict[str, bytes], bool]:
    """The adapter's files (report['lora'] filled in) and whether task_vector.safetensors is written too."""
    if getattr(args, "lora_run", None) is None:
        return {}, True
    files, report["lora"] = adapter_outputs(args.lora_run, target, args.lora_rank, alpha,
                                            {k: meta[k] for k in ("source_pre", "source_ft", "target", "method")})
    return files, bool(args.dense_task_vector)


def summary_lines(section: Optional[dict], alpha: float) -> list[str]:
    """What the command line prints about the written adapter (nothing without one)."""
    if section is None:
        return []
    exact, refac = section["exact_low_rank"], section["refactorised"]
    lines = [f"  the adapter holds the transported tau at alpha = 1 (PeftModel.from_pretrained(target, DIR) gives "
             f"theta_target + tau); for alpha = {alpha:g} multiply lora_alpha and alpha_pattern by {alpha:g}",
             f"  adapter: {len(exact)} module(s) exact low rank, {len(refac)} re-factorised; ranks "
             f"{', '.join(str(r) for r in section['ranks']) or '-'} (source {', '.join(map(str, section['source_ranks']))})"]
    if refac:
        worst = max(refac, key=lambda k: refac[k])
        lines.append(f"  truncation: largest relative error {refac[worst]:.3g} ({worst}); --adapter-rank full is exact")
    return lines


__all__ = ["AdapterRun", "adapter_source", "transfer_adapter", "adapter_outputs", "check_adapter_flags",
           "summary_lines", "cli_check", "cli_source", "cli_transfer", "cli_outputs", "ADAPTER_FILES",
           "is_adapter_dir"]
