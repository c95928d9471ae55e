"""The open_clip text tower as a family: a CLIP model's ``token_embedding``, ``positional_embedding``,
``transformer.resblocks.*``, ``ln_final`` and ``text_projection``, in open_clip's own names (the names a full
CLIP state dict gives them, so a text task vector adds to that dict key by key).

The tower: learned positions over the whole context, causal pre-LN blocks (fused ``in_proj``), the final
LayerNorm, the end-of-text readout (the position of the largest token id: ``text.argmax(-1)``, as open_clip
pools) and ``x @ text_projection``; :func:`transport.core.forward.encode` with readout ``eot``.

References select the tower with a fragment: ``open_clip:ViT-B-32:TAG#text`` (``#visual``, the default, is the
image tower), ``--arch open_clip:ViT-B-32#text`` for a file that holds a CLIP state dict (found under any
prefix, e.g. open_clip's ``text.`` of a custom-text model or a training checkpoint's ``module.``).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from transport.core.arch import Arch
from transport.core.model import Model
from transport.errors import TransportError
from transport.families.base import HEAD_PREFIXES, Family
from transport.families.open_clip import build_clip, parse_ref, split_tower

Tensor = torch.Tensor

ANCHOR = "token_embedding.weight"
#: keys of a CLIP model that belong to neither tower's transported tensors
_OTHERS = ("logit_scale", "logit_bias", "attn_mask")
#: text-tower options the functional forward does not model
_UNSUPPORTED = ("hf_model_name", "ls_init_value", "embed_cls", "no_causal_mask", "final_ln_after_pool", "proj_bias",
                "qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc",
                "norm_kwargs", "act_kwargs")


class OpenClipTextFamily(Family):
    """open_clip's text tower (``CLIP`` keeps it at the top level, ``CustomTextCLIP`` under ``text.``)."""

    name = "open_clip_text"
    table_name = "open_clip_text"

    def tower_prefix(self, sd: Mapping[str, Tensor]) -> str:
        """The prefix under which ``sd`` holds the text tower: where ``token_embedding.weight`` is (the shortest)."""
        found = sorted((k[: -len(ANCHOR)] for k in sd if k.endswith(ANCHOR)
                        and (k == ANCHOR or k[: -len(ANCHOR)].endswith("."))), key=lambda p: (len(p), p))
        return found[0] if found else ""

    def tower(self, sd: Mapping[str, Tensor], arch: Arch) -> dict[str, Tensor]:
        p = self.tower_prefix(sd)
        out = {}
        for k in sd:
            if not k.startswith(p):
                continue
            rest = k[len(p):]
            if rest.startswith(("visual.", *HEAD_PREFIXES)) or rest in _OTHERS:
                continue
            out[rest] = sd[k]
        return out

    def file_tokenizer(self, arch: Arch, explicit: bool) -> Any:
        """open_clip's tokenizer of the model the architecture names (it ships inside open_clip)."""
        if not arch.name.startswith("open_clip:"):
            return None
        name = split_tower(arch.name)[0][len("open_clip:"):].split(":")[0]
        try:
            return text_tokenizer(name)
        except Exception:  # noqa: BLE001 - a name open_clip does not know (e.g. a tiny test config): no tokenizer
            return None

    def tiny_arch(self) -> Arch:
        return text_arch_from_cfg({"embed_dim": 16, "text_cfg": {"context_length": 12, "vocab_size": 64, "width": 32,
                                                                 "heads": 4, "layers": 2}}, "open_clip:tiny#text")

    def init_module(self, arch: Arch, seed: int = 0) -> torch.nn.Module:
        """A whole open_clip ``CLIP`` (a tiny image tower next to the text tower ``arch``): what ``encode_text`` runs."""
        from open_clip.model import CLIP

        text_cfg = {"context_length": arch.context, "vocab_size": arch.vocab_size, "width": arch.width,
                    "heads": arch.heads, "layers": arch.layers, "mlp_ratio": arch.mlp_width / arch.width}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return CLIP(embed_dim=arch.output_dim, quick_gelu=arch.act == "quick_gelu", text_cfg=text_cfg,
                        vision_cfg={"image_size": 8, "layers": 1, "width": 16, "patch_size": 4, "head_width": 8})

    def module_state(self, module: torch.nn.Module) -> dict[str, Tensor]:
        return self.tower(dict(module.state_dict()), None)  # type: ignore[arg-type]

    def module_forward(self, module: torch.nn.Module, inputs: Tensor) -> Tensor:
        with torch.no_grad():
            return module.encode_text(inputs)

    def example_inputs(self, arch: Arch, n: int = 3, seed: int = 0) -> Tensor:
        """Token ids over the whole context (open_clip adds every learned position)."""
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, arch.vocab_size, (n, arch.context), generator=g)


