"""Heads on a tower's features: a frozen linear classifier, and CLIP zero-shot heads built from prompts.

Every family reduces to the same :class:`Classifier` once its head is known: the zoo's pretraining
head, a CLIP zero-shot head (class embeddings from the model's own text tower, averaged over prompt
templates) or a Hugging Face ViT's classifier.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from transport.errors import TransportError

Tensor = torch.Tensor

# Prompt ensemble for CLIP zero-shot heads: class embedding = normalised mean of normalised prompts.
PROMPT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
    "a low resolution photo of a {}.",
    "a drawing of a {}.",
    "a photo of the {}, a type of object.",
)


@dataclass
class Classifier:
    """A frozen head on features: logits = scale * f W^T + b (f unit-normalised when ``normalize``)."""

    weight: Tensor  # [C, feature_dim]
    bias: Optional[Tensor] = None  # [C]
    normalize: bool = False
    logit_scale: float = 1.0
    classnames: list[str] = field(default_factory=list)

    def __call__(self, features: Tensor) -> Tensor:
        f = F.normalize(features, dim=-1) if self.normalize else features
        logits = self.logit_scale * (f @ self.weight.t().to(f.dtype))
        return logits + self.bias.to(f.dtype) if self.bias is not None else logits

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])

    def to(self, device: str | torch.device) -> "Classifier":
        return Classifier(self.weight.to(device), None if self.bias is None else self.bias.to(device),
                          self.normalize, self.logit_scale, list(self.classnames))

    def state(self) -> dict[str, Tensor]:
        d = {"classifier.weight": self.weight}
        if self.bias is not None:
            d["classifier.bias"] = self.bias
        return d


TextEncoder = Callable[[list[str]], Tensor]  # prompts -> text features [n, e]


@torch.no_grad()
def zero_shot_classifier(encode_text: TextEncoder, classnames: Sequence[str], logit_scale: float,
                         templates: Optional[Sequence[str]] = None, batch_size: int = 256) -> Classifier:
    """Per class the normalised mean of the normalised prompt embeddings; logits = scale * cos(image, class).

    ``templates`` default to :data:`PROMPT_TEMPLATES` (read at call time)."""
    templates = PROMPT_TEMPLATES if templates is None else templates
    if not classnames:
        raise TransportError("zero-shot head needs at least one class name")
    texts = [t.format(c) for c in classnames for t in templates]
    feats = [encode_text(texts[i:i + batch_size]).float() for i in range(0, len(texts), batch_size)]
    f = F.normalize(torch.cat(feats), dim=-1).reshape(len(classnames), len(templates), -1).mean(1)
    return Classifier(F.normalize(f, dim=-1), normalize=True, logit_scale=float(logit_scale),
                      classnames=list(classnames))


class ZeroShotHeads:
    """A lazy, memoised zero-shot head builder (evaluation asks for the same classes many times)."""

    def __init__(self, build: Callable[[list[str]], Classifier]):
        self._build = build
        self._heads: dict[tuple[str, ...], Classifier] = {}

    def __call__(self, classnames: list[str]) -> Classifier:
        key = tuple(classnames)
        if key not in self._heads:
            self._heads[key] = self._build(list(classnames))
        return self._heads[key]


__all__ = ["Classifier", "PROMPT_TEMPLATES", "TextEncoder", "zero_shot_classifier", "ZeroShotHeads"]
