"""Theseus's calibration inputs: images or texts, paired row by row between the two pretrained models.

Images: each model applies its own preprocessing; every token of every image is a row, the source's
patch grid resized bilinearly to the target's when the token counts differ (class token apart).
Texts: a :class:`~transport.core.stems.TextBatch` of the task's train split, read by BOTH models as the
same token ids; rows are the real tokens only (padding is masked out of attention and out of every
cross-covariance). Reading the same ids needs one tokenizer: :func:`shares_token_ids` is the hook a
vocabulary map between two tokenizers would extend; without one, differing vocabularies are refused.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from transport.core.arch import Arch
from transport.core.model import Model
from transport.core.procrustes import resize_tokens
from transport.core.stems import TextBatch, model_inputs
from transport.errors import TransportError

Tensor = torch.Tensor


# ----------------------------------------------------------------------------------------------
# one tokenizer for both models
# ----------------------------------------------------------------------------------------------
def tokenizer_identity(tokenizer: Any) -> Optional[str]:
    """What identifies a tokenizer's ids: ``vocab:<sha256 prefix>`` of its token -> id table (``get_vocab()``
    or an ``encoder`` dict), else its ``name_or_path``; None when neither is known."""
    if tokenizer is None:
        return None
    vocab = None
    get = getattr(tokenizer, "get_vocab", None)
    if callable(get):
        try:
            vocab = get()
        except Exception:  # noqa: BLE001 - a tokenizer without a readable table is "unknown"
            vocab = None
    if not isinstance(vocab, dict):
        vocab = getattr(tokenizer, "encoder", None)
    if isinstance(vocab, dict) and vocab:
        h = hashlib.sha256()
        for tok, i in sorted(vocab.items(), key=lambda kv: (int(kv[1]), str(kv[0]))):
            h.update(f"{int(i)}\t{tok}\n".encode("utf-8", "surrogatepass"))
        return "vocab:" + h.hexdigest()[:16]
    name = getattr(tokenizer, "name_or_path", None)
    return str(name) if name else None


def _names(tokenizer: Any) -> set[str]:
    """Every name a tokenizer is known by (its identity and its ``name_or_path``)."""
    out = {tokenizer_identity(tokenizer), getattr(tokenizer, "name_or_path", None) if tokenizer is not None else None}
    return {str(x) for x in out if x}


def shares_token_ids(source: Model, target: Model) -> bool:
    """Whether token id i means the same token to both models: equal vocabulary sizes and, when both
    models carry a tokenizer, the same :func:`tokenizer_identity`. (The hook for a vocabulary map.)"""
    if source.arch.vocab_size != target.arch.vocab_size:
        return False
    ia, ib = tokenizer_identity(source.tokenizer), tokenizer_identity(target.tokenizer)
    return ia is None or ib is None or ia == ib


def check_inputs(task: Any, source: Model, target: Model) -> None:
    """One-line TransportError unless both models read the task's samples alike (stems, one tokenizer)."""
    a, b = source.arch, target.arch
    if a.stem != b.stem:
        raise TransportError(f"theseus: {source.ref} reads {'token ids' if a.stem == 'tokens' else 'images'}, "
                             f"{target.ref} reads {'token ids' if b.stem == 'tokens' else 'images'}: "
                             "calibration rows cannot be paired")
    is_text = getattr(task, "kind", "image") == "text"
    if is_text != (a.stem == "tokens"):
        raise TransportError(f"theseus: task {task.name} holds {'texts' if is_text else 'images'}, "
                             f"{source.ref} reads {'token ids' if a.stem == 'tokens' else 'images'}")
    if not is_text:
        return
    if not shares_token_ids(source, target):
        if a.vocab_size != b.vocab_size:
            why = f"vocabularies of {a.vocab_size} and {b.vocab_size} tokens"
        else:
            why = f"tokenizers {tokenizer_identity(source.tokenizer)} and {tokenizer_identity(target.tokenizer)}"
        raise TransportError(f"theseus: {source.ref} and {target.ref} do not share token ids ({why}); both "
                             "models must read the same ids (one tokenizer)")
    tid = getattr(task, "tokenizer_id", "")
    for m in (source, target):
        names = _names(m.tokenizer)
        if tid and names and tid not in names:
            raise TransportError(f"theseus: task {task.name} was tokenised by {tid}, not by the tokenizer of "
                                 f"{m.ref} ({tokenizer_identity(m.tokenizer)})")


