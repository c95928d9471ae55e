"""A loaded pretrained (or fine-tuned) model: architecture, canonical parameters and its frozen head."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from transport.core.arch import Arch
from transport.core.heads import Classifier
from transport.core.layout import check_params
from transport.errors import TransportError

Tensor = torch.Tensor


@dataclass
class Model:
    """What every method and the evaluation work on.

    ``params`` are canonical float32 tensors of the transported tower (see :mod:`transport.core.layout`).
    ``head`` is the model's own frozen classifier when it has one (zoo: its pretraining head; HF ViT:
    its classifier). ``zero_shot`` builds a CLIP zero-shot head from class names through the model's
    own text tower, when it has one. ``tokenizer`` turns text into token ids for a token-stem model.
    """

    arch: Arch
    params: dict[str, Tensor]
    ref: str
    head: Optional[Classifier] = None
    zero_shot: Optional[Callable[[list[str]], Classifier]] = None
    meta: dict[str, str] = field(default_factory=dict)
    tokenizer: Optional[Any] = None

    def __post_init__(self) -> None:
        check_params(self.params, self.arch, self.ref)

    def classifier(self, classnames: list[str]) -> Classifier:
        """The head to evaluate this model on a task with ``classnames`` (own head, else zero-shot)."""
        if self.head is not None and (not classnames or self.head.num_classes == len(classnames)):
            return self.head
        if self.zero_shot is not None:
            return self.zero_shot(list(classnames))
        raise TransportError(f"{self.ref}: no classification head for {len(classnames)} classes "
                             "(give a CLIP model with a text tower, or a model with a matching head)")

    def with_params(self, params: dict[str, Tensor], ref: str | None = None) -> "Model":
        return Model(self.arch, params, ref or self.ref, self.head, self.zero_shot, dict(self.meta), self.tokenizer)


__all__ = ["Model"]
