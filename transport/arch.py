"""Architecture as data.

Every supported family (open_clip ``VisionTransformer``, Hugging Face ``CLIPVisionModel`` and
``ViTModel``, and the demo zoo, which *is* open_clip with tiny configs) is translated by a small
adapter into ONE canonical parameter layout. Methods only ever see canonical names and the axis
table of :func:`param_axes`; they never read a family's own parameter names.

Canonical names (d = width, m = MLP width, T = tokens, e = output dim, C/p = channels/patch):

====================================  ===========  =============================================
name                                  shape        axes
====================================  ===========  =============================================
embed.patch.weight                    [d, C, p, p] (res:0, -, -, -)
embed.patch.bias (optional)           [d]          (res:0,)
embed.cls                             [d]          (res:0,)
embed.pos                             [T, d]       (-, res:0)
ln_pre.weight / .bias (optional)      [d]          (res:0,)
blocks.{l}.ln1.weight / .bias         [d]          (res:in(l),)
blocks.{l}.attn.{q,k,v}.weight        [d, d]       (heads:l, res:in(l))
blocks.{l}.attn.{q,k,v}.bias          [d]          (heads:l,)
blocks.{l}.attn.o.weight              [d, d]       (res:{l}a, heads:l)
blocks.{l}.attn.o.bias                [d]          (res:{l}a,)
blocks.{l}.ln2.weight / .bias         [d]          (res:{l}a,)
blocks.{l}.mlp.fc1.weight             [m, d]       (mlp:l, res:{l}a)
blocks.{l}.mlp.fc1.bias               [m]          (mlp:l,)
blocks.{l}.mlp.fc2.weight             [d, m]       (res:{l}m, mlp:l)
blocks.{l}.mlp.fc2.bias               [d]          (res:{l}m,)
ln_post.weight / .bias                [d]          (res:out,)
head.proj (optional)                  [d, e]       (res:out, -)   used as ``x @ proj``
====================================  ===========  =============================================

Residual spaces: ``res:0`` before block 0, ``res:{l}a`` after block l's attention, ``res:{l}m`` after
its MLP; ``res:in(l)`` is ``res:0`` for l = 0 else ``res:{l-1}m``; ``res:out`` is ``res:{L-1}m``.
``heads:l`` is the d-wide space of block l's concatenated heads (H heads of d_h dims).
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from transport.errors import TransportError

Tensor = torch.Tensor

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class ViTArch:
    """Shape and behaviour of one pre-LN vision transformer (everything the functional forward needs)."""

    family: str  # 'open_clip' | 'hf_clip' | 'hf_vit'
    name: str  # a reference-style name, e.g. 'open_clip:ViT-B-16', 'zoo:tiny', 'hf:google/vit-base-patch16-224'
    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp_width: int
    output_dim: int = 0  # 0: no final projection
    in_chans: int = 3
    act: str = "gelu"  # 'gelu' | 'quick_gelu' | 'gelu_tanh'
    ln_eps: float = 1e-5
    ln_pre: bool = True
    patch_bias: bool = False
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise TransportError(f"unknown model family '{self.family}' (known: {', '.join(FAMILIES)})")
        if self.width % self.heads:
            raise TransportError(f"{self.name}: width {self.width} is not divisible by {self.heads} heads")
        if self.image_size % self.patch_size:
            raise TransportError(f"{self.name}: image size {self.image_size} is not a multiple of patch {self.patch_size}")
        if self.act not in ACTIVATIONS:
            raise TransportError(f"{self.name}: unknown activation '{self.act}'")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens(self) -> int:
        return self.grid**2 + 1

    @property
    def feature_dim(self) -> int:
        return self.output_dim or self.width

    def same_shapes(self, other: "ViTArch") -> bool:
        """True when both have the same canonical tensors with the same shapes (TransFusion/GradFix need this)."""
        return canonical_shapes(self) == canonical_shapes(other)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ViTArch":
        try:
            d = json.loads(text)
            d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
            return cls(**d)
        except (ValueError, TypeError, KeyError) as e:
            raise TransportError(f"malformed architecture description: {e}") from None

    def with_name(self, name: str) -> "ViTArch":
        return dataclasses.replace(self, name=name)


ACTIVATIONS = ("gelu", "quick_gelu", "gelu_tanh")


# ----------------------------------------------------------------------------------------------
# canonical layout
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParamInfo:
    """Where a canonical tensor sits: its layer (-1 for embeddings / final), block label and axes."""

    name: str
    shape: tuple[int, ...]
    layer: int
    block: str  # 'Q','K','V','O','fc1','fc2','ln1','ln2','embed','ln_pre','ln_post','proj'
    axes: tuple[str | None, ...]
    is_bias: bool = False


def res_in(layer: int) -> str:
    return "res:0" if layer == 0 else f"res:{layer - 1}m"


def res_out(arch: ViTArch) -> str:
    return f"res:{arch.layers - 1}m"


def param_axes(arch: ViTArch) -> dict[str, ParamInfo]:
    """The canonical tensors of ``arch`` in a fixed order, with the space each axis lives in."""
    d, m, C, p = arch.width, arch.mlp_width, arch.in_chans, arch.patch_size
    out: dict[str, ParamInfo] = {}

    def add(name: str, shape: tuple[int, ...], layer: int, block: str, axes: tuple, is_bias: bool = False) -> None:
        out[name] = ParamInfo(name, tuple(shape), layer, block, tuple(axes), is_bias)

    add("embed.patch.weight", (d, C, p, p), -1, "embed", ("res:0", None, None, None))
    if arch.patch_bias:
        add("embed.patch.bias", (d,), -1, "embed", ("res:0",), True)
    add("embed.cls", (d,), -1, "embed", ("res:0",))
    add("embed.pos", (arch.tokens, d), -1, "embed", (None, "res:0"))
    if arch.ln_pre:
        add("ln_pre.weight", (d,), -1, "ln_pre", ("res:0",))
        add("ln_pre.bias", (d,), -1, "ln_pre", ("res:0",), True)
    for l in range(arch.layers):
        b, ri, ra, rm, hs, ms = f"blocks.{l}", res_in(l), f"res:{l}a", f"res:{l}m", f"heads:{l}", f"mlp:{l}"
        add(f"{b}.ln1.weight", (d,), l, "ln1", (ri,))
        add(f"{b}.ln1.bias", (d,), l, "ln1", (ri,), True)
        for x in "qkv":
            add(f"{b}.attn.{x}.weight", (d, d), l, x.upper(), (hs, ri))
            add(f"{b}.attn.{x}.bias", (d,), l, x.upper(), (hs,), True)
        add(f"{b}.attn.o.weight", (d, d), l, "O", (ra, hs))
        add(f"{b}.attn.o.bias", (d,), l, "O", (ra,), True)
        add(f"{b}.ln2.weight", (d,), l, "ln2", (ra,))
        add(f"{b}.ln2.bias", (d,), l, "ln2", (ra,), True)
        add(f"{b}.mlp.fc1.weight", (m, d), l, "fc1", (ms, ra))
        add(f"{b}.mlp.fc1.bias", (m,), l, "fc1", (ms,), True)
        add(f"{b}.mlp.fc2.weight", (d, m), l, "fc2", (rm, ms))
        add(f"{b}.mlp.fc2.bias", (d,), l, "fc2", (rm,), True)
    ro = res_out(arch)
    add("ln_post.weight", (d,), -1, "ln_post", (ro,))
    add("ln_post.bias", (d,), -1, "ln_post", (ro,), True)
    if arch.output_dim:
        add("head.proj", (d, arch.output_dim), -1, "proj", (ro, None))
    return out


def canonical_shapes(arch: ViTArch) -> dict[str, tuple[int, ...]]:
    return {k: v.shape for k, v in param_axes(arch).items()}


BLOCKS = ("Q", "K", "V", "O", "fc1", "fc2", "ln1", "ln2")


def check_params(params: dict[str, Tensor], arch: ViTArch, what: str) -> None:
    """Raise a one-line :class:`TransportError` on missing/unexpected tensors, wrong shapes, NaN/Inf."""
    want = canonical_shapes(arch)
    missing = [k for k in want if k not in params]
    extra = [k for k in params if k not in want]
    if missing:
        raise TransportError(f"{what}: missing tensors for {arch.name}: {', '.join(missing[:4])}"
                             + (f" (+{len(missing) - 4} more)" if len(missing) > 4 else ""))
    if extra:
        raise TransportError(f"{what}: unexpected tensors for {arch.name}: {', '.join(extra[:4])}"
                             + (f" (+{len(extra) - 4} more)" if len(extra) > 4 else ""))
    for k, shape in want.items():
        if tuple(params[k].shape) != shape:
            raise TransportError(f"{what}: shape mismatch for {k}: got {tuple(params[k].shape)}, "
                                 f"{arch.name} needs {shape}")
    for k in want:
        t = params[k]
        if not t.is_floating_point():
            raise TransportError(f"{what}: tensor {k} holds {str(t.dtype).replace('torch.', '')} values; "
                                 "weights must be floating point")
        if not torch.isfinite(t).all():
            raise TransportError(f"{what}: tensor {k} contains NaN or Inf values")


# ----------------------------------------------------------------------------------------------
# family adapters: family state dict (tower only, prefixes stripped) <-> canonical dict
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Entry:
    canon: str
    key: str
    how: str = "same"  # 'same' | 'fused:i' (row block i of 3) | 'unsqueeze1' ([d] <-> [1,1,d]) | 'unsqueeze0' | 'transpose'


@dataclass(frozen=True)
class Family:
    """Translates one family's parameter names to the canonical layout and back, bit for bit."""

    name: str
    table: Callable[[ViTArch], list[_Entry]]
    ignorable: tuple[str, ...] = ()  # family keys that are legitimately present but not part of the tower
    alias: Callable[[str], str] | None = None  # maps older spellings of a key to the current one

    def keys(self, arch: ViTArch) -> list[str]:
        return list(dict.fromkeys(e.key for e in self.table(arch)))

    def to_canonical(self, sd: dict[str, Tensor], arch: ViTArch, what: str = "checkpoint") -> dict[str, Tensor]:
        if self.alias is not None:
            sd = {self.alias(k): v for k, v in sd.items()}
        entries = self.table(arch)
        wanted = set(e.key for e in entries)
        missing = [k for k in dict.fromkeys(e.key for e in entries) if k not in sd]
        if missing:
            raise TransportError(f"{what}: missing keys for {arch.name}: {', '.join(missing[:4])}"
                                 + (f" (+{len(missing) - 4} more)" if len(missing) > 4 else ""))
        extra = [k for k in sd if k not in wanted and not any(k.startswith(p) for p in self.ignorable)]
        if extra:
            raise TransportError(f"{what}: unexpected keys for {arch.name}: {', '.join(extra[:4])}"
                                 + (f" (+{len(extra) - 4} more)" if len(extra) > 4 else ""))
        out: dict[str, Tensor] = {}
        d = arch.width
        for e in entries:
            t = sd[e.key]
            if e.how.startswith("fused:"):
                i = int(e.how.split(":")[1])
                if t.shape[0] != 3 * d:
                    raise TransportError(f"{what}: shape mismatch for {e.key}: got {tuple(t.shape)}, "
                                         f"{arch.name} needs first dim {3 * d}")
                t = t[i * d:(i + 1) * d]
            elif e.how == "unsqueeze1":
                t = t.reshape(t.shape[-1]) if t.dim() == 3 and t.shape[:2] == (1, 1) else t
            elif e.how == "unsqueeze0":
                t = t[0] if t.dim() == 3 and t.shape[0] == 1 else t
            elif e.how == "transpose":
                t = t.t()
            out[e.canon] = t.contiguous()
        check_params(out, arch, what)
        return out

    def from_canonical(self, params: dict[str, Tensor], arch: ViTArch,
                       only: set[str] | None = None) -> dict[str, Tensor]:
        """Family-named tensors. ``only`` limits the output to family keys built from those canonical names."""
        entries = self.table(arch)
        out: dict[str, Tensor] = {}
        fused: dict[str, list[Tensor | None]] = {}
        for e in entries:
            if e.canon not in params:
                continue
            t = params[e.canon]
            if e.how.startswith("fused:"):
                fused.setdefault(e.key, [None, None, None])[int(e.how.split(":")[1])] = t
                continue
            if e.how == "unsqueeze1":
                t = t.reshape(1, 1, -1)
            elif e.how == "unsqueeze0":
                t = t.unsqueeze(0)
            elif e.how == "transpose":
                t = t.t()
            out[e.key] = t.contiguous()
        for key, parts in fused.items():
            if any(p is None for p in parts):
                raise TransportError(f"cannot re-fuse {key}: q, k and v must all be present")
            out[key] = torch.cat(parts, 0)  # type: ignore[arg-type]
        return out


