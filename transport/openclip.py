"""open_clip models: ``open_clip:ARCH:TAG`` -> a :class:`~transport.model.Model` (visual tower + zero-shot head).

TAG ``none`` (or empty) builds a seeded random init, which is what the tests use. A pretrained TAG is
loaded from the local cache when it is there; otherwise the network is probed with a short timeout
first, so an offline machine gets a one-line :class:`TransportError` instead of a hang.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from transport.arch import ViTArch, open_clip_arch, to_canonical
from transport.errors import TransportError
from transport.functional import Classifier
from transport.model import Model

Tensor = torch.Tensor

# Prompt ensemble for CLIP zero-shot heads: class embedding = normalised mean of normalised prompts.
PROMPT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
    "a low resolution photo of a {}.",
    "a drawing of a {}.",
    "a photo of the {}, a type of object.",
)

RANDOM_TAGS = ("", "none", "random")


def parse_ref(ref: str) -> tuple[str, str]:
    """``open_clip:ARCH[:TAG]`` -> (ARCH, TAG); TAG '' for random init."""
    if not ref.startswith("open_clip:"):
        raise TransportError(f"'{ref}' is not an open_clip reference (open_clip:ARCH:TAG)")
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
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        from transport.hf import hf_cache_dir

        # open_clip's convention: 'org/repo/' means its default file, 'org/repo/file.bin' that file.
        repo_id, filename = os.path.split(hub)
        filename = filename or HF_WEIGHTS_NAME
        names = [filename]
        if filename == HF_WEIGHTS_NAME:
            names.insert(0, HF_SAFE_WEIGHTS_NAME)
        elif filename.endswith((".bin", ".pth")):
            names.insert(0, filename[:-4] + ".safetensors")
        for name in names:
            hit = try_to_load_from_cache(repo_id, name, cache_dir=hf_cache_dir())
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
        from transport.hf import hub_host

        return hub_host()
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
    from transport import hf

    host = _download_host(cfg)
    if hf.offline_mode() or not hf.network_reachable(host):
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
def create_open_clip(arch_name: str, tag: str = "", seed: int = 0) -> tuple[torch.nn.Module, ViTArch]:
    """The real open_clip CLIP module (eval mode, float32) and the :class:`ViTArch` of its visual tower.

    Random init (``tag`` '') is seeded and leaves the global RNG untouched.
    """
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg

    arch = open_clip_arch(arch_name)
    if not tag:
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)  # open_clip warns that a random init has no pretrained weights
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                clip = open_clip.create_model(arch_name, pretrained=None)
        finally:
            logging.disable(previous)
    else:
        path = resolve_pretrained(arch_name, tag)
        cfg = get_pretrained_cfg(arch_name, tag)
        # A tag trained with QuickGELU must run with it, whatever the config name says.
        quick = bool(cfg.get("quick_gelu", False))
        try:
            clip = open_clip.create_model(arch_name, pretrained=path, force_quick_gelu=quick)
        except Exception as e:  # noqa: BLE001 - a broken cached file is the file's problem
            raise TransportError(f"{path}: could not load open_clip weights for {arch_name}:{tag}: "
                                 f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        if quick and arch.act != "quick_gelu":
            arch = dataclasses.replace(arch, act="quick_gelu")
        if cfg.get("mean") and cfg.get("std"):
            arch = dataclasses.replace(arch, mean=tuple(float(x) for x in cfg["mean"]),
                                       std=tuple(float(x) for x in cfg["std"]))
    return clip.float().eval(), arch


@torch.no_grad()
def zero_shot_head(clip: torch.nn.Module, tokenizer: Callable, classnames: Sequence[str],
                   templates: Sequence[str] = PROMPT_TEMPLATES, batch_size: int = 256) -> Classifier:
    """CLIP zero-shot head from the model's own text tower: per class the normalised mean of the
    normalised prompt embeddings; logits = exp(logit_scale) * cos(image, class)."""
    if not classnames:
        raise TransportError("zero-shot head needs at least one class name")
    texts = [t.format(c) for c in classnames for t in templates]
    feats = []
    for i in range(0, len(texts), batch_size):
        feats.append(clip.encode_text(tokenizer(texts[i:i + batch_size])).float())
    f = F.normalize(torch.cat(feats), dim=-1).reshape(len(classnames), len(templates), -1).mean(1)
    return Classifier(F.normalize(f, dim=-1), normalize=True, logit_scale=float(clip.logit_scale.exp()),
                      classnames=list(classnames))


def model_from_open_clip(clip: torch.nn.Module, arch: ViTArch, ref: str, meta: Optional[dict] = None,
                         tokenizer: Optional[Callable] = None) -> Model:
    """Canonical visual tower of an open_clip CLIP module; ``zero_shot`` uses its text tower."""
    sd = {k: v.detach() for k, v in clip.visual.state_dict().items()}
    params = {k: v.float().clone() for k, v in to_canonical(sd, arch, what=ref).items()}
    # The text tower is all the zero-shot head needs; drop the visual tower's memory.
    clip.visual = torch.nn.Identity()
    zero_shot = None
    if tokenizer is not None:
        heads: dict[tuple[str, ...], Classifier] = {}  # evaluation asks for the same head many times

        def zero_shot(classnames: list[str]) -> Classifier:
            key = tuple(classnames)
            if key not in heads:
                heads[key] = zero_shot_head(clip, tokenizer, classnames)
            return heads[key]
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

    arch_name, tag = parse_ref(ref)
    clip, arch = create_open_clip(arch_name, tag, seed)
    meta = {"family": "open_clip", "open_clip_model": arch_name, "pretrained": tag or "none"}
    if not tag:
        meta["seed"] = str(seed)
    return model_from_open_clip(clip, arch, ref, meta, tokenizer=open_clip.get_tokenizer(arch_name))


__all__ = ["PROMPT_TEMPLATES", "parse_ref", "available_tags", "resolve_pretrained", "create_open_clip",
           "zero_shot_head", "model_from_open_clip", "text_tower_zero_shot", "load_open_clip"]
