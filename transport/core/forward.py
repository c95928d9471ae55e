"""One functional forward pass for every supported family, on canonical parameters.

A pre-norm transformer switched by its :class:`~transport.core.arch.Arch`: image or token stem,
LayerNorm or RMSNorm, plain or gated MLP, learned or rotary positions, grouped-query attention,
causal or full attention, and a readout (class token, mean, last or end-of-text token, or per-token
language-model logits). It reproduces the real modules of every family (tested per family) and is a
pure function of a parameter dict, so GradFix can take per-sample gradients with ``torch.func`` and
Theseus and activation matching can read every activation site through ``record``.

Stages: :func:`embed`, :func:`block` per layer, :func:`readout`; :func:`encode` runs them in order.
Sites ``record(site, activation)`` receives (activations [N, T, width]; the layout's ``Axis.site``):
``embed`` (before ``ln_pre``, only with one), ``res:0`` (block 0's input), per block l ``ln1:l``,
``q:l`` / ``k:l`` / ``v:l`` (projections, before rotary embedding), ``ctx:l`` (heads' context, o's
input), ``o:l``, ``res:la``, ``ln2:l``, ``gate:l`` (gated MLPs), ``fc1:l`` (pre-activation),
``act:l`` (fc2's input), ``fc2:l``, ``res:lm``; and ``ln_post`` / ``proj`` for the pooled features.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from transport.core.arch import Arch
from transport.core.stems import (Inputs, TextBatch, image_tokens, preprocess, rotary_tables, rotate,
                                  token_embeddings)
from transport.errors import TransportError

Tensor = torch.Tensor
Recorder = Callable[[str, Tensor], None]  # (activation site, activation [N, T, width])


def activation(name: str, x: Tensor) -> Tensor:
    if name == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "silu":
        return F.silu(x)
    if name == "relu":
        return F.relu(x)
    return F.gelu(x)


def norm(x: Tensor, p: dict[str, Tensor], prefix: str, arch: Arch) -> Tensor:
    """LayerNorm (optionally without bias) or RMSNorm ``w * x / sqrt(mean(x^2) + eps)`` over the last axis."""
    if arch.norm == "rms":
        return p[f"{prefix}.weight"] * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + arch.norm_eps))
    return F.layer_norm(x, (x.shape[-1],), p[f"{prefix}.weight"], p.get(f"{prefix}.bias"), arch.norm_eps)


def _linear(x: Tensor, p: dict[str, Tensor], name: str) -> Tensor:
    return F.linear(x, p[f"{name}.weight"], p.get(f"{name}.bias"))


def embed(params: dict[str, Tensor], arch: Arch, inputs: Inputs, record: Optional[Recorder] = None) -> Tensor:
    """The residual stream [N, T, d] entering block 0 (``inputs``: preprocessed pixels, token ids or a TextBatch)."""
    if isinstance(inputs, TextBatch):
        inputs = inputs.ids
    x = image_tokens(params, arch, inputs) if arch.stem == "image" else token_embeddings(params, arch, inputs)
    if arch.ln_pre:
        y = norm(x, params, "ln_pre", arch)
        if record is not None:
            record("embed", x)
        x = y
    if record is not None:
        record("res:0", x)
    return x


def _attention_bias(arch: Arch, t: int, mask: Optional[Tensor], device, dtype) -> Optional[Tensor]:
    """Additive [N or 1, 1, T, T] bias: -inf above the diagonal (causal) and on padded keys."""
    allowed = None
    if arch.causal:
        allowed = torch.ones(t, t, dtype=torch.bool, device=device).tril()[None, None]
    if mask is not None:
        keys = mask.bool()[:, None, None, :]
        allowed = keys if allowed is None else allowed & keys
    if allowed is None:
        return None
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, float("-inf"))


def block(params: dict[str, Tensor], arch: Arch, l: int, x: Tensor, record: Optional[Recorder] = None,
          skips: Optional[dict[str, Tensor]] = None, mask: Optional[Tensor] = None) -> Tensor:
    """Residual block ``l`` on x [N, T, d]: attention, then MLP, each with its residual connection.

    ``skips`` optionally replaces a residual connection x + f(x) by x S^T + f(x) (keys ``blocks.{l}.attn``
    / ``blocks.{l}.mlp``); used to check independently permuted residual streams. ``mask`` [N, T]: real
    tokens (padded keys get no attention).
    """
    p = params
    n, t = x.shape[0], x.shape[1]
    H, G, dh = arch.heads, arch.kv_heads, arch.head_dim
    b = f"blocks.{l}"
    if arch.window and t > arch.window:
        raise TransportError(f"{arch.name}: {t} tokens exceed its sliding attention window of {arch.window} "
                             "(not modelled: shorter sequences are exact)")

    def rec(site: str, value: Tensor) -> None:
        if record is not None:
            record(site, value)

    h = norm(x, p, f"{b}.ln1", arch)
    rec(f"ln1:{l}", h)
    q, k, v = (_linear(h, p, f"{b}.attn.{z}") for z in "qkv")
    rec(f"q:{l}", q)
    rec(f"k:{l}", k)
    rec(f"v:{l}", v)
    q = q.reshape(n, t, H, dh).transpose(1, 2)
    k, v = (z.reshape(n, t, G, dh).transpose(1, 2) for z in (k, v))
    if arch.position == "rope":
        cos, sin = rotary_tables(arch, torch.arange(t, device=x.device), q.dtype)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    if G != H:  # every key/value head serves its group of consecutive query heads
        k, v = k.repeat_interleave(H // G, dim=1), v.repeat_interleave(H // G, dim=1)
    scores = (q * (1.0 / math.sqrt(dh))) @ k.transpose(-1, -2)
    bias = _attention_bias(arch, t, mask, x.device, scores.dtype)
    att = torch.softmax(scores if bias is None else scores + bias, dim=-1)
    ctx = (att @ v).transpose(1, 2).reshape(n, t, H * dh)
    rec(f"ctx:{l}", ctx)
    o = _linear(ctx, p, f"{b}.attn.o")
    rec(f"o:{l}", o)
    x = (x if skips is None or f"{b}.attn" not in skips else x @ skips[f"{b}.attn"].t()) + o
    rec(f"res:{l}a", x)
    h = norm(x, p, f"{b}.ln2", arch)
    rec(f"ln2:{l}", h)
    up = _linear(h, p, f"{b}.mlp.fc1")
    if arch.mlp == "gated":
        gate = _linear(h, p, f"{b}.mlp.gate")
        rec(f"gate:{l}", gate)
        rec(f"fc1:{l}", up)
        z = activation(arch.act, gate) * up
    else:
        rec(f"fc1:{l}", up)
        z = activation(arch.act, up)
    rec(f"act:{l}", z)
    y = _linear(z, p, f"{b}.mlp.fc2")
    rec(f"fc2:{l}", y)
    x = (x if skips is None or f"{b}.mlp" not in skips else x @ skips[f"{b}.mlp"].t()) + y
    rec(f"res:{l}m", x)
    return x


def pool(x: Tensor, arch: Arch, index: Optional[Tensor] = None, mask: Optional[Tensor] = None) -> Tensor:
    """[N, d] from the last block's tokens: the class / first token, the mean, or the token at ``index``."""
    if arch.readout == "cls":
        return x[:, 0]
    if arch.readout == "mean":
        if mask is None:
            return x.mean(1)
        m = mask.to(x.dtype)[..., None]
        return (x * m).sum(1) / m.sum(1).clamp_min(1.0)
    if index is None:  # 'last' without an index: the last position, or the last real token
        index = (mask.long().sum(1) - 1) if mask is not None else torch.full((x.shape[0],), x.shape[1] - 1)
    return x[torch.arange(x.shape[0], device=x.device), index.to(x.device)]