FAMILY = OpenClipTextFamily()


def text_arch_from_cfg(cfg: Mapping[str, Any], name: str, quick_gelu: Optional[bool] = None) -> Arch:
    """The text tower an open_clip model config describes (one error line for options it cannot model)."""
    t = dict(cfg.get("text_cfg") or {})
    bad = [k for k in _UNSUPPORTED if t.get(k) not in (None, False, {})]
    if t.get("pool_type", "argmax") != "argmax":
        bad.append(f"pool_type {t['pool_type']}")
    if t.get("proj_type", "linear") != "linear" or not cfg.get("embed_dim"):
        bad.append("no text projection")
    if t.get("block_type") not in (None, "default"):
        bad.append(f"block_type {t['block_type']}")
    if bad:
        raise TransportError(f"{name}: the text tower uses options not supported: {', '.join(bad)}")
    width = int(t.get("width", 512))
    quick = bool(cfg.get("quick_gelu", False)) if quick_gelu is None else quick_gelu
    return Arch(family=FAMILY.name, name=name, width=width, layers=int(t.get("layers", 12)),
                heads=int(t.get("heads", 8)), mlp_width=int(width * float(t.get("mlp_ratio", 4.0))),
                act="quick_gelu" if quick else "gelu", norm_eps=1e-5, position="learned", causal=True, stem="tokens",
                vocab_size=int(t.get("vocab_size", 49408)), context=int(t.get("context_length", 77)), ln_pre=False,
                cls_token=False, readout="eot", output_dim=int(cfg["embed_dim"]))


def open_clip_text_arch(model_name: str, quick_gelu: Optional[bool] = None) -> Arch:
    """The text tower of open_clip's model config ``model_name`` (``open_clip:NAME#text``)."""
    import open_clip

    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise TransportError(f"open_clip has no model config named '{model_name}'")
    return text_arch_from_cfg(cfg, f"open_clip:{model_name}#text", quick_gelu)


def text_tokenizer(model_name: str):
    """open_clip's own tokenizer for ``model_name`` when it ships inside open_clip (None when it would be
    downloaded: a Hugging Face tokenizer name in the config)."""
    import open_clip

    cfg = open_clip.get_model_config(model_name) or {}
    if (cfg.get("text_cfg") or {}).get("hf_tokenizer_name"):
        return None
    return open_clip.get_tokenizer(model_name)


def load_open_clip_text(ref: str, seed: int = 0) -> Model:
    """``open_clip:ARCH:TAG#text`` -> the text tower's Model (TAG 'none': random init seeded by ``seed``)."""
    base, tower = split_tower(ref)
    if tower != "text":
        raise TransportError(f"'{ref}' is not a text-tower reference (open_clip:ARCH:TAG#text)")
    arch_name, tag = parse_ref(base)
    open_clip_text_arch(arch_name)  # unsupported towers fail before any weights are read
    clip, cfg = build_clip(arch_name, tag, seed)
    arch = open_clip_text_arch(arch_name, quick_gelu=bool(cfg.get("quick_gelu")) or None)
    sd = {k: v.detach() for k, v in clip.state_dict().items()}
    params = {k: v.float().clone() for k, v in FAMILY.to_canonical(sd, arch, ref).items()}
    meta = {"family": FAMILY.name, "open_clip_model": arch_name, "pretrained": tag or "none"}
    if not tag:
        meta["seed"] = str(seed)
    return Model(arch, params, ref=ref, meta=meta, tokenizer=text_tokenizer(arch_name))


__all__ = ["FAMILY", "OpenClipTextFamily", "text_arch_from_cfg", "open_clip_text_arch", "text_tokenizer",
           "load_open_clip_text"]
