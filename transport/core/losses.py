"""Task losses on canonical parameters: cross-entropy of a model's own classifier.

Every family reduces to the same loss once its head is known: the zoo's pretraining head, a CLIP
zero-shot head built from class names through the model's own text tower, or a Hugging Face ViT's
classifier (see :meth:`transport.core.model.Model.classifier`). A :data:`LossFn` is a pure function of a
parameter dict, so ``torch.func`` can differentiate it per sample.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from transport.core.arch import Arch
from transport.core.forward import encode
from transport.core.heads import Classifier
from transport.core.model import Model
from transport.data import Task
from transport.errors import TransportError

Tensor = torch.Tensor

# (params, preprocessed pixels [n, C, S, S], labels [n]) -> per-sample losses [n]
LossFn = Callable[[dict[str, Tensor], Tensor, Tensor], Tensor]


def classification_loss(arch: Arch, head: Classifier) -> LossFn:
    """Per-sample cross-entropy of ``head`` on the image features of ``arch``."""

    def loss(params: dict[str, Tensor], pixels: Tensor, labels: Tensor) -> Tensor:
        logits = head(encode(params, arch, pixels))
        return F.cross_entropy(logits, labels, reduction="none")

    return loss


def task_loss(model: Model, task: Task, device: str = "cpu") -> tuple[LossFn, Classifier]:
    """The model's own classification loss on ``task`` (its head, or its zero-shot head), on ``device``."""
    head = model.classifier(task.classnames)
    if head.num_classes != len(task.classnames):
        raise TransportError(f"{model.ref}: head has {head.num_classes} classes, task {task.name} has "
                             f"{len(task.classnames)}")
    head = head.to(device)
    return classification_loss(model.arch, head), head


def mean_loss(loss_fn: LossFn, params: dict[str, Tensor], pixels: Tensor, labels: Tensor,
              batch_size: int = 256) -> float:
    """Mean of ``loss_fn`` over all samples (no gradient), in float64."""
    total, n = 0.0, len(labels)
    with torch.no_grad():
        for i in range(0, n, batch_size):
            total += float(loss_fn(params, pixels[i:i + batch_size], labels[i:i + batch_size]).double().sum())
    return total / max(n, 1)
