"""Text tasks: token ids (a :class:`~transport.core.stems.TextBatch` per split) with optional labels.

The counterpart of :class:`transport.data.Task` for token-stem models: ``split``, ``shots`` and
``calibration`` return a TextBatch where an image task returns an image tensor, so methods and the
evaluation treat both alike (``len``, indexing, :func:`transport.core.stems.model_inputs`). For a
classification task ``classnames`` are the label words the model is scored on.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from transport.core.stems import TextBatch
from transport.errors import TransportError

Tensor = torch.Tensor
SPLITS = ("train", "val", "test")


@dataclass
class TextTask:
    """``splits[name] = (TextBatch, labels [N] or None)``; ``classnames``: label words ([] for a plain corpus)."""

    name: str
    splits: dict[str, tuple[TextBatch, Optional[Tensor]]]
    classnames: list[str] = field(default_factory=list)
    description: str = ""
    tokenizer_id: str = ""  # what tokenised it (texts for one model are refused by a model with another vocabulary)
    kind = "text"

    def split(self, name: str) -> tuple[TextBatch, Optional[Tensor]]:
        if name not in self.splits:
            raise TransportError(f"task {self.name}: no '{name}' split")
        return self.splits[name]

    @property
    def labelled(self) -> bool:
        return all(y is not None for _, y in self.splits.values()) and bool(self.classnames)

    def shots(self, k: int, seed: int = 0, split: str = "train") -> tuple[TextBatch, Tensor]:
        """K labelled texts per class from ``split`` (train by default, never test), seeded."""
        if k < 1:
            raise TransportError(f"shots must be >= 1, got {k}")
        if split == "test":
            raise TransportError("shots are never drawn from the test split")
        x, y = self.split(split)
        if y is None:
            raise TransportError(f"task {self.name}: the {split} split has no labels (labelled shots need them)")
        g = torch.Generator().manual_seed(seed)
        idx = []
        for c in range(len(self.classnames)):
            pool = torch.nonzero(y == c).flatten()
            if len(pool) == 0:
                raise TransportError(f"task {self.name}: class '{self.classnames[c]}' has no {split} samples")
            idx.append(pool[torch.randperm(len(pool), generator=g)[: min(k, len(pool))]])
        i = torch.cat(idx)
        return x[i].trimmed(), y[i]

    def calibration(self, n: int, seed: int = 0, with_labels: bool = False):
        """``n`` texts of the train split (seeded): unlabelled inputs (labels only for colouring figures)."""
        x, y = self.split("train")
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(x), generator=g)[: min(n, len(x))]
        batch = x[idx].trimmed()
        if with_labels:
            return batch, (None if y is None else y[idx])
        return batch


__all__ = ["TextTask", "SPLITS"]