def _open_clip_table(arch: ViTArch) -> list[_Entry]:
    E = _Entry
    t = [E("embed.patch.weight", "conv1.weight"), E("embed.cls", "class_embedding"),
         E("embed.pos", "positional_embedding")]
    if arch.patch_bias:
        t.append(E("embed.patch.bias", "conv1.bias"))
    if arch.ln_pre:
        t += [E("ln_pre.weight", "ln_pre.weight"), E("ln_pre.bias", "ln_pre.bias")]
    for l in range(arch.layers):
        c, f = f"blocks.{l}", f"transformer.resblocks.{l}"
        t += [E(f"{c}.ln1.weight", f"{f}.ln_1.weight"), E(f"{c}.ln1.bias", f"{f}.ln_1.bias")]
        for i, x in enumerate("qkv"):
            t += [E(f"{c}.attn.{x}.weight", f"{f}.attn.in_proj_weight", f"fused:{i}"),
                  E(f"{c}.attn.{x}.bias", f"{f}.attn.in_proj_bias", f"fused:{i}")]
        t += [E(f"{c}.attn.o.weight", f"{f}.attn.out_proj.weight"), E(f"{c}.attn.o.bias", f"{f}.attn.out_proj.bias"),
              E(f"{c}.ln2.weight", f"{f}.ln_2.weight"), E(f"{c}.ln2.bias", f"{f}.ln_2.bias"),
              E(f"{c}.mlp.fc1.weight", f"{f}.mlp.c_fc.weight"), E(f"{c}.mlp.fc1.bias", f"{f}.mlp.c_fc.bias"),
              E(f"{c}.mlp.fc2.weight", f"{f}.mlp.c_proj.weight"), E(f"{c}.mlp.fc2.bias", f"{f}.mlp.c_proj.bias")]
    t += [E("ln_post.weight", "ln_post.weight"), E("ln_post.bias", "ln_post.bias")]
    if arch.output_dim:
        t.append(E("head.proj", "proj"))
    return t


