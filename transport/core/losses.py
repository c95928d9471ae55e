"""Task losses on canonical parameters: cross-entropy of a model's own classifier, or of its own next-token
prediction on texts.

Images: every family reduces to the same loss once its head is known: the zoo's pretraining head, a CLIP
zero-shot head built from class names through the model's own text tower, or a Hugging Face ViT's
classifier (see :meth:`transport.core.model.Model.classifier`). Texts (a language model, 'lm' readout):
the next-token cross-entropy over the vocabulary, for a classification task of the label word's first
token after the prompt (-log p(label | prompt)), for a plain corpus averaged over each text's real
tokens (padding never counts). A :data:`LossFn` is a pure function of a parameter dict, so
``torch.func`` can differentiate it per sample.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from transport.core.arch import Arch
from transport.core.forward import encode
from transport.core.heads import Classifier
from transport.core.model import Model
from transport.core.stems import TextBatch
from transport.data import Task
from transport.errors import TransportError

Tensor = torch.Tensor

# (params, preprocessed pixels [n, C, S, S] or a TextBatch, labels [n]) -> per-sample losses [n]
LossFn = Callable[[dict[str, Tensor], Any, Tensor], Tensor]


def classification_loss(arch: Arch, head: Classifier) -> LossFn:
    """Per-sample cross-entropy of ``head`` on the image features of ``arch``."""

    def loss(params: dict[str, Tensor], pixels: Tensor, labels: Tensor) -> Tensor:
        logits = head(encode(params, arch, pixels))
        return F.cross_entropy(logits, labels, reduction="none")

    return loss


def next_token_nll(logits: Tensor, batch: TextBatch) -> tuple[Tensor, Tensor]:
    """Per text [n]: the summed cross-entropy of its real next-token predictions (position t predicts token
    t + 1, both real) and how many there are. ``logits`` [n, T, V] from an 'lm' readout."""
    targets, real = batch.ids[:, 1:], batch.mask[:, 1:].to(logits.dtype)
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")  # [n, T - 1]
    return (nll * real).sum(1), real.sum(1)


def lm_loss(arch: Arch) -> LossFn:
    """Per text: the mean next-token cross-entropy over its real tokens (``labels`` are not read)."""
    _need_lm(arch)

    def loss(params: dict[str, Tensor], batch: TextBatch, labels: Tensor) -> Tensor:
        total, count = next_token_nll(encode(params, arch, batch), batch)
        return total / count.clamp_min(1.0)

    return loss


def label_word_loss(arch: Arch, label_ids: Tensor) -> LossFn:
    """Per text: -log p(label word's first token | prompt), the next-token cross-entropy over the whole
    vocabulary at the prompt's last real token (``labels``: class indices into ``label_ids``)."""
    _need_lm(arch)

    def loss(params: dict[str, Tensor], batch: TextBatch, labels: Tensor) -> Tensor:
        logits = encode(params, arch, batch, index=batch.last)  # [n, V]
        return F.cross_entropy(logits, label_ids.to(logits.device)[labels], reduction="none")

    return loss


def _need_lm(arch: Arch) -> None:
    if arch.stem != "tokens" or arch.readout != "lm":
        raise TransportError(f"{arch.name} has no next-token logits (readout '{arch.readout}'): texts are scored "
                             "by a language model")


def task_loss(model: Model, task: Any, device: str = "cpu") -> tuple[LossFn, Optional[Classifier]]:
    """The model's own loss on ``task`` on ``device``: images, its classification loss (its head, or its
    zero-shot head); texts, its next-token loss (label word or every token; no head)."""
    if getattr(task, "kind", "image") == "text":
        if task.labelled:
            return label_word_loss(model.arch, task.label_ids.to(device)), None
        return lm_loss(model.arch), None
    head = model.classifier(task.classnames)
    if head.num_classes != len(task.classnames):
        raise TransportError(f"{model.ref}: head has {head.num_classes} classes, task {task.name} has "
                             f"{len(task.classnames)}")
    head = head.to(device)
    return classification_loss(model.arch, head), head


def mean_loss(loss_fn: LossFn, params: dict[str, Tensor], pixels: Any, labels: Tensor,
              batch_size: int = 256) -> float:
    """Mean of ``loss_fn`` over all samples (no gradient), in float64."""
    total, n = 0.0, len(labels)
    with torch.no_grad():
        for i in range(0, n, batch_size):
            total += float(loss_fn(params, pixels[i:i + batch_size], labels[i:i + batch_size]).double().sum())
    return total / max(n, 1)
