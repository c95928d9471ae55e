"""Architecture as data: one pre-norm transformer description with switches.

An :class:`Arch` says everything the functional forward and the axis table need: sizes (width,
layers, heads, key/value heads, head width, MLP width) and switches (plain or gated MLP, activation,
LayerNorm or RMSNorm, which biases exist, learned / rotary / no positions, causal attention, an
image or a token stem, the readout, tied embeddings). ``family`` names the adapter that translates a
family's own parameter names (:mod:`transport.families`); the core never reads it.

Older releases stored a vision-only ``ViTArch`` as JSON; :meth:`Arch.from_json` reads it unchanged.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from transport.errors import TransportError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_HALF = (0.5, 0.5, 0.5)

ACTIVATIONS = ("gelu", "quick_gelu", "gelu_tanh", "silu", "relu")
MLPS = ("plain", "gated")
NORMS = ("layer", "rms")
POSITIONS = ("learned", "rope", "none")
STEMS = ("image", "tokens")
READOUTS = ("cls", "mean", "last", "eot", "lm")

# fields of the vision-only description of older releases that were renamed
_LEGACY = {"ln_eps": "norm_eps"}


@dataclass(frozen=True)
class Arch:
    """Shape and behaviour of one pre-norm transformer tower (see the module docstring)."""

    family: str  # the adapter that reads and writes this model's own parameter names
    name: str  # a reference-style name (what messages call the model)
    width: int
    layers: int
    heads: int
    mlp_width: int
    kv_heads: int = 0  # key/value heads (grouped-query attention); 0 on input: as many as query heads
    head_dim: int = 0  # 0 on input: width // heads
    mlp: str = "plain"  # 'plain': fc2(act(fc1 x)); 'gated': fc2(act(gate x) * fc1 x)
    act: str = "gelu"
    norm: str = "layer"  # 'layer' (LayerNorm) | 'rms' (RMSNorm)
    norm_eps: float = 1e-5
    norm_bias: bool = True  # LayerNorms carry a bias
    qkv_bias: bool = True
    o_bias: bool = True
    mlp_bias: bool = True
    position: str = "learned"  # 'learned' | 'rope' (rotate-half convention) | 'none'
    rope_theta: float = 10000.0
    causal: bool = False
    window: int = 0  # sliding-window attention span (0: none); longer sequences are refused, not approximated
    stem: str = "image"
    # image stem
    image_size: int = 0
    patch_size: int = 0
    in_chans: int = 3
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    cls_token: bool = True
    patch_bias: bool = False
    ln_pre: bool = True
    # token stem
    vocab_size: int = 0
    context: int = 0
    # output
    readout: str = "cls"  # 'cls' | 'mean' | 'last' | 'eot' (pooled features) | 'lm' (per-token logits)
    output_dim: int = 0  # 0: no final projection
    tied_embeddings: bool = False  # the unembedding is the token embedding (one tensor, two roles)

    def __post_init__(self) -> None:
        if self.heads >= 1 and not self.kv_heads:
            object.__setattr__(self, "kv_heads", self.heads)
        if self.heads >= 1 and not self.head_dim:
            if self.width % self.heads:
                raise TransportError(f"{self.name}: width {self.width} is not divisible by {self.heads} heads")
            object.__setattr__(self, "head_dim", self.width // self.heads)
        for field_, value, allowed in (("act", self.act, ACTIVATIONS), ("mlp", self.mlp, MLPS),
                                       ("norm", self.norm, NORMS), ("position", self.position, POSITIONS),
                                       ("stem", self.stem, STEMS), ("readout", self.readout, READOUTS)):
            if value not in allowed:
                raise TransportError(f"{self.name}: unknown {field_} '{value}' (known: {', '.join(allowed)})")
        if min(self.width, self.layers, self.heads, self.mlp_width) < 1:
            raise TransportError(f"{self.name}: width, layers, heads and MLP width must be positive")
        if self.heads % self.kv_heads:
            raise TransportError(f"{self.name}: {self.heads} query heads do not split into {self.kv_heads} "
                                 "key/value groups")
        if self.position == "rope" and self.head_dim % 2:
            raise TransportError(f"{self.name}: rotary positions need an even head width, got {self.head_dim}")
        if self.stem == "image":
            if self.image_size < 1 or self.patch_size < 1 or self.image_size % self.patch_size:
                raise TransportError(f"{self.name}: image size {self.image_size} is not a multiple of patch "
                                     f"{self.patch_size}")
        elif self.vocab_size < 1:
            raise TransportError(f"{self.name}: a token stem needs a vocabulary size")
        if self.tied_embeddings and (self.stem != "tokens" or self.readout != "lm"):
            raise TransportError(f"{self.name}: tied embeddings need a token stem and an 'lm' readout")

    # -- derived sizes -------------------------------------------------------------------------
    @property
    def group_size(self) -> int:
        """Query heads per key/value head."""
        return self.heads // self.kv_heads

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size if self.stem == "image" else 0

    @property
    def tokens(self) -> int:
        """Sequence length the learned positions cover (image: patches plus the class token)."""
        if self.stem == "image":
            return self.grid ** 2 + int(self.cls_token)
        return self.context

    @property
    def feature_dim(self) -> int:
        return self.output_dim or self.width

    # -- identity ------------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | dict) -> "Arch":
        """Read :meth:`to_json` output, or the vision-only description older releases wrote."""
        try:
            d: dict[str, Any] = dict(json.loads(text) if isinstance(text, str) else text)
            for old, new in _LEGACY.items():
                if old in d:
                    d[new] = d.pop(old)
            unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
            if unknown:
                raise ValueError(f"unknown field(s) {', '.join(unknown)}")
            for k in ("mean", "std"):
                if k in d:
                    d[k] = tuple(d[k])
            return cls(**d)
        except (ValueError, TypeError, KeyError) as e:
            raise TransportError(f"malformed architecture description: {e}") from None

    def with_name(self, name: str) -> "Arch":
        return dataclasses.replace(self, name=name)

    def replace(self, **changes: Any) -> "Arch":
        """``dataclasses.replace`` that re-derives key/value heads and head width from new heads or width
        (unless given) when they had their derived values before."""
        if "heads" in changes or "width" in changes:
            if "kv_heads" not in changes and self.kv_heads == self.heads:
                changes["kv_heads"] = 0
            if "head_dim" not in changes and self.head_dim * self.heads == self.width:
                changes["head_dim"] = 0
        return dataclasses.replace(self, **changes)

    def differences(self, other: "Arch", ignore: tuple[str, ...] = ("name",)) -> list[str]:
        """``'field: mine vs theirs'`` for every field that differs (for messages that say what differs)."""
        out = []
        for f in dataclasses.fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if f.name not in ignore and a != b:
                out.append(f"{f.name} {a} vs {b}")
        return out


__all__ = ["Arch", "ACTIVATIONS", "MLPS", "NORMS", "POSITIONS", "STEMS", "READOUTS", "CLIP_MEAN", "CLIP_STD",
           "IMAGENET_HALF"]