def readout(params: dict[str, Tensor], arch: Arch, x: Tensor, record: Optional[Recorder] = None,
            index: Optional[Tensor] = None, mask: Optional[Tensor] = None) -> Tensor:
    """Features [N, feature_dim] (final norm of the pooled token, then the projection if any), or for an
    'lm' readout the next-token logits [N, T, V] of every position ([N, V] at ``index`` when given)."""
    p = params
    if arch.readout == "lm":
        if index is not None:
            x = x[torch.arange(x.shape[0], device=x.device), index.to(x.device)]
        h = norm(x, p, "ln_post", arch)
        unembed = p["embed.tokens"] if arch.tied_embeddings else p["head.unembed"]
        return h @ unembed.t().to(h.dtype)
    out = norm(pool(x, arch, index, mask), p, "ln_post", arch)
    if record is not None:
        record("ln_post", out)
    if arch.output_dim:
        out = out @ p["head.proj"]
        if record is not None:
            record("proj", out)
    return out


def encode(params: dict[str, Tensor], arch: Arch, inputs: Inputs, record: Optional[Recorder] = None,
           skips: Optional[dict[str, Tensor]] = None, mask: Optional[Tensor] = None,
           index: Optional[Tensor] = None) -> Tensor:
    """The whole pass: preprocessed pixels [N, C, S, S], token ids [N, T] or a :class:`TextBatch` (its mask
    applies) -> :func:`readout`'s output."""
    if isinstance(inputs, TextBatch) and mask is None:
        mask = inputs.mask
    if arch.readout == "eot" and index is None and arch.stem == "tokens":  # the end-of-text token has the top id
        index = (inputs.ids if isinstance(inputs, TextBatch) else inputs).argmax(-1)
    x = embed(params, arch, inputs, record)
    for l in range(arch.layers):
        x = block(params, arch, l, x, record, skips, mask)
    return readout(params, arch, x, record, index, mask)


__all__ = ["Recorder", "activation", "norm", "embed", "block", "pool", "readout", "encode", "preprocess"]
