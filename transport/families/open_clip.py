"""The open_clip family: ``open_clip:ARCH:TAG`` references, open_clip ViT configs, the visual tower's names.

TAG ``none`` (or empty) builds a seeded random init, which is what the tests use. A pretrained TAG is
loaded from the local cache when it is there; otherwise the network is probed with a short timeout
first, so an offline machine gets a one-line :class:`TransportError` instead of a hang. The demo zoo's
models are open_clip towers of tiny configurations (:func:`tiny_arch`).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import torch

from transport import hub
from transport.core.arch import Arch
from transport.core.heads import PROMPT_TEMPLATES, Classifier, ZeroShotHeads, zero_shot_classifier
from transport.core.model import Model
from transport.errors import TransportError
from transport.files import LazyWeights
from transport.families.base import HEAD_PREFIXES, Family

Tensor = torch.Tensor


#: keys only an open_clip image tower has (its text tower has transformer blocks too, but none of these)
_ANCHORS = ("conv1.weight", "class_embedding", "ln_pre.weight", "ln_post.weight")


class OpenClipFamily(Family):
    """open_clip ``VisionTransformer`` towers (``model.visual``), found under any prefix: a full CLIP state dict
    (``visual.``) or a WiSE-FT / task_vectors ImageClassifier (``image_encoder.model.visual.``) gives its tower."""

    name = "open_clip"
    table_name = "open_clip_vit"

    def tower_prefix(self, sd: Mapping[str, Tensor], arch: Arch) -> str:
        """The prefix under which ``sd`` holds the image tower ('' at the top level): the one holding most keys."""
        keys = self.table.keys(arch)
        found = {k[: -len(a)] for k in sd for a in _ANCHORS if k.endswith(a)}
        found = {p for p in found if p == "" or p.endswith(".")}
        if not found:  # e.g. a task vector of the transformer blocks only: the tower sits under some '...visual.'
            found = {k[: k.index("visual.") + len("visual.")] for k in sd if "visual." in k}
        if not found:
            return ""
        return max(sorted(found), key=lambda p: (sum(1 for k in keys if p + k in sd), -len(p)))

    def tower(self, sd: Mapping[str, Tensor], arch: Arch) -> dict[str, Tensor]:
        p = self.tower_prefix(sd, arch)
        if p:
            if isinstance(sd, LazyWeights):  # nothing read: the tower's tensors under their own names
                return sd.subset(lambda k: k.startswith(p)).renamed(lambda k: k[len(p):])
            return {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}
        return super().tower(sd, arch)

    def checkpoint_names(self, tensors: Mapping[str, Tensor], meta: Mapping[str, str],
                         full_model: bool = False) -> tuple[dict[str, Tensor], str]:
        if full_model:
            return ({f"visual.{k}": v for k, v in tensors.items()},
                    "full open_clip CLIP model names (visual.*: model.load_state_dict)")
        return dict(tensors), "open_clip image-tower names (model.visual.load_state_dict)"

    def text_state(self, sd: Mapping[str, Tensor], arch: Arch) -> dict[str, Tensor]:
        """The text tower next to the image tower (``token_embedding.weight``, ``transformer.*``, ``ln_final.*``,
        ``text_projection``, ``logit_scale``) in open_clip's CLIP names; {} when absent."""
        p = self.tower_prefix(sd, arch)
        if not p.endswith("visual."):
            return {}
        base = p[: -len("visual.")]
        text = {k[len(base):]: sd[k] for k in sd if k.startswith(base) and not k.startswith(p)  # only these read
                and not k[len(base):].startswith(HEAD_PREFIXES)}
        return text if "token_embedding.weight" in text else {}

    def file_zero_shot(self, sd: Mapping[str, Tensor], arch: Arch, what: str):
        """Zero-shot heads from a checkpoint file's own text tower (None without one or a known open_clip config)."""
        text = self.text_state(sd, arch)
        if not text or not arch.name.startswith("open_clip:"):
            return None
        return text_tower_zero_shot(arch.name[len("open_clip:"):], arch.act == "quick_gelu", text, what)

    def tiny_arch(self) -> Arch:
        return tiny_arch(width=32, layers=2, heads=4, image_size=8, patch_size=2, output_dim=16)

    def init_module(self, arch: Arch, seed: int = 0) -> torch.nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build_open_clip_tower(arch)

    def module_forward(self, module: torch.nn.Module, inputs: Tensor) -> Tensor:
        with torch.no_grad():
            return module(inputs)