def _hf_clip_table(arch: ViTArch) -> list[_Entry]:
    E, v = _Entry, "vision_model."
    t = [E("embed.patch.weight", v + "embeddings.patch_embedding.weight"),
         E("embed.cls", v + "embeddings.class_embedding"),
         E("embed.pos", v + "embeddings.position_embedding.weight"),
         E("ln_pre.weight", v + "pre_layrnorm.weight"), E("ln_pre.bias", v + "pre_layrnorm.bias")]
    if arch.patch_bias:
        t.append(E("embed.patch.bias", v + "embeddings.patch_embedding.bias"))
    for l in range(arch.layers):
        c, f = f"blocks.{l}", f"{v}encoder.layers.{l}"
        t += [E(f"{c}.ln1.weight", f"{f}.layer_norm1.weight"), E(f"{c}.ln1.bias", f"{f}.layer_norm1.bias")]
        for x in "qkv":
            t += [E(f"{c}.attn.{x}.weight", f"{f}.self_attn.{x}_proj.weight"),
                  E(f"{c}.attn.{x}.bias", f"{f}.self_attn.{x}_proj.bias")]
        t += [E(f"{c}.attn.o.weight", f"{f}.self_attn.out_proj.weight"),
              E(f"{c}.attn.o.bias", f"{f}.self_attn.out_proj.bias"),
              E(f"{c}.ln2.weight", f"{f}.layer_norm2.weight"), E(f"{c}.ln2.bias", f"{f}.layer_norm2.bias"),
              E(f"{c}.mlp.fc1.weight", f"{f}.mlp.fc1.weight"), E(f"{c}.mlp.fc1.bias", f"{f}.mlp.fc1.bias"),
              E(f"{c}.mlp.fc2.weight", f"{f}.mlp.fc2.weight"), E(f"{c}.mlp.fc2.bias", f"{f}.mlp.fc2.bias")]
    t += [E("ln_post.weight", v + "post_layernorm.weight"), E("ln_post.bias", v + "post_layernorm.bias")]
    if arch.output_dim:
        t.append(E("head.proj", "visual_projection.weight", "transpose"))
    return t


