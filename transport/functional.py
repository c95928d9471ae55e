"""One functional forward pass for every supported family, on canonical parameters.

``encode`` reproduces open_clip's ``VisionTransformer``, HF ``CLIPVisionModel`` (pooled + projection)
and HF ``ViTModel`` (final LayerNorm, class token) exactly (tested against the real modules). Because
it is a pure function of a parameter dict, GradFix can take per-sample gradients with
``torch.func`` and Theseus can record every linear module's input and output through ``record``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from transport.arch import ViTArch

Tensor = torch.Tensor
Recorder = Callable[[str, Tensor, Tensor], None]  # (module name, input [N, T, d_in], output [N, T, d_out])


def activation(name: str, x: Tensor) -> Tensor:
    if name == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    return F.gelu(x)


def preprocess(arch: ViTArch, images: Tensor) -> Tensor:
    """Images in [0, 1], [N, C, H, W] -> the model's own input: resized to its image size and normalised."""
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


def _ln(x: Tensor, p: dict[str, Tensor], name: str, eps: float) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), p[f"{name}.weight"], p[f"{name}.bias"], eps)


def _linear(x: Tensor, p: dict[str, Tensor], name: str, record: Optional[Recorder]) -> Tensor:
    y = F.linear(x, p[f"{name}.weight"], p.get(f"{name}.bias"))
    if record is not None:
        record(name, x, y)
    return y


def encode(params: dict[str, Tensor], arch: ViTArch, pixels: Tensor, record: Optional[Recorder] = None,
           skips: Optional[dict[str, Tensor]] = None) -> Tensor:
    """Image features [N, feature_dim] from preprocessed pixels [N, C, S, S].

    ``record(name, x, y)`` is called for every linear module (``blocks.{l}.attn.{q,k,v,o}``,
    ``blocks.{l}.mlp.{fc1,fc2}``; ``head.proj`` with x the pooled LN output) and for the LayerNorms
    (``ln_pre``, ``blocks.{l}.ln1``, ``blocks.{l}.ln2``, ``ln_post``) with their input and output.
    ``skips`` optionally replaces a residual connection x + f(x) by x S^T + f(x) (keys
    ``blocks.{l}.attn`` / ``blocks.{l}.mlp``); used to check independently permuted residual streams.
    The same pass in stages: :func:`embed`, :func:`block` for every layer, :func:`pool`.
    """
    x = embed(params, arch, pixels, record)
    for l in range(arch.layers):
        x = block(params, arch, l, x, record, skips)
    return pool(params, arch, x, record)


def embed(params: dict[str, Tensor], arch: ViTArch, pixels: Tensor, record: Optional[Recorder] = None) -> Tensor:
    """Tokens [N, 1 + g*g, d] entering block 0: patch embedding, class token, positions, ``ln_pre``."""
    p = params
    x = F.conv2d(pixels, p["embed.patch.weight"], p.get("embed.patch.bias"), stride=arch.patch_size)
    n = x.shape[0]
    x = x.flatten(2).transpose(1, 2)  # [N, g*g, d]
    cls = p["embed.cls"].to(x.dtype).expand(n, 1, -1)
    x = torch.cat([cls, x], dim=1) + p["embed.pos"].to(x.dtype)
    if arch.ln_pre:
        y = _ln(x, p, "ln_pre", arch.ln_eps)
        if record is not None:
            record("ln_pre", x, y)
        x = y
    return x


def block(params: dict[str, Tensor], arch: ViTArch, l: int, x: Tensor, record: Optional[Recorder] = None,
          skips: Optional[dict[str, Tensor]] = None) -> Tensor:
    """Residual block ``l`` on tokens x [N, T, d]: attention, then MLP, each with its residual connection."""
    p, eps = params, arch.ln_eps
    n, H, dh = x.shape[0], arch.heads, arch.head_dim
    b = f"blocks.{l}"
    h = _ln(x, p, f"{b}.ln1", eps)
    if record is not None:
        record(f"{b}.ln1", x, h)
    q = _linear(h, p, f"{b}.attn.q", record)
    k = _linear(h, p, f"{b}.attn.k", record)
    v = _linear(h, p, f"{b}.attn.v", record)
    t = q.shape[1]
    q, k, v = (z.reshape(n, t, H, dh).transpose(1, 2) for z in (q, k, v))
    att = torch.softmax((q * (1.0 / math.sqrt(dh))) @ k.transpose(-1, -2), dim=-1)
    ctx = (att @ v).transpose(1, 2).reshape(n, t, H * dh)
    o = _linear(ctx, p, f"{b}.attn.o", record)
    x = (x if skips is None or f"{b}.attn" not in skips else x @ skips[f"{b}.attn"].t()) + o
    h = _ln(x, p, f"{b}.ln2", eps)
    if record is not None:
        record(f"{b}.ln2", x, h)
    z = activation(arch.act, _linear(h, p, f"{b}.mlp.fc1", record))
    y = _linear(z, p, f"{b}.mlp.fc2", record)
    return (x if skips is None or f"{b}.mlp" not in skips else x @ skips[f"{b}.mlp"].t()) + y


def pool(params: dict[str, Tensor], arch: ViTArch, x: Tensor, record: Optional[Recorder] = None) -> Tensor:
    """Features from the last block's tokens: ``ln_post`` of the class token, then the projection if any."""
    p = params
    pooled = x[:, 0]
    out = _ln(pooled, p, "ln_post", arch.ln_eps)
    if record is not None:
        record("ln_post", pooled, out)
    if arch.output_dim:
        proj = out @ p["head.proj"]
        if record is not None:
            record("head.proj", out, proj)
        out = proj
    return out


@dataclass
class Classifier:
    """A frozen head on image features: logits = scale * f W^T + b (f unit-normalised when ``normalize``).

    For CLIP it holds the zero-shot class embeddings from the text tower; for the zoo the pretraining head.
    """

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


def logits(params: dict[str, Tensor], arch: ViTArch, head: Classifier, images01: Tensor) -> Tensor:
    """Class logits for images in [0, 1] (preprocessing included)."""
    return head(encode(params, arch, preprocess(arch, images01)))
