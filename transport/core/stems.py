"""Input stems: what turns images or token ids into the first residual stream.

Image stem: pixels in [0, 1] are resized to the model's size and normalised (:func:`preprocess`), cut
into patches by a strided convolution, prefixed with a class token and given learned positions.
Token stem: token ids index the embedding table, plus learned positions when the model has them
(rotary models rotate queries and keys inside attention instead).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F

from transport.core.arch import Arch
from transport.errors import TransportError

Tensor = torch.Tensor


@dataclass(frozen=True)
class TextBatch:
    """Token ids of a batch of texts, right-padded: ``ids`` [N, T] (int64) and ``mask`` [N, T] (True = real token).

    Behaves like a batch of images where the code only needs ``len``, slicing / indexing and ``.to``.
    """

    ids: Tensor
    mask: Tensor

    def __post_init__(self) -> None:
        if self.ids.dim() != 2 or self.ids.is_floating_point() or tuple(self.mask.shape) != tuple(self.ids.shape):
            raise ValueError(f"TextBatch needs integer ids [N, T] and a mask of the same shape, got "
                             f"{tuple(self.ids.shape)} {self.ids.dtype} and {tuple(self.mask.shape)}")

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def __getitem__(self, idx) -> "TextBatch":
        ids, mask = self.ids[idx], self.mask[idx]
        if ids.dim() == 1:
            ids, mask = ids[None], mask[None]
        return TextBatch(ids, mask.bool())

    @property
    def lengths(self) -> Tensor:
        return self.mask.long().sum(1)

    @property
    def last(self) -> Tensor:
        """[N] position of each text's last real token (where its next-token prediction is read)."""
        return (self.lengths - 1).clamp_min(0)

    @property
    def tokens(self) -> int:
        """Real tokens in the batch."""
        return int(self.mask.sum())

    @property
    def device(self) -> torch.device:
        return self.ids.device

    def to(self, device: str | torch.device) -> "TextBatch":
        return TextBatch(self.ids.to(device), self.mask.to(device))

    def trimmed(self) -> "TextBatch":
        """The same texts without trailing columns that are padding in every row."""
        t = int(self.lengths.max()) if len(self) else 0
        return TextBatch(self.ids[:, :max(t, 1)], self.mask[:, :max(t, 1)])

    @classmethod
    def from_lists(cls, sequences: list[list[int]], pad_id: int = 0) -> "TextBatch":
        t = max((len(s) for s in sequences), default=1) or 1
        ids = torch.full((len(sequences), t), int(pad_id), dtype=torch.long)
        mask = torch.zeros(len(sequences), t, dtype=torch.bool)
        for i, s in enumerate(sequences):
            ids[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
            mask[i, :len(s)] = True
        return cls(ids, mask)


Inputs = Union[Tensor, TextBatch]  # preprocessed pixels [N, C, S, S], or a TextBatch


def model_inputs(arch: Arch, x: Union[Tensor, TextBatch]) -> Inputs:
    """What the forward of ``arch`` reads from a task's samples: images in [0, 1] are resized and normalised;
    token ids pass as a :class:`TextBatch` (a bare [N, T] id tensor gets an all-true mask)."""
    if arch.stem == "image":
        if isinstance(x, TextBatch):
            raise TransportError(f"{arch.name} reads images, got token ids (a text task)")
        return preprocess(arch, x)
    if isinstance(x, TextBatch):
        return x
    if torch.is_tensor(x) and x.dim() == 2 and not x.is_floating_point():
        return TextBatch(x.long(), torch.ones_like(x, dtype=torch.bool))
    raise TransportError(f"{arch.name} reads token ids, got images (an image task)")


def preprocess(arch: Arch, images: Tensor) -> Tensor:
    """Images in [0, 1], [N, C, H, W] -> the model's own input: resized to its image size and normalised."""
    if arch.stem != "image":
        raise TransportError(f"{arch.name} reads token ids, not images")
    if images.dim() != 4:
        raise ValueError(f"images must be [N, C, H, W], got {tuple(images.shape)}")
    x = images.float()
    if x.shape[1] == 1 and arch.in_chans == 3:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-1] != arch.image_size or x.shape[-2] != arch.image_size:
        x = F.interpolate(x, size=(arch.image_size, arch.image_size), mode="bicubic", align_corners=False)
        x = x.clamp(0, 1)
    mean = torch.tensor(arch.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(arch.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def image_tokens(params: dict[str, Tensor], arch: Arch, pixels: Tensor) -> Tensor:
    """Tokens [N, (1 +) g*g, d]: patch embedding, class token, learned positions (before ``ln_pre``)."""
    p = params
    x = F.conv2d(pixels, p["embed.patch.weight"], p.get("embed.patch.bias"), stride=arch.patch_size)
    n = x.shape[0]
    x = x.flatten(2).transpose(1, 2)  # [N, g*g, d]
    if arch.cls_token:
        x = torch.cat([p["embed.cls"].to(x.dtype).expand(n, 1, -1), x], dim=1)
    if arch.position == "learned":
        x = x + p["embed.pos"].to(x.dtype)
    return x


def _transformed(t: Tensor) -> bool:
    """Whether ``t`` is seen through a ``torch.func`` transform (vmap): its values cannot steer Python there,
    so the range check runs before the transform (GradFix checks its samples' ids up front)."""
    return bool(torch._C._functorch.is_functorch_wrapped_tensor(t))


def check_token_ids(arch: Arch, ids: Tensor) -> None:
    """A one-line TransportError unless every id lies in the vocabulary of ``arch``."""
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= arch.vocab_size):
        raise TransportError(f"{arch.name}: token ids must lie in [0, {arch.vocab_size}), got "
                             f"{int(ids.min())}..{int(ids.max())}")


def token_embeddings(params: dict[str, Tensor], arch: Arch, ids: Tensor) -> Tensor:
    """Embeddings [N, T, d] of token ids [N, T] (plus learned positions 0..T-1)."""
    if ids.dim() != 2 or ids.is_floating_point():
        raise ValueError(f"token ids must be an integer tensor [N, T], got {tuple(ids.shape)} {ids.dtype}")
    if not _transformed(ids):
        check_token_ids(arch, ids)
    x = F.embedding(ids, params["embed.tokens"])
    if arch.position == "learned":
        t = ids.shape[1]
        if t > arch.context:
            raise TransportError(f"{arch.name}: {t} tokens exceed its context of {arch.context}")
        x = x + params["embed.pos"][:t].to(x.dtype)
    return x


def rotary_tables(arch: Arch, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin [T, d_h] of the rotate-half convention: frequency i on dims i and i + d_h / 2."""
    dh = arch.head_dim
    inv_freq = 1.0 / (arch.rope_theta ** (torch.arange(0, dh, 2, dtype=torch.int64, device=positions.device)
                                          .float() / dh))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding of x [N, heads, T, d_h]: x cos + rotate_half(x) sin."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def sequence_mask(ids: Tensor, mask: Optional[Tensor]) -> Tensor:
    """A boolean [N, T] mask of real tokens (all True when no mask is given)."""
    if mask is None:
        return torch.ones(ids.shape[:2], dtype=torch.bool, device=ids.device)
    if tuple(mask.shape) != tuple(ids.shape[:2]):
        raise ValueError(f"attention mask {tuple(mask.shape)} does not fit the tokens {tuple(ids.shape[:2])}")
    return mask.bool()


__all__ = ["TextBatch", "Inputs", "model_inputs", "preprocess", "image_tokens", "check_token_ids", "token_embeddings", "rotary_tables", "rotate", "sequence_mask"]
