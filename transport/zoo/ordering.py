"""The GradFix paper's ordering on one transfer: naive < few-shot fine-tuning < GradFix < oracle mask.

One protocol for every row (the same labels for all): GradFix votes on the K samples per class that
few-shot fine-tuning trains on (``Task.shots(K, seed)``); every transported update's alpha and
few-shot fine-tuning's learning rate and step count are chosen on the task's validation split
(:func:`transport.zoo.train.fewshot_finetune`); accuracies are on the test split.
"""
from __future__ import annotations

from typing import Optional

from transport.core.evaluate import accuracy, sweep_alpha
from transport.core.model import Model
from transport.core.task_vector import TaskVector
from transport.data import Task
from transport.zoo.train import fewshot_finetune

ORDERING = ("naive", "few-shot FT", "GradFix", "oracle mask")  # the paper's ordering, weakest first
LABELS = {"naive": "naive", "few-shot FT": "few-shot fine-tuning of the target", "GradFix": "GradFix",
          "oracle mask": "the oracle mask"}


def failures(acc: dict) -> list[tuple[str, str]]:
    """The neighbouring pairs (weaker, stronger) of the ordering that do not hold."""
    return [(a, b) for a, b in zip(ORDERING, ORDERING[1:]) if not acc[a] < acc[b]]


def ordered(acc: dict) -> bool:
    """naive < few-shot FT < GradFix < oracle mask, strictly, on these accuracies."""
    return not failures(acc)


def tuned_accuracy(target: Model, delta: TaskVector, task: Task, grid: list[float], device: str = "cpu") -> float:
    """Test accuracy of theta_B + alpha * delta with alpha chosen on the validation split."""
    sw = sweep_alpha(target, delta, task, grid, device)
    return accuracy(target, task, "test", delta.apply_to(target.params, sw.best_alpha), device=device)


def measure(target: Model, task: Task, shots: int, seed: int, grid: list[float], deltas: dict[str, TaskVector],
            known: Optional[dict[str, float]] = None, device: str = "cpu") -> dict:
    """Every row of the ordering on one transfer: the rows in ``known`` as given, the others from ``deltas``
    (alpha on validation), few-shot fine-tuning of ``target`` on the same shots. Returns the accuracies
    (keys of :data:`ORDERING`), ``K`` and few-shot fine-tuning's choice (``ft_choice``)."""
    out: dict = {k: v for k, v in (known or {}).items() if k in ORDERING}
    for name in ("naive", "GradFix", "oracle mask"):
        if name not in out:
            out[name] = tuned_accuracy(target, deltas[name], task, grid, device)
    out["few-shot FT"], out["ft_choice"] = fewshot_finetune(target, task, shots, seed, device)
    out["K"] = shots
    return out


def note(acc: dict, vote_vs_oracle: float) -> Optional[str]:
    """One sentence saying that the ordering fails on these accuracies and why (the K-shot vote's agreement
    with the oracle sign, a share in [0, 1]); None when the ordering holds."""
    bad = failures(acc)
    if not bad:
        return None
    said = "; ".join(f"{LABELS[b]} {100 * acc[b]:.1f}% is not above {LABELS[a]} {100 * acc[a]:.1f}%"
                     for a, b in bad)
    why = (", so the mask keeps little of what helps the target" if any(b == "GradFix" for _, b in bad) else "")
    return (f"On this pair the paper's ordering naive < few-shot fine-tuning < GradFix < oracle mask does not hold "
            f"at K = {acc['K']} ({said}): the K = {acc['K']} vote agrees with the oracle sign sign(tau_B) on only "
            f"{100 * vote_vs_oracle:.0f}% of the voted entries (50% = chance){why}.")


__all__ = ["ORDERING", "LABELS", "ordered", "failures", "tuned_accuracy", "measure", "note"]