def _hf_vit_table(arch: ViTArch) -> list[_Entry]:
    E = _Entry
    t = [E("embed.patch.weight", "embeddings.patch_embeddings.projection.weight"),
         E("embed.patch.bias", "embeddings.patch_embeddings.projection.bias"),
         E("embed.cls", "embeddings.cls_token", "unsqueeze1"),
         E("embed.pos", "embeddings.position_embeddings", "unsqueeze0")]
    for l in range(arch.layers):
        c, f = f"blocks.{l}", f"layers.{l}"
        t += [E(f"{c}.ln1.weight", f"{f}.layernorm_before.weight"), E(f"{c}.ln1.bias", f"{f}.layernorm_before.bias")]
        for x in "qkvo":
            t += [E(f"{c}.attn.{x}.weight", f"{f}.attention.{x}_proj.weight"),
                  E(f"{c}.attn.{x}.bias", f"{f}.attention.{x}_proj.bias")]
        t += [E(f"{c}.ln2.weight", f"{f}.layernorm_after.weight"), E(f"{c}.ln2.bias", f"{f}.layernorm_after.bias"),
              E(f"{c}.mlp.fc1.weight", f"{f}.mlp.fc1.weight"), E(f"{c}.mlp.fc1.bias", f"{f}.mlp.fc1.bias"),
              E(f"{c}.mlp.fc2.weight", f"{f}.mlp.fc2.weight"), E(f"{c}.mlp.fc2.bias", f"{f}.mlp.fc2.bias")]
    t += [E("ln_post.weight", "layernorm.weight"), E("ln_post.bias", "layernorm.bias")]
    return t


