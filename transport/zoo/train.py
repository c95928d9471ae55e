"""Training loops for the demo zoo: pretraining (tower + head) and fine-tuning (tower only, head frozen).

Everything runs on canonical parameter dicts through :func:`transport.core.forward.encode`, so what is
trained is exactly what the methods later read. Runs are deterministic for a fixed configuration:
every random draw (initialisation, data order, augmentation) comes from explicit seeded generators.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from transport.core.arch import Arch
from transport.core.forward import encode
from transport.core.heads import Classifier
from transport.core.layout import param_axes
from transport.core.model import Model
from transport.core.stems import preprocess
from transport.data import Task
from transport.errors import TransportError
from transport.sources import init_params as family_init

Tensor = torch.Tensor
StepCallback = Callable[[int], None]  # called with the number of steps just done (for progress bars)


@dataclass(frozen=True)
class Augment:
    """Random shifts by up to ``shift`` pixels (edge pixels repeated), Gaussian pixel noise with std ``noise``
    and, with probability 1/2, a ``cutout`` x ``cutout`` square set to the image's mean. Images stay in [0, 1]."""

    shift: int = 1
    noise: float = 0.0
    cutout: int = 0

    def __call__(self, x: Tensor, g: torch.Generator) -> Tensor:
        n, _, h, w = x.shape
        if self.shift > 0:
            s = self.shift
            xp = F.pad(x, (s, s, s, s), mode="replicate")
            dy = torch.randint(0, 2 * s + 1, (n,), generator=g)
            dx = torch.randint(0, 2 * s + 1, (n,), generator=g)
            rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
            cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
            x = xp[torch.arange(n)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None], rows, cols]
        if self.cutout > 0:
            c = self.cutout
            cy = torch.randint(0, h - c + 1, (n,), generator=g)
            cx = torch.randint(0, w - c + 1, (n,), generator=g)
            on = torch.rand(n, generator=g) < 0.5
            yy, xx = torch.arange(h)[None, :, None], torch.arange(w)[None, None, :]
            box = ((yy >= cy[:, None, None]) & (yy < cy[:, None, None] + c)
                   & (xx >= cx[:, None, None]) & (xx < cx[:, None, None] + c) & on[:, None, None])
            x = torch.where(box[:, None], x.mean(dim=(1, 2, 3), keepdim=True), x)
        if self.noise > 0:
            x = (x + self.noise * torch.randn(x.shape, generator=g)).clamp(0.0, 1.0)
        return x


@dataclass(frozen=True)
class TrainConfig:
    """One training run: AdamW, linear warm-up then cosine decay to ``min_lr`` x ``lr``."""

    steps: int
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup: float = 0.05  # fraction of steps
    min_lr: float = 0.0  # fraction of lr at the end
    augment: Augment = field(default_factory=Augment)
    seed: int = 0
    train_head: bool = True

    def lr_at(self, step: int) -> float:
        warm = max(1, int(round(self.warmup * self.steps)))
        if step < warm:
            return self.lr * (step + 1) / warm
        t = (step - warm) / max(1, self.steps - warm)
        return self.lr * (self.min_lr + (1 - self.min_lr) * 0.5 * (1 + math.cos(math.pi * t)))

    def with_seed(self, seed: int) -> "TrainConfig":
        return replace(self, seed=seed)


@dataclass
class TrainResult:
    params: dict[str, Tensor]
    head: Classifier
    snapshots: dict[int, tuple[dict[str, Tensor], Classifier]]
    final_loss: float
    seconds: float  # wall clock
    cpu_seconds: float  # CPU time of this process (the build trains single-threaded)


def init_params(arch: Arch, seed: int) -> dict[str, Tensor]:
    """The family's own initialisation of ``arch`` (its real module, random init), as canonical tensors (seeded)."""
    return family_init(arch, seed)


def init_head(arch: Arch, num_classes: int, seed: int, classnames: Optional[list[str]] = None) -> Classifier:
    """A linear head on the tower's features, uniform(+-1/sqrt(dim)) like ``nn.Linear`` (seeded)."""
    g = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(arch.feature_dim)
    w = (torch.rand(num_classes, arch.feature_dim, generator=g) * 2 - 1) * bound
    b = (torch.rand(num_classes, generator=g) * 2 - 1) * bound
    return Classifier(w, b, classnames=list(classnames or []))


def _batches(n: int, batch_size: int, g: torch.Generator):
    """An endless stream of index batches over shuffled epochs (a batch may span two epochs)."""
    buf = torch.empty(0, dtype=torch.long)
    while True:
        while len(buf) < batch_size:
            buf = torch.cat([buf, torch.randperm(n, generator=g)])
        yield buf[:batch_size]
        buf = buf[batch_size:]


