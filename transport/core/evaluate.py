"""Accuracy (and, on texts, next-token loss / perplexity) on a task split, and the alpha sweep (alpha is
chosen on the validation split only: by accuracy on a labelled task, by next-token loss on a plain corpus).

Texts (a :class:`~transport.text.TextTask`, a language model): a classification task is scored on the
next-token logits at each prompt's last real token restricted to the label words' first tokens (argmax
over ``task.label_ids``); the loss is the mean cross-entropy of every real next-token prediction of the
split's texts (for a classification task: the prompts, not the answers), token-weighted, and the
perplexity its exponential.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import torch

from transport.core.forward import encode
from transport.core.heads import Classifier
from transport.core.losses import next_token_nll
from transport.core.model import Model
from transport.core.stems import preprocess
from transport.core.task_vector import TaskVector
from transport.data import Task
from transport.errors import TransportError

Tensor = torch.Tensor


def is_text(task: object) -> bool:
    return getattr(task, "kind", "image") == "text"


@dataclass
class TextScores:
    """One pass over a text split: label-word predictions [N] (None without labels), the summed next-token
    cross-entropy (float64) and the number of real next-token predictions."""

    predictions: Optional[Tensor]
    nll: float
    tokens: int

    @property
    def loss(self) -> float:
        """Mean next-token cross-entropy per real token (nan without any)."""
        return self.nll / self.tokens if self.tokens else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.tokens else float("nan")


#: logits held at once while scoring texts (rows x tokens x vocabulary), 128 MiB in float32
LOGIT_BUDGET = 2**25


@torch.no_grad()
def text_scores(model: Model, task, split: str = "test", params: dict[str, Tensor] | None = None,
                device: str = "cpu") -> TextScores:
    """Label-word predictions and next-token loss of ``params`` (default: the model's own) on a text split."""
    arch = model.arch
    if arch.stem != "tokens" or arch.readout != "lm":
        raise TransportError(f"{model.ref} has no next-token logits (readout '{arch.readout}'): texts are scored "
                             "by a language model")
    x, y = task.split(split)
    p = {k: v.to(device) for k, v in (params if params is not None else model.params).items()}
    ids = task.label_ids.to(device) if task.labelled else None
    step = max(1, LOGIT_BUDGET // max(1, int(x.ids.shape[1]) * arch.vocab_size))
    preds, nll, count = [], 0.0, 0
    for i in range(0, len(x), step):
        xb = x[i:i + step].trimmed().to(device)
        logits = encode(p, arch, xb)  # [b, T, V]
        total, n = next_token_nll(logits, xb)
        nll += float(total.double().sum())
        count += int(n.sum())
        if ids is not None:
            last = logits[torch.arange(len(xb), device=logits.device), xb.last]
            preds.append(last[:, ids].argmax(-1).cpu())
    pred = (torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)) if ids is not None else None
    return TextScores(pred, nll, count)


@torch.no_grad()
def accuracy(model: Model, task: Task, split: str = "test", params: dict[str, Tensor] | None = None,
             head: Classifier | None = None, batch_size: int = 512, device: str = "cpu") -> float:
    """Top-1 accuracy (in [0, 1]) of ``params`` (default: the model's own) with the model's head (texts:
    label-word scoring)."""
    if is_text(task):
        y = task.split(split)[1]
        if y is None or not task.labelled:
            raise TransportError(f"task {task.name}: texts without labels have no accuracy")
        if len(y) == 0:
            return float("nan")
        return int((text_scores(model, task, split, params, device).predictions == y).sum()) / len(y)
    x, y = task.split(split)
    if len(y) == 0:
        return float("nan")
    p = {k: v.to(device) for k, v in (params if params is not None else model.params).items()}
    h = (head or model.classifier(task.classnames)).to(device)
    correct = 0
    for i in range(0, len(y), batch_size):
        xb = preprocess(model.arch, x[i:i + batch_size].to(device))
        correct += int((h(encode(p, model.arch, xb)).argmax(-1).cpu() == y[i:i + batch_size]).sum())
    return correct / len(y)


@torch.no_grad()
def predictions(model: Model, task: Task, split: str = "test", params: dict[str, Tensor] | None = None,
                head: Classifier | None = None, batch_size: int = 512, device: str = "cpu") -> Tensor:
    """Predicted class index of every image of ``split`` [N] (the argmax :func:`accuracy` compares with y)."""
    if is_text(task):
        pred = text_scores(model, task, split, params, device).predictions
        if pred is None:
            raise TransportError(f"task {task.name}: texts without labels have no predictions")
        return pred
    x, y = task.split(split)
    p = {k: v.to(device) for k, v in (params if params is not None else model.params).items()}
    h = (head or model.classifier(task.classnames)).to(device)
    out = [h(encode(p, model.arch, preprocess(model.arch, x[i:i + batch_size].to(device)))).argmax(-1).cpu()
           for i in range(0, len(y), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def default_alpha_grid() -> list[float]:
    return [round(0.1 * i, 2) for i in range(0, 21)]


def parse_alpha_grid(text: str) -> list[float]:
    """``LO:HI:N`` -> N evenly spaced values from LO to HI."""
    try:
        lo, hi, n = text.split(":")
        lo_f, hi_f, n_i = float(lo), float(hi), int(n)
    except ValueError:
        raise TransportError(f"--alpha-grid must be LO:HI:N, got '{text}'") from None
    if n_i < 1 or n_i > 1000:
        raise TransportError(f"--alpha-grid: N must be in 1..1000, got {n_i}")
    if not (math.isfinite(lo_f) and math.isfinite(hi_f)):
        raise TransportError(f"--alpha-grid: LO and HI must be finite numbers, got '{text}'")
    return [lo_f] if n_i == 1 else [lo_f + (hi_f - lo_f) * i / (n_i - 1) for i in range(n_i)]


FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def check_alphas(alphas: Sequence[float], tau: TaskVector, theta: Mapping[str, Tensor]) -> None:
    """Refuse an alpha for which theta + alpha * (transported tau) could leave float32's range.

    Every method's output is bounded entrywise by the largest Frobenius norm of a tensor of tau
    (permutations and masks keep or drop entries, Theseus' maps have orthonormal rows or columns), so
    ``|alpha| * max_k ||tau_k||_F + max |theta|`` below float32's largest value keeps the model finite.
    """
    bad = [a for a in alphas if not math.isfinite(float(a))]
    if bad:
        raise TransportError(f"alpha must be a finite number, got {bad[0]}")
    if not alphas:
        return
    norm = max((float(torch.linalg.vector_norm(v.double())) for v in tau.tensors.values()), default=0.0)
    top = max((float(v.abs().max()) for v in theta.values() if v.numel()), default=0.0)
    a = max(abs(float(x)) for x in alphas)
    if not a * norm + top < FLOAT32_MAX:
        raise TransportError(f"alpha {a:g} is too large: theta + alpha * tau could overflow float32 "
                             f"(|alpha| x {norm:.3g} (largest ||tau|| of a tensor) + {top:.3g} (largest |theta|) "
                             f"> {FLOAT32_MAX:.3g}); use a smaller alpha")


@dataclass
class AlphaSweep:
    """``val[i]``: the validation ``metric`` at ``alphas[i]`` ('accuracy', higher is better; 'loss', the
    next-token loss of a plain text corpus, lower is better)."""

    alphas: list[float]
    val: list[float]
    best_alpha: float
    best_val: float
    metric: str = "accuracy"
    tied: list[float] = field(default_factory=list)  # every alpha that reached best_val (best_alpha: smallest |alpha|)

    def to_dict(self) -> dict:
        return {"alphas": self.alphas, "val": self.val, "best_alpha": self.best_alpha, "best_val": self.best_val,
                "metric": self.metric, "tied": self.tied}


#: fewer examples per class than this in a split make its accuracies too coarse to compare methods by
MIN_PER_CLASS = 5


def split_warnings(task: Task, sweep: Optional[AlphaSweep] = None) -> list[str]:
    """What a user must know before trusting the numbers: splits too small to tell candidates apart, and an
    alpha chosen among tied candidates."""
    out = []
    for split, use in (("val", "choose alpha"), ("test", "compare methods")):
        x, y = task.split(split)
        if y is None or not len(task.classnames):
            continue
        counts = torch.bincount(y.long(), minlength=len(task.classnames))
        if int(counts.min()) < MIN_PER_CLASS:
            out.append(f"the {split} split has only {int(counts.min())} example(s) of some class ({len(y)} in all): "
                       f"too few to {use} reliably (one example is {100 / max(1, len(y)):.1f} points)")
    if sweep is not None and len(sweep.tied) > 1:
        what = "every candidate" if len(sweep.tied) == len(sweep.alphas) else f"{len(sweep.tied)} candidates"
        at = f"loss {sweep.best_val:.4g}" if sweep.metric == "loss" else f"{100 * sweep.best_val:.1f}%"
        out.append(f"{what} tied at {at} on the validation split; alpha "
                   f"{sweep.best_alpha:g} is the smallest of them, not a measured best")
    return out


def _sweep_text(target: Model, delta: TaskVector, task, grid: list[float], device: str, split: str,
                on_alpha: Optional[Callable[[int, int], None]]) -> AlphaSweep:
    """Validation accuracy (labelled) or next-token loss (a plain corpus) for each alpha."""
    x, _ = task.split(split)
    if len(x) == 0:
        raise TransportError(f"task {task.name}: the {split} split holds no texts to choose alpha on (give more "
                             "texts, or a fixed alpha)")
    labelled = task.labelled
    vals = []
    for i, a in enumerate(grid):
        sc = text_scores(target, task, split, delta.apply_to(target.params, a), device)
        vals.append(int((sc.predictions == task.split(split)[1]).sum()) / len(x) if labelled else sc.loss)
        if on_alpha is not None:
            on_alpha(i + 1, len(grid))
    if labelled:
        best = max(range(len(grid)), key=lambda i: (vals[i], -abs(grid[i])))
    else:
        best = min(range(len(grid)), key=lambda i: (vals[i] if math.isfinite(vals[i]) else math.inf, abs(grid[i])))
    tied = [grid[i] for i in range(len(grid)) if vals[i] == vals[best]]
    return AlphaSweep(list(grid), vals, grid[best], vals[best], "accuracy" if labelled else "loss", tied=tied)


def sweep_alpha(target: Model, delta: TaskVector, task: Task, grid: list[float], device: str = "cpu",
                split: str = "val", on_alpha: Optional[Callable[[int, int], None]] = None) -> AlphaSweep:
    """Validation accuracy of theta_B + alpha * delta for each alpha; best = highest (ties: smallest alpha).
    A plain text corpus: validation next-token loss; best = lowest (ties: smallest alpha).

    ``on_alpha(done, total)`` is called after each alpha (progress of a long sweep).
    """
    if is_text(task):
        return _sweep_text(target, delta, task, grid, device, split, on_alpha)
    head = target.classifier(task.classnames)
    accs = []
    for i, a in enumerate(grid):
        accs.append(accuracy(target, task, split, delta.apply_to(target.params, a), head, device=device))
        if on_alpha is not None:
            on_alpha(i + 1, len(grid))
    best = max(range(len(grid)), key=lambda i: (accs[i], -abs(grid[i])))
    tied = [grid[i] for i in range(len(grid)) if accs[i] == accs[best]]
    return AlphaSweep(list(grid), accs, grid[best], accs[best], tied=tied)