# transformers < 5 (and most hub checkpoints) name ViT tensors the long way; read both.
_HF_VIT_LEGACY = (
    (re.compile(r"^encoder\.layer\.(\d+)\.attention\.attention\.query\."), r"layers.\1.attention.q_proj."),
    (re.compile(r"^encoder\.layer\.(\d+)\.attention\.attention\.key\."), r"layers.\1.attention.k_proj."),
    (re.compile(r"^encoder\.layer\.(\d+)\.attention\.attention\.value\."), r"layers.\1.attention.v_proj."),
    (re.compile(r"^encoder\.layer\.(\d+)\.attention\.output\.dense\."), r"layers.\1.attention.o_proj."),
    (re.compile(r"^encoder\.layer\.(\d+)\.intermediate\.dense\."), r"layers.\1.mlp.fc1."),
    (re.compile(r"^encoder\.layer\.(\d+)\.output\.dense\."), r"layers.\1.mlp.fc2."),
    (re.compile(r"^encoder\.layer\.(\d+)\.layernorm_"), r"layers.\1.layernorm_"),
)


def _hf_vit_alias(key: str) -> str:
    for pat, rep in _HF_VIT_LEGACY:
        key, n = pat.subn(rep, key)
        if n:
            break
    return key


FAMILIES: dict[str, Family] = {
    "open_clip": Family("open_clip", _open_clip_table),
    "hf_clip": Family("hf_clip", _hf_clip_table, ignorable=("vision_model.embeddings.position_ids",)),
    "hf_vit": Family("hf_vit", _hf_vit_table, ignorable=("pooler.",), alias=_hf_vit_alias),
}


def family(arch: ViTArch) -> Family:
    return FAMILIES[arch.family]