def train(params: dict[str, Tensor], head: Classifier, arch: Arch, images: Tensor, labels: Tensor,
          cfg: TrainConfig, snapshot_at: tuple[int, ...] = (), on_step: Optional[StepCallback] = None) -> TrainResult:
    """Train ``params`` (and the head when ``cfg.train_head``) with cross-entropy on images in [0, 1].

    Returns new tensors (inputs untouched) and copies of (params, head) after each step in ``snapshot_at``.
    """
    if cfg.steps < 1:
        raise TransportError(f"training needs at least one step, got {cfg.steps}")
    if len(images) != len(labels) or len(images) == 0:
        raise TransportError(f"training data: {len(images)} images and {len(labels)} labels")
    t0, c0 = time.perf_counter(), time.process_time()
    g = torch.Generator().manual_seed(cfg.seed)
    info = param_axes(arch)
    p = {k: params[k].detach().clone().float().requires_grad_(True) for k in info}
    hw = head.weight.detach().clone().float().requires_grad_(cfg.train_head)
    hb = None if head.bias is None else head.bias.detach().clone().float().requires_grad_(cfg.train_head)
    decay = [p[k] for k, i in info.items() if len(i.shape) >= 2 and i.block != "embed"]
    no_decay = [p[k] for k, i in info.items() if not (len(i.shape) >= 2 and i.block != "embed")]
    if cfg.train_head:
        decay.append(hw)
        if hb is not None:
            no_decay.append(hb)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8, foreach=False)
    snapshots: dict[int, tuple[dict[str, Tensor], Classifier]] = {}
    stream = _batches(len(images), cfg.batch_size, g)
    loss_v = float("nan")
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = cfg.lr_at(step)
        idx = next(stream)
        x = preprocess(arch, cfg.augment(images[idx], g))
        logits = Classifier(hw, hb, head.normalize, head.logit_scale)(encode(p, arch, x))
        loss = F.cross_entropy(logits, labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_v = float(loss.detach())
        if not math.isfinite(loss_v):
            raise TransportError(f"training diverged at step {step} (loss {loss_v}); lower the learning rate")
        if step + 1 in snapshot_at:
            snapshots[step + 1] = ({k: v.detach().clone() for k, v in p.items()}, _head(hw, hb, head))
        if on_step is not None:
            on_step(1)
    return TrainResult({k: v.detach().clone() for k, v in p.items()}, _head(hw, hb, head), snapshots, loss_v,
                       time.perf_counter() - t0, time.process_time() - c0)


def _head(w: Tensor, b: Optional[Tensor], like: Classifier) -> Classifier:
    return Classifier(w.detach().clone(), None if b is None else b.detach().clone(), like.normalize,
                      like.logit_scale, list(like.classnames))


def finetune(model: Model, images: Tensor, labels: Tensor, cfg: TrainConfig,
             on_step: Optional[StepCallback] = None) -> TrainResult:
    """Fine-tune the visual tower of ``model`` with its own head frozen (the returned head is that head)."""
    if model.head is None:
        raise TransportError(f"{model.ref}: fine-tuning needs the model's own classifier head")
    return train(model.params, model.head, model.arch, images, labels, replace(cfg, train_head=False),
                 on_step=on_step)


# The few-shot fine-tuning baseline's choices (learning rate x step count, picked on validation).
FEWSHOT_LRS = (1e-3, 3e-3)
FEWSHOT_STEPS = (5, 10, 20, 40, 80, 160, 320)


def fewshot_finetune(model: Model, task: Task, shots: int, seed: int, device: str = "cpu",
                     lrs: tuple[float, ...] = FEWSHOT_LRS,
                     steps: tuple[int, ...] = FEWSHOT_STEPS) -> tuple[float, dict]:
    """Fine-tune the tower of ``model`` (its head frozen) on K samples per class with AdamW, full batch.

    The shots are ``task.shots(shots, seed)``, the ones GradFix votes on. The learning rate and the number of
    steps (0 = the model itself) are chosen on the validation split, the split that chooses every transported
    update's alpha; returns the test accuracy of the chosen run and the choice.
    """
    from transport.core.evaluate import accuracy

    x, y = task.shots(shots, seed)
    head = model.classifier(task.classnames)
    best = (accuracy(model, task, "val", device=device), 0, 0.0, model.params)
    for lr in lrs:
        cfg = TrainConfig(steps=max(steps), batch_size=len(y), lr=lr, augment=Augment(shift=0), seed=seed,
                          train_head=False)
        res = train(model.params, head, model.arch, x, y, cfg, snapshot_at=tuple(steps))
        for s in steps:
            p = res.snapshots[s][0]
            v = accuracy(model, task, "val", p, head, device=device)
            if v > best[0]:
                best = (v, s, lr, p)
    acc = accuracy(model, task, "test", best[3], head, device=device)
    return acc, {"val": best[0], "steps": best[1], "lr": best[2]}


__all__ = ["Augment", "TrainConfig", "TrainResult", "init_params", "init_head", "train", "finetune",
           "fewshot_finetune", "FEWSHOT_LRS", "FEWSHOT_STEPS"]