FAMILY = OpenClipFamily()


def open_clip_arch(model_name: str) -> Arch:
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
    return Arch(
        family="open_clip", name=f"open_clip:{model_name}", image_size=int(image_size),
        patch_size=int(v.get("patch_size", 16)), width=width, layers=int(v["layers"]), heads=width // head_width,
        mlp_width=int(width * float(v.get("mlp_ratio", 4.0))), output_dim=int(cfg.get("embed_dim", 512)),
        act="quick_gelu" if cfg.get("quick_gelu") else "gelu",
    )


def tiny_arch(width: int = 64, layers: int = 3, heads: int = 4, mlp_ratio: float = 4.0, image_size: int = 8,
              patch_size: int = 2, output_dim: int = 32, act: str = "gelu", name: str | None = None) -> Arch:
    """A tiny open_clip VisionTransformer config (what the demo zoo and the tests use)."""
    return Arch(family="open_clip", name=name or f"zoo:vit-w{width}-l{layers}-h{heads}", image_size=image_size,
                   patch_size=patch_size, width=width, layers=layers, heads=heads,
                   mlp_width=int(width * mlp_ratio), output_dim=output_dim, act=act,
                   mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def build_open_clip_tower(arch: Arch):
    """A real ``open_clip.transformer.VisionTransformer`` module for ``arch`` (random init)."""
    from open_clip.transformer import QuickGELU, VisionTransformer

    if arch.family != "open_clip":
        raise TransportError(f"{arch.name} is not an open_clip architecture")
    act = QuickGELU if arch.act == "quick_gelu" else torch.nn.GELU
    return VisionTransformer(image_size=arch.image_size, patch_size=arch.patch_size, width=arch.width,
                             layers=arch.layers, heads=arch.heads, mlp_ratio=arch.mlp_width / arch.width,
                             output_dim=arch.output_dim or None, act_layer=act)


RANDOM_TAGS = ("", "none", "random")


TOWERS = ("visual", "text")


def split_tower(ref: str) -> tuple[str, str]:
    """``open_clip:ARCH[:TAG][#TOWER]`` -> (the reference without the fragment, TOWER): ``visual`` (the default)
    or ``text``."""
    base, sep, tower = ref.partition("#")
    tower = tower.strip() if sep else "visual"
    if tower not in TOWERS:
        raise TransportError(f"'{ref}': unknown tower '#{tower}' (use #visual, the default, or #text)")
    return base, tower


def parse_ref(ref: str) -> tuple[str, str]:
    """``open_clip:ARCH[:TAG][#TOWER]`` -> (ARCH, TAG); TAG '' for random init."""
    if not ref.startswith("open_clip:"):
        raise TransportError(f"'{ref}' is not an open_clip reference (open_clip:ARCH:TAG)")
    ref = split_tower(ref)[0]
    parts = ref[len("open_clip:"):].split(":")
    if not parts[0] or len(parts) > 2:
        raise TransportError(f"'{ref}': expected open_clip:ARCH:TAG, e.g. open_clip:ViT-B-16:laion2b_s34b_b88k "
                             "(TAG 'none' for random init)")
    tag = parts[1].strip() if len(parts) == 2 else ""
    return parts[0], ("" if tag.lower() in RANDOM_TAGS else tag)


def available_tags(arch_name: str) -> list[str]:
    """The pretrained tags open_clip knows for ``arch_name`` (from its own registry)."""
    import open_clip

    return list(open_clip.list_pretrained_tags_by_model(arch_name))


# ----------------------------------------------------------------------------------------------
# finding pretrained weights without hanging
# ----------------------------------------------------------------------------------------------
def _cached_checkpoint(cfg: dict) -> Optional[str]:
    """Local path of a pretrained tag's weights if they are already cached, else None (no network)."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    if cfg.get("file"):
        return cfg["file"] if os.path.isfile(cfg["file"]) else None
    hub_path = cfg.get("hf_hub", "")
    if hub_path:
        from huggingface_hub import try_to_load_from_cache

        # open_clip's convention: 'org/repo/' means its default file, 'org/repo/file.bin' that file.
        repo_id, filename = os.path.split(hub_path)
        filename = filename or HF_WEIGHTS_NAME
        names = [filename]
        if filename == HF_WEIGHTS_NAME:
            names.insert(0, HF_SAFE_WEIGHTS_NAME)
        elif filename.endswith((".bin", ".pth")):
            names.insert(0, filename[:-4] + ".safetensors")
        for name in names:
            hit = try_to_load_from_cache(repo_id, name, cache_dir=hub.hf_cache_dir())
            if isinstance(hit, str) and os.path.isfile(hit):
                return hit
    url = cfg.get("url", "")
    if url:
        path = Path("~/.cache/clip").expanduser() / os.path.basename(url)
        if path.is_file():
            return str(path)
    return None


def _download_host(cfg: dict) -> str:
    from urllib.parse import urlparse

    if cfg.get("hf_hub"):
        return hub.hub_host()
    return urlparse(cfg.get("url", "")).hostname or "huggingface.co"


def resolve_pretrained(arch_name: str, tag: str) -> str:
    """A local checkpoint path for ``arch_name:tag``: the cache, or a download when the network answers."""
    from open_clip.pretrained import download_pretrained, get_pretrained_cfg

    tags = available_tags(arch_name)
    cfg = get_pretrained_cfg(arch_name, tag)
    if not cfg:
        raise TransportError(f"open_clip has no pretrained tag '{tag}' for {arch_name} "
                             f"(known: {', '.join(tags) or 'none'}; use 'none' for random init)")
    hit = _cached_checkpoint(cfg)
    if hit is not None:
        return hit
    host = _download_host(cfg)
    if hub.offline_mode() or not hub.network_reachable(host):
        raise TransportError(f"weights for {arch_name}:{tag} are not in the local cache and the network is "
                             f"unreachable ({host}); download them once on a connected machine")
    try:
        return download_pretrained(cfg)
    except Exception as e:  # noqa: BLE001 - any download failure is reported as one line
        raise TransportError(f"could not download weights for {arch_name}:{tag}: {type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}") from None


# ----------------------------------------------------------------------------------------------
# building the model
# ----------------------------------------------------------------------------------------------
def build_clip(arch_name: str, tag: str = "", seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """The real open_clip model (eval mode, float32) and the pretrained tag's config ({} for a random init).

    Random init (``tag`` '') is seeded and leaves the global RNG untouched; a tag trained with QuickGELU runs
    with it, whatever the config name says."""
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg

    if not tag:
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)  # open_clip warns that a random init has no pretrained weights
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                clip = open_clip.create_model(arch_name, pretrained=None)
        finally:
            logging.disable(previous)
        return clip.float().eval(), {}
    path = resolve_pretrained(arch_name, tag)
    cfg = get_pretrained_cfg(arch_name, tag)
    try:
        clip = open_clip.create_model(arch_name, pretrained=path, force_quick_gelu=bool(cfg.get("quick_gelu", False)))
    except Exception as e:  # noqa: BLE001 - a broken cached file is the file's problem
        raise TransportError(f"{path}: could not load open_clip weights for {arch_name}:{tag}: "
                             f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return clip.float().eval(), dict(cfg)


def create_open_clip(arch_name: str, tag: str = "", seed: int = 0) -> tuple[torch.nn.Module, Arch]:
    """The real open_clip CLIP module (eval mode, float32) and the :class:`~transport.core.arch.Arch` of its visual tower.

    Random init (``tag`` '') is seeded and leaves the global RNG untouched.
    """
    arch = open_clip_arch(arch_name)
    clip, cfg = build_clip(arch_name, tag, seed)
    if cfg.get("quick_gelu") and arch.act != "quick_gelu":
        arch = dataclasses.replace(arch, act="quick_gelu")
    if cfg.get("mean") and cfg.get("std"):
        arch = dataclasses.replace(arch, mean=tuple(float(x) for x in cfg["mean"]),
                                   std=tuple(float(x) for x in cfg["std"]))
    return clip, arch


def zero_shot_head(clip: torch.nn.Module, tokenizer: Callable, classnames: Sequence[str],
                   templates: Optional[Sequence[str]] = None, batch_size: int = 256) -> Classifier:
    """CLIP zero-shot head from the model's own text tower (see :func:`transport.core.heads.zero_shot_classifier`)."""
    return zero_shot_classifier(lambda texts: clip.encode_text(tokenizer(texts)), classnames,
                                float(clip.logit_scale.detach().exp()), templates, batch_size)


def model_from_open_clip(clip: torch.nn.Module, arch: Arch, ref: str, meta: Optional[dict] = None,
                         tokenizer: Optional[Callable] = None) -> Model:
    """Canonical visual tower of an open_clip CLIP module; ``zero_shot`` uses its text tower."""
    sd = {k: v.detach() for k, v in clip.visual.state_dict().items()}
    params = {k: v.float().clone() for k, v in FAMILY.table.to_canonical(sd, arch, what=ref).items()}
    # The text tower is all the zero-shot head needs; drop the visual tower's memory.
    clip.visual = torch.nn.Identity()
    zero_shot = None
    if tokenizer is not None:
        zero_shot = ZeroShotHeads(lambda classnames: zero_shot_head(clip, tokenizer, classnames))
    return Model(arch, params, ref=ref, zero_shot=zero_shot, meta=dict(meta or {}))


def text_tower_zero_shot(model_name: str, quick_gelu: bool, text_state: dict[str, Tensor],
                         what: str) -> Callable[[list[str]], Classifier]:
    """Zero-shot heads from a checkpoint file's own text tower: open_clip's model ``model_name`` built
    without weights, the file's text-tower tensors loaded into it, and open_clip's tokenizer for that
    model (shipped inside open_clip). Built on first use; for the same weights, class names and templates
    the heads equal those of ``open_clip:NAME:TAG``. A text tower that does not fit is one error line."""
    import open_clip

    held: dict[str, object] = {"state": text_state}
    heads: dict[tuple[str, ...], Classifier] = {}

    def build() -> torch.nn.Module:
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)  # open_clip warns that a model built without weights has none
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                clip = open_clip.create_model(model_name, pretrained=None, force_quick_gelu=quick_gelu)
        finally:
            logging.disable(previous)
        clip.visual = torch.nn.Identity()  # the image tower comes from the file's canonical tensors
        state = held.pop("state")
        try:
            missing, unexpected = clip.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shapes that do not fit
            lines = [line.strip() for line in str(e).splitlines() if "size mismatch" in line]
            raise TransportError(f"{what}: the text tower does not fit open_clip:{model_name}: "
                                 f"{lines[0] if lines else type(e).__name__}") from None
        if missing or unexpected:
            raise TransportError(f"{what}: the text tower does not fit open_clip:{model_name}: "
                                 + "; ".join(f"{label} {', '.join(sorted(keys)[:3])}"
                                             + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
                                             for label, keys in (("missing", missing), ("unexpected", unexpected))
                                             if keys))
        for name, t in clip.state_dict().items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise TransportError(f"{what}: text-tower tensor {name} contains NaN or Inf values")
        return clip.float().eval()

    def zero_shot(classnames: list[str]) -> Classifier:
        key = tuple(classnames)
        if key not in heads:
            if "clip" not in held:
                held["clip"] = build()
            heads[key] = zero_shot_head(held["clip"], open_clip.get_tokenizer(model_name), classnames)
        return heads[key]

    return zero_shot


def load_open_clip(ref: str, seed: int = 0) -> Model:
    """``open_clip:ARCH:TAG`` -> Model. TAG 'none'/'' = random init seeded by ``seed``; else pretrained."""
    import open_clip

    if split_tower(ref)[1] != "visual":
        raise TransportError(f"'{ref}': load_open_clip reads the image tower (the text tower: open_clip_text)")
    arch_name, tag = parse_ref(ref)
    clip, arch = create_open_clip(arch_name, tag, seed)
    meta = {"family": "open_clip", "open_clip_model": arch_name, "pretrained": tag or "none"}
    if not tag:
        meta["seed"] = str(seed)
    return model_from_open_clip(clip, arch, ref, meta, tokenizer=open_clip.get_tokenizer(arch_name))


__all__ = ["FAMILY", "OpenClipFamily", "open_clip_arch", "tiny_arch", "build_open_clip_tower", "parse_ref",
           "split_tower", "build_clip", "TOWERS",
           "available_tags", "resolve_pretrained", "create_open_clip", "zero_shot_head", "model_from_open_clip",
           "text_tower_zero_shot", "load_open_clip", "PROMPT_TEMPLATES"]
