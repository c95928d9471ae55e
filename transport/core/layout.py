"""The axis table: every canonical tensor of an :class:`~transport.core.arch.Arch`, with what each axis is.

Canonical names (d = width, m = MLP width, H / G = query / key-value heads of d_h dims, V = vocab):

======================================  ==============  =========================================
name                                    shape           present when
======================================  ==============  =========================================
embed.patch.weight / .bias              [d, C, p, p]    image stem (bias: ``patch_bias``)
embed.cls                               [d]             image stem with a class token
embed.tokens                            [V, d]          token stem (also the unembedding if tied)
embed.pos                               [T, d]          learned positions
ln_pre.weight / .bias                   [d]             ``ln_pre``
blocks.{l}.ln1.weight / .bias           [d]             (bias: LayerNorm with ``norm_bias``)
blocks.{l}.attn.q.weight / .bias        [H d_h, d]      (bias: ``qkv_bias``)
blocks.{l}.attn.k.weight / .bias        [G d_h, d]
blocks.{l}.attn.v.weight / .bias        [G d_h, d]
blocks.{l}.attn.o.weight / .bias        [d, H d_h]      (bias: ``o_bias``)
blocks.{l}.ln2.weight / .bias           [d]
blocks.{l}.mlp.gate.weight / .bias      [m, d]          gated MLP (bias: ``mlp_bias``)
blocks.{l}.mlp.fc1.weight / .bias       [m, d]          (the "up" projection of a gated MLP)
blocks.{l}.mlp.fc2.weight / .bias       [d, m]          (the "down" projection)
ln_post.weight / .bias                  [d]             always (the final norm)
head.proj                               [d, e]          ``output_dim`` (used as ``x @ proj``)
head.unembed                            [V, d]          'lm' readout without tied embeddings
======================================  ==============  =========================================

Each axis carries an :class:`Axis`: the symmetry space it lives in (``res:0``, ``res:{l}a``,
``res:{l}m``, ``heads:{l}``, ``mlp:{l}``; None for vocabulary, positions, channels, the projection's
output), its role inside that space, and the activation site it reads or writes (what Theseus and
activation matching record; :mod:`transport.core.forward` emits exactly these sites).

Residual spaces: ``res:0`` before block 0, ``res:{l}a`` after block l's attention, ``res:{l}m`` after its
MLP; the final norm reads the last one. With tied embeddings the token embedding is read again by the
unembedding, so the last residual space IS ``res:0`` (one tensor, two roles, one permutation).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional

import torch

from transport.core.arch import Arch
from transport.core.streamed import StreamedParams
from transport.errors import TransportError
from transport.files import all_finite

Tensor = torch.Tensor

BLOCKS = ("Q", "K", "V", "O", "gate", "fc1", "fc2", "ln1", "ln2")


@dataclass(frozen=True)
class Axis:
    """What one tensor axis is.

    ``space``: the symmetry variable (None: no permutation acts here). ``role``: inside a heads space
    'q' | 'k' | 'v' | 'o'; inside an MLP space 'gate' | 'up' | 'down'; on a residual axis 'read',
    'write' or 'norm'; 'vocab' / 'proj' elsewhere. ``site``: the activation this axis indexes.
    ``residual``: for a branch output ('write' rows of o and fc2), the residual-stream site it joins.
    """

    space: Optional[str]
    role: str
    site: Optional[str] = None
    residual: Optional[str] = None


@dataclass(frozen=True)
class ParamInfo:
    """Where a canonical tensor sits: its layer (-1 outside the blocks), block label and axes."""

    name: str
    shape: tuple[int, ...]
    layer: int
    block: str  # one of BLOCKS, or 'embed', 'ln_pre', 'ln_post', 'proj', 'unembed'
    axes: tuple[Optional[Axis], ...]
    is_bias: bool = False
    invariant: bool = False  # no loss depends on it (a key bias without rotary positions)

    @property
    def spaces(self) -> tuple[Optional[str], ...]:
        return tuple(None if a is None else a.space for a in self.axes)

    def numel(self) -> int:
        return math.prod(self.shape)


def res_in(layer: int) -> str:
    return "res:0" if layer == 0 else f"res:{layer - 1}m"


def res_out(arch: Arch) -> str:
    """The residual space the final norm reads (``res:0`` itself under tied embeddings)."""
    return "res:0" if arch.tied_embeddings else f"res:{arch.layers - 1}m"


def _res_after_mlp(arch: Arch, layer: int) -> str:
    return res_out(arch) if layer == arch.layers - 1 else f"res:{layer}m"


def param_axes(arch: Arch) -> dict[str, ParamInfo]:
    """The canonical tensors of ``arch`` in a fixed order, with what each axis is."""
    d, m, V = arch.width, arch.mlp_width, arch.vocab_size
    out: dict[str, ParamInfo] = {}

    def add(name: str, shape: tuple[int, ...], layer: int, block: str, axes: tuple, is_bias: bool = False,
            invariant: bool = False) -> None:
        out[name] = ParamInfo(name, tuple(shape), layer, block, tuple(axes), is_bias, invariant)

    def norm(prefix: str, layer: int, block: str, axis: Axis) -> None:
        add(f"{prefix}.weight", (d,), layer, block, (axis,))
        if arch.norm == "layer" and arch.norm_bias:
            add(f"{prefix}.bias", (d,), layer, block, (axis,), True)

    def linear(prefix: str, shape: tuple[int, int], layer: int, block: str, rows: Axis, cols: Axis,
               bias: bool, bias_invariant: bool = False) -> None:
        add(f"{prefix}.weight", shape, layer, block, (rows, cols))
        if bias:
            add(f"{prefix}.bias", (shape[0],), layer, block, (rows,), True, bias_invariant)

    emb = Axis("res:0", "write", "embed")
    if arch.stem == "image":
        C, p = arch.in_chans, arch.patch_size
        add("embed.patch.weight", (d, C, p, p), -1, "embed", (emb, None, None, None))
        if arch.patch_bias:
            add("embed.patch.bias", (d,), -1, "embed", (emb,), True)
        if arch.cls_token:
            add("embed.cls", (d,), -1, "embed", (emb,))
    else:
        add("embed.tokens", (V, d), -1, "embed", (Axis(None, "vocab"), emb))
    if arch.position == "learned":
        add("embed.pos", (arch.tokens, d), -1, "embed", (None, emb))
    if arch.ln_pre:
        norm("ln_pre", -1, "ln_pre", Axis("res:0", "norm", "res:0"))
    q_w, kv_w = arch.q_width, arch.kv_width
    for l in range(arch.layers):
        b, ri, ra, rm = f"blocks.{l}", res_in(l), f"res:{l}a", _res_after_mlp(arch, l)
        hs, ms = f"heads:{l}", f"mlp:{l}"
        norm(f"{b}.ln1", l, "ln1", Axis(ri, "norm", f"ln1:{l}"))
        reads = Axis(ri, "read", f"ln1:{l}")
        linear(f"{b}.attn.q", (q_w, d), l, "Q", Axis(hs, "q", f"q:{l}"), reads, arch.qkv_bias)
        # softmax ignores what a key bias adds to every logit of a query, unless rotary positions turn it
        # into a position-dependent term
        linear(f"{b}.attn.k", (kv_w, d), l, "K", Axis(hs, "k", f"k:{l}"), reads, arch.qkv_bias,
               bias_invariant=arch.position != "rope")
        linear(f"{b}.attn.v", (kv_w, d), l, "V", Axis(hs, "v", f"v:{l}"), reads, arch.qkv_bias)
        linear(f"{b}.attn.o", (d, q_w), l, "O", Axis(ra, "write", f"o:{l}", f"res:{l}a"),
               Axis(hs, "o", f"ctx:{l}"), arch.o_bias)
        norm(f"{b}.ln2", l, "ln2", Axis(ra, "norm", f"ln2:{l}"))
        reads = Axis(ra, "read", f"ln2:{l}")
        if arch.mlp == "gated":
            linear(f"{b}.mlp.gate", (m, d), l, "gate", Axis(ms, "gate", f"gate:{l}"), reads, arch.mlp_bias)
        linear(f"{b}.mlp.fc1", (m, d), l, "fc1", Axis(ms, "up", f"fc1:{l}"), reads, arch.mlp_bias)
        linear(f"{b}.mlp.fc2", (d, m), l, "fc2", Axis(rm, "write", f"fc2:{l}", f"res:{l}m"),
               Axis(ms, "down", f"act:{l}"), arch.mlp_bias)
    ro = res_out(arch)
    norm("ln_post", -1, "ln_post", Axis(ro, "norm", "ln_post"))
    if arch.output_dim:
        add("head.proj", (d, arch.output_dim), -1, "proj", (Axis(ro, "read", "ln_post"), Axis(None, "proj", "proj")))
    if arch.readout == "lm" and not arch.tied_embeddings:
        add("head.unembed", (V, d), -1, "unembed", (Axis(None, "vocab"), Axis(ro, "read", "ln_post")))
    return out


def canonical_shapes(arch: Arch) -> dict[str, tuple[int, ...]]:
    return {k: v.shape for k, v in param_axes(arch).items()}


def same_shapes(a: Arch, b: Arch) -> bool:
    """Both have the same canonical tensors with the same shapes (what TransFusion and GradFix need)."""
    return a == b or canonical_shapes(a) == canonical_shapes(b)


_SITE_LAYER = re.compile(r"[a-z0-9]+:(\d+)|res:(\d+)[am]")


def site_layer(site: str) -> int:
    """Block index of an activation site or space (-1 for ``embed``, ``res:0``, ``ln_post`` and ``proj``)."""
    m = _SITE_LAYER.fullmatch(site)
    if m is None or site == "res:0":
        return -1
    return int(m.group(1) or m.group(2))


def _names(names: list[str]) -> str:
    return ", ".join(names[:4]) + (f" (+{len(names) - 4} more)" if len(names) > 4 else "")


def check_params(params: dict[str, Tensor], arch: Arch, what: str) -> None:
    """Raise a one-line :class:`TransportError` on missing/unexpected tensors, wrong shapes or dtypes, NaN/Inf."""
    want = canonical_shapes(arch)
    missing = [k for k in want if k not in params]
    extra = [k for k in params if k not in want]
    if missing:
        raise TransportError(f"{what}: missing tensors for {arch.name}: {_names(missing)}")
    if extra:
        raise TransportError(f"{what}: unexpected tensors for {arch.name}: {_names(extra)}")
    streamed = isinstance(params, StreamedParams)  # shapes from the headers; values are checked as they are read
    for k, shape in want.items():
        got = params.shape(k) if streamed else tuple(params[k].shape)
        if got != shape:
            raise TransportError(f"{what}: shape mismatch for {k}: got {got}, "
                                 f"{arch.name} needs {shape}")
    if streamed:
        return
    for k in want:
        t = params[k]
        if not t.is_floating_point():
            raise TransportError(f"{what}: tensor {k} holds {str(t.dtype).replace('torch.', '')} values; "
                                 "weights must be floating point")
        if not all_finite(t):
            raise TransportError(f"{what}: tensor {k} contains NaN or Inf values")


__all__ = ["Axis", "ParamInfo", "BLOCKS", "param_axes", "canonical_shapes", "same_shapes", "check_params",
           "res_in", "res_out", "site_layer"]
