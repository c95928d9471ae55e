"""Training loops and function-preserving edits for the text zoo's decoders (canonical parameters through
:func:`transport.core.forward.encode`, the forward every method reads; seeded, single-threaded, deterministic).

- :func:`pretrain`: next-token loss on batches a ``draw(rng, n)`` callback supplies (stdlib windows mixed
  with synthetic lines);
- :func:`finetune`: the label-word loss of a :class:`~transport.text.TextTask` (every weight trained);
- :func:`grow_depth`: new identity blocks (their attention and MLP outputs zero) inserted between layers.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from transport.core.arch import Arch
from transport.core.layout import param_axes
from transport.core.losses import label_word_loss, lm_loss
from transport.core.stems import TextBatch
from transport.errors import TransportError
from transport.zoo.train import TrainConfig

Tensor = torch.Tensor
Draw = Callable[[np.random.Generator, int], TextBatch]


@dataclass
class TextRun:
    params: dict[str, Tensor]
    snapshots: dict[int, dict[str, Tensor]]
    final_loss: float
    seconds: float
    cpu_seconds: float


def _optimizer(p: dict[str, Tensor], arch: Arch, cfg: TrainConfig) -> torch.optim.Optimizer:
    info = param_axes(arch)
    decay = [p[k] for k, i in info.items() if len(i.shape) >= 2 and i.block != "embed"]
    rest = [p[k] for k, i in info.items() if not (len(i.shape) >= 2 and i.block != "embed")]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": rest, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8, foreach=False)


def _loop(params: dict[str, Tensor], arch: Arch, cfg: TrainConfig, step_loss: Callable[[dict, int], Tensor],
          snapshot_at: tuple[int, ...], on_step: Optional[Callable[[int], None]]) -> TextRun:
    if cfg.steps < 1:
        raise TransportError(f"training needs at least one step, got {cfg.steps}")
    t0, c0 = time.perf_counter(), time.process_time()
    p = {k: params[k].detach().clone().float().requires_grad_(True) for k in param_axes(arch)}
    opt = _optimizer(p, arch, cfg)
    snaps: dict[int, dict[str, Tensor]] = {}
    loss_v = float("nan")
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = cfg.lr_at(step)
        loss = step_loss(p, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(p.values()), 1.0, foreach=False)
        opt.step()
        loss_v = float(loss.detach())
        if not math.isfinite(loss_v):
            raise TransportError(f"text zoo training diverged at step {step} (loss {loss_v}); lower the learning rate")
        if step + 1 in snapshot_at:
            snaps[step + 1] = {k: v.detach().clone() for k, v in p.items()}
        if on_step is not None:
            on_step(1)
    return TextRun({k: v.detach().clone() for k, v in p.items()}, snaps, loss_v, time.perf_counter() - t0,
                   time.process_time() - c0)


def pretrain(params: dict[str, Tensor], arch: Arch, draw: Draw, cfg: TrainConfig, snapshot_at: tuple[int, ...] = (),
             on_step: Optional[Callable[[int], None]] = None) -> TextRun:
    """Next-token training on ``draw(rng, batch_size)`` batches (rng seeded by ``cfg.seed``)."""
    rng = np.random.default_rng(cfg.seed)
    loss_fn = lm_loss(arch)

    def step_loss(p: dict, step: int) -> Tensor:
        batch = draw(rng, cfg.batch_size)
        return loss_fn(p, batch, torch.zeros(len(batch), dtype=torch.long)).mean()

    return _loop(params, arch, cfg, step_loss, snapshot_at, on_step)


def finetune(params: dict[str, Tensor], arch: Arch, task: Any, cfg: TrainConfig,
             on_step: Optional[Callable[[int], None]] = None) -> TextRun:
    """Label-word fine-tuning on the task's train split (shuffled epochs, seeded by ``cfg.seed``)."""
    x, y = task.split("train")
    if y is None or len(y) == 0:
        raise TransportError(f"task {task.name}: fine-tuning needs labelled train texts")
    g = torch.Generator().manual_seed(cfg.seed)
    loss_fn = label_word_loss(arch, task.label_ids)
    order: list[Tensor] = []

    def step_loss(p: dict, step: int) -> Tensor:
        buf = torch.cat(order) if order else torch.empty(0, dtype=torch.long)
        while len(buf) < cfg.batch_size:
            buf = torch.cat([buf, torch.randperm(len(y), generator=g)])
        order[:] = [buf[cfg.batch_size:]]
        idx = buf[:cfg.batch_size]
        return loss_fn(p, x[idx].trimmed(), y[idx]).mean()

    return _loop(params, arch, cfg, step_loss, (), on_step)


def texts_batch(tokenizer: Any, texts: list[str], context: int) -> TextBatch:
    """Token ids of ``texts`` cut to ``context`` tokens (padding: the tokenizer's pad id)."""
    ids = [s[:context] for s in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return TextBatch.from_lists([s if len(s) >= 2 else s + [tokenizer.eos_token_id] * 2 for s in ids],
                                pad_id=int(tokenizer.pad_token_id))


# ----------------------------------------------------------------------------------------------
# depth growth: identity blocks inserted
# ----------------------------------------------------------------------------------------------
def depth_positions(layers: int, deep: int) -> list[int]:
    """Where each of ``layers`` blocks goes among ``deep`` (new identity blocks spread evenly between them)."""
    if deep < layers:
        raise TransportError(f"cannot grow {layers} blocks into {deep}")
    return [int(round(i * (deep - 1) / max(1, layers - 1))) if layers > 1 else 0 for i in range(layers)]


def grow_depth(params: dict[str, Tensor], arch: Arch, deep: Arch, fresh: dict[str, Tensor]) -> dict[str, Tensor]:
    """``deep`` (more layers, else equal) keeping the function: block l of ``arch`` becomes block
    ``depth_positions[l]``; the other blocks take ``fresh``'s tensors with the output projections of their
    attention and MLP zero, so they add nothing to the residual stream. Everything outside the blocks is kept."""
    if deep.differences(arch, ignore=("name", "layers")):
        raise TransportError(f"cannot grow {arch.name} into {deep.name}: only the depth may differ")
    pos = depth_positions(arch.layers, deep.layers)
    src = {m: l for l, m in enumerate(pos)}
    out = {}
    for k, info in param_axes(deep).items():
        if not k.startswith("blocks."):
            out[k] = params[k].clone()
            continue
        m, rest = int(k.split(".")[1]), k.split(".", 2)[2]
        if m in src:
            out[k] = params[f"blocks.{src[m]}.{rest}"].clone()
        else:
            zero = any(a is not None and a.role in ("o", "down") for a in info.axes) and info.axes[0] is not None \
                and info.axes[0].space is not None and info.axes[0].space.startswith("res")
            out[k] = torch.zeros_like(fresh[k]) if zero else fresh[k].clone()
    return out


def depth_map(tensors: dict[str, Tensor], arch: Arch, deep: Arch) -> dict[str, Tensor]:
    """A task vector of ``arch`` placed on ``deep``'s blocks as :func:`grow_depth` placed the weights (zero on the
    inserted blocks): the known depth map of the grown release."""
    zeros = {k: torch.zeros(i.shape) for k, i in param_axes(deep).items()}
    return grow_depth(tensors, arch, deep, zeros)


__all__ = ["TextRun", "pretrain", "finetune", "texts_batch", "depth_positions", "grow_depth", "depth_map"]