def to_canonical(sd: dict[str, Tensor], arch: ViTArch, what: str = "checkpoint") -> dict[str, Tensor]:
    """Family-named tower state dict -> canonical float tensors (validated: keys, shapes, NaN/Inf)."""
    return family(arch).to_canonical(sd, arch, what)


def from_canonical(params: dict[str, Tensor], arch: ViTArch, only: set[str] | None = None) -> dict[str, Tensor]:
    """Canonical tensors -> the family's own names and shapes (open_clip q/k/v re-fused into in_proj)."""
    return family(arch).from_canonical(params, arch, only)


def iter_layers(arch: ViTArch) -> Iterator[int]:
    return iter(range(arch.layers))


# ----------------------------------------------------------------------------------------------
# named architectures
# ----------------------------------------------------------------------------------------------
def open_clip_arch(model_name: str) -> ViTArch:
    """The visual tower of an open_clip model config (any ViT: B-32, B-16, L-14, B-16-plus-240, -quickgelu)."""
    import open_clip

    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise TransportError(f"open_clip has no model config named '{model_name}'")
    v = cfg.get("vision_cfg", {})
    if v.get("timm_model_name") or "layers" not in v or isinstance(v.get("layers"), (list, tuple)):
        raise TransportError(f"open_clip:{model_name} is not a plain ViT (only VisionTransformer towers are supported)")
    unsupported = [k for k in ("ls_init_value", "attentional_pool", "no_ln_pre", "qk_norm", "block_type")
                   if v.get(k) not in (None, False)]
    if v.get("pool_type", "tok") != "tok" or v.get("final_ln_after_pool") or unsupported:
        raise TransportError(f"open_clip:{model_name} uses tower options not supported yet: "
                             f"{', '.join(unsupported) or 'pool_type ' + str(v.get('pool_type'))}")
    width = int(v.get("width", 768))
    head_width = int(v.get("head_width", 64))
    image_size = v.get("image_size", 224)
    image_size = image_size[0] if isinstance(image_size, (list, tuple)) else image_size
    return ViTArch(
        family="open_clip", name=f"open_clip:{model_name}", image_size=int(image_size),
        patch_size=int(v.get("patch_size", 16)), width=width, layers=int(v["layers"]), heads=width // head_width,
        mlp_width=int(width * float(v.get("mlp_ratio", 4.0))), output_dim=int(cfg.get("embed_dim", 512)),
        act="quick_gelu" if cfg.get("quick_gelu") else "gelu",
    )


def tiny_arch(width: int = 64, layers: int = 3, heads: int = 4, mlp_ratio: float = 4.0, image_size: int = 8,
              patch_size: int = 2, output_dim: int = 32, act: str = "gelu", name: str | None = None) -> ViTArch:
    """A tiny open_clip VisionTransformer config (what the demo zoo and the tests use)."""
    return ViTArch(family="open_clip", name=name or f"zoo:vit-w{width}-l{layers}-h{heads}", image_size=image_size,
                   patch_size=patch_size, width=width, layers=layers, heads=heads,
                   mlp_width=int(width * mlp_ratio), output_dim=output_dim, act=act,
                   mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def build_open_clip_tower(arch: ViTArch):
    """A real ``open_clip.transformer.VisionTransformer`` module for ``arch`` (random init)."""
    from open_clip.transformer import QuickGELU, VisionTransformer

    if arch.family != "open_clip":
        raise TransportError(f"{arch.name} is not an open_clip architecture")
    act = QuickGELU if arch.act == "quick_gelu" else torch.nn.GELU
    return VisionTransformer(image_size=arch.image_size, patch_size=arch.patch_size, width=arch.width,
                             layers=arch.layers, heads=arch.heads, mlp_ratio=arch.mlp_width / arch.width,
                             output_dim=arch.output_dim or None, act_layer=act)


__all__ = [
    "ViTArch", "ParamInfo", "Family", "FAMILIES", "BLOCKS", "param_axes", "canonical_shapes", "check_params",
    "to_canonical", "from_canonical", "open_clip_arch", "tiny_arch", "build_open_clip_tower", "res_in", "res_out",
]