# ----------------------------------------------------------------------------------------------
# the calibration sample, in chunks
# ----------------------------------------------------------------------------------------------
def match_tokens(x: Tensor, tokens: int) -> Tensor:
    """Image activations [N, T, d] with their patch grid resized to ``tokens`` (class token plus a square grid)."""
    t = x.shape[1]
    if t == tokens:
        return x
    g, g_to = math.isqrt(t - 1), math.isqrt(tokens - 1)
    if g * g != t - 1 or g_to * g_to != tokens - 1:
        raise TransportError(f"theseus: token counts {t} and {tokens} are not a class token plus a square patch grid")
    return resize_tokens(x, g_to)


@dataclass
class Calibration:
    """The calibration samples (images in [0, 1] or a TextBatch), their labels (display only) and the chunks
    the forward passes run over.

    A display sample (images stratified by class, for the PCA view) may follow the calibration samples:
    its chunks come after the first ``n_calib`` samples and never feed a map.
    """

    samples: Any
    labels: Optional[Tensor]
    chunks: list[slice]
    text: bool
    n_calib: int = -1
    display: bool = False  # labels are the display sample's (one per display row)

    def __post_init__(self) -> None:
        if self.n_calib < 0:
            self.n_calib = len(self.samples)

    @classmethod
    def draw(cls, task: Any, n: int, seed: int, a: Arch, b: Arch, chunk_rows: int,
             shown: Optional[tuple[Tensor, Tensor]] = None) -> "Calibration":
        x, y = task.calibration(n, seed, with_labels=True)
        labelled = getattr(task, "labelled", True)
        labels = y if labelled and y is not None and len(y) == len(x) else None
        text = isinstance(x, TextBatch)
        per_sample = int(x.ids.shape[1]) if text else max(a.tokens, b.tokens)
        step = max(1, chunk_rows // max(per_sample, 1))
        n_calib = len(x)
        chunks = [slice(i, min(i + step, n_calib)) for i in range(0, n_calib, step)]
        if shown is not None and not text and len(shown[0]):  # display chunks after the calibration chunks
            x, labels = torch.cat([x, shown[0]]), shown[1]
            chunks += [slice(i, min(i + step, len(x))) for i in range(n_calib, len(x), step)]
        return cls(x, labels, chunks, text, n_calib, shown is not None and not text and len(shown[0]) > 0)

    def __len__(self) -> int:
        return self.n_calib

    def calibration_chunks(self) -> range:
        """Indices of the chunks that feed the maps (the display chunks come after them)."""
        return range(sum(1 for c in self.chunks if c.start < self.n_calib))

    def chunk(self, ci: int, device: torch.device) -> tuple[Any, Optional[Tensor]]:
        """Chunk ``ci`` on ``device`` and its mask of real tokens (None for images)."""
        x = self.samples[self.chunks[ci]]
        if self.text:
            x = x.trimmed().to(device)
            return x, x.mask
        return x.to(device), None

    @staticmethod
    def inputs(arch: Arch, x: Any) -> Any:
        return model_inputs(arch, x)

    def rows(self, x: Tensor, mask: Optional[Tensor], tokens: int) -> Tensor:
        """One model's rows [n, d]: real tokens (texts), or every token of the grid resized to ``tokens``."""
        if mask is not None:
            return x[mask.bool()]
        x = match_tokens(x, tokens)
        return x.reshape(-1, x.shape[-1])

    def paired_rows(self, xa: Tensor, xb: Tensor, mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        if xa.shape[0] != xb.shape[0]:
            raise TransportError(f"theseus: calibration batch sizes differ ({xa.shape[0]} vs {xb.shape[0]})")
        return self.rows(xa, mask, xb.shape[1]), self.rows(xb, mask, xb.shape[1])

    def display_rows(self, x: Tensor, keep: int, mask: Optional[Tensor]) -> Tensor:
        """One row per sample for the PCA view: the class token, or a text's last real token."""
        if mask is None:
            return x[:keep, 0]
        last = (mask.long().sum(1) - 1).clamp_min(0)[:keep]
        return x[torch.arange(keep, device=x.device), last]


__all__ = ["tokenizer_identity", "shares_token_ids", "check_inputs", "Calibration", "match_tokens"]
