"""Hugging Face models: ``hf:ORG/NAME`` (local cache first) or a local directory with ``config.json``.

Supported: ``CLIPModel`` (vision tower + ``visual_projection``; zero-shot head from its text tower when
the directory has a tokenizer), ``CLIPVisionModel`` / ``CLIPVisionModelWithProjection``, ``ViTModel`` and
``ViTForImageClassification`` (its classifier becomes the model's head). Weights are read from the
directory's own files (safetensors preferred, ``.bin`` with ``weights_only``); nothing downloads when the
files are cached, and an offline machine gets a one-line :class:`TransportError` instead of a hang.
"""
from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

from transport.arch import CLIP_MEAN, CLIP_STD, IMAGENET_HALF, ViTArch
from transport.errors import TransportError
from transport.functional import Classifier
from transport.model import Model

Tensor = torch.Tensor

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
_ACTS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


# ----------------------------------------------------------------------------------------------
# network and cache (shared with transport.openclip)
# ----------------------------------------------------------------------------------------------
def hub_host() -> str:
    """Host name of the Hugging Face endpoint (``$HF_ENDPOINT`` honoured)."""
    from urllib.parse import urlparse

    return urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"


def offline_mode() -> bool:
    """True when the user asked for no network (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def network_reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """Can a TCP connection to ``host:port`` be opened within ``timeout`` seconds (DNS included)?"""
    ok: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                ok.append(True)
        except OSError:
            ok.append(False)

    # getaddrinfo ignores socket timeouts, so the whole probe runs in a thread we stop waiting for.
    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok and ok[0])


def hf_cache_dir() -> str:
    """The Hugging Face hub cache, read from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def resolve_dir(ref: str) -> Path:
    """A local directory for ``hf:ORG/NAME`` (cached snapshot, or a download when online) or a HF dir path."""
    name = ref[len("hf:"):] if ref.startswith("hf:") else ref
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise TransportError(f"{p}: not a Hugging Face model directory (no config.json)")
        return p
    if not ref.startswith("hf:"):
        raise TransportError(f"{ref}: directory not found")
    if name.count("/") != 1 or name.startswith("/") or name.startswith("."):
        raise TransportError(f"{ref}: expected hf:ORG/NAME or a local directory with config.json")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(name, cache_dir=hf_cache_dir(), local_files_only=True))
        if (path / "config.json").is_file() and any((path / f).is_file() for f in WEIGHT_FILES):
            return path
    except (LocalEntryNotFoundError, OSError, ValueError):
        pass
    host = hub_host()
    if offline_mode() or not network_reachable(host):
        raise TransportError(f"weights for hf:{name} are not in the local cache and the network is unreachable "
                             f"({host}); download them once on a connected machine")
    try:
        return Path(snapshot_download(name, cache_dir=hf_cache_dir(),
                                      allow_patterns=["*.json", "*.txt", "*.safetensors"]))
    except Exception as e:  # noqa: BLE001 - any hub failure is reported as one line
        raise TransportError(f"could not download hf:{name}: {type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}") from None


# ----------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------
def _load_config(directory: Path) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - unknown model types, malformed json
        raise TransportError(f"{directory / 'config.json'}: not a readable Hugging Face config: "
                             f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def _processor_stats(directory: Path, mean: tuple[float, ...], std: tuple[float, ...]
                     ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation from ``preprocessor_config.json`` when the directory has one, else the defaults given."""
    f = directory / "preprocessor_config.json"
    if f.is_file():
        try:
            d = json.loads(f.read_text())
            if d.get("image_mean") and d.get("image_std"):
                return tuple(float(x) for x in d["image_mean"]), tuple(float(x) for x in d["image_std"])
        except (ValueError, TypeError, AttributeError):
            raise TransportError(f"{f}: malformed preprocessor config") from None
    return mean, std


def _act(cfg: Any, what: str) -> str:
    act = getattr(cfg, "hidden_act", "gelu")
    if act not in _ACTS:
        raise TransportError(f"{what}: activation '{act}' is not supported (known: {', '.join(_ACTS)})")
    return _ACTS[act]


def _weight_keys(directory: Path) -> Optional[set[str]]:
    """Tensor names in the directory's weights without loading them (None when only a .bin is there)."""
    idx = [directory / "model.safetensors.index.json", directory / "pytorch_model.bin.index.json"]
    for f in idx:
        if f.is_file():
            try:
                return set(json.loads(f.read_text())["weight_map"])
            except (ValueError, KeyError, TypeError):
                raise TransportError(f"{f}: malformed weight index") from None
    f = directory / "model.safetensors"
    if f.is_file():
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(f), framework="pt") as h:
                return set(h.keys())
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise TransportError(f"{f}: not a readable safetensors file (truncated or another format): "
                                 f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return None


def _arch_from_config(cfg: Any, directory: Path, name: str, keys: Optional[set[str]]) -> ViTArch:
    mt = getattr(cfg, "model_type", "")
    if mt in ("clip", "clip_vision_model"):
        v = cfg.vision_config if mt == "clip" else cfg
        if keys is not None:
            has_proj = any(k.endswith("visual_projection.weight") for k in keys)
        else:
            has_proj = mt == "clip" or any("WithProjection" in a for a in (getattr(cfg, "architectures", None) or []))
        proj_dim = int(getattr(cfg, "projection_dim", 0) or 0) if has_proj else 0
        mean, std = _processor_stats(directory, CLIP_MEAN, CLIP_STD)
        return ViTArch(family="hf_clip", name=name, image_size=int(v.image_size), patch_size=int(v.patch_size),
                       width=int(v.hidden_size), layers=int(v.num_hidden_layers), heads=int(v.num_attention_heads),
                       mlp_width=int(v.intermediate_size), output_dim=proj_dim, in_chans=int(v.num_channels),
                       act=_act(v, name), ln_eps=float(v.layer_norm_eps), ln_pre=True, patch_bias=False,
                       mean=mean, std=std)
    if mt == "vit":
        if not getattr(cfg, "qkv_bias", True):
            raise TransportError(f"{name}: ViT without q/k/v biases (qkv_bias=False) is not supported")
        mean, std = _processor_stats(directory, IMAGENET_HALF, IMAGENET_HALF)
        return ViTArch(family="hf_vit", name=name, image_size=int(cfg.image_size), patch_size=int(cfg.patch_size),
                       width=int(cfg.hidden_size), layers=int(cfg.num_hidden_layers),
                       heads=int(cfg.num_attention_heads), mlp_width=int(cfg.intermediate_size), output_dim=0,
                       in_chans=int(cfg.num_channels), act=_act(cfg, name), ln_eps=float(cfg.layer_norm_eps),
                       ln_pre=False, patch_bias=True, mean=mean, std=std)
    raise TransportError(f"{name}: model type '{mt}' is not supported (CLIP, CLIP vision or ViT)")


def _arch_name(ref: str, directory: Path) -> str:
    return ref if ref.startswith("hf:") else f"hf:{directory}"


def hf_arch(ref: str) -> ViTArch:
    """The :class:`ViTArch` of a HF model (``hf:ORG/NAME`` from the local cache, or a directory) from its config."""
    directory = resolve_dir(ref)
    return _arch_from_config(_load_config(directory), directory, _arch_name(ref, directory), _weight_keys(directory))


# ----------------------------------------------------------------------------------------------
# weights and model
# ----------------------------------------------------------------------------------------------
def read_weights(directory: Path) -> dict[str, Tensor]:
    """All tensors of a HF directory (single file or shards), safetensors preferred."""
    from transport.io import read_checkpoint, strip_prefixes

    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        f = directory / index
        if f.is_file():
            try:
                shards = sorted(set(json.loads(f.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError):
                raise TransportError(f"{f}: malformed weight index") from None
            sd: dict[str, Tensor] = {}
            for s in shards:
                sd.update(read_checkpoint(directory / s)[0])
            return strip_prefixes(sd)
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return read_checkpoint(directory / name)[0]
    raise TransportError(f"{directory}: no weights found (expected model.safetensors or pytorch_model.bin)")


def _has_tokenizer(directory: Path) -> bool:
    return any((directory / f).is_file() for f in TOKENIZER_FILES)


def _clip_zero_shot(directory: Path, logit_scale: float):
    """A lazy zero-shot head builder from a CLIPModel directory's text tower and tokenizer."""
    state: dict[str, Any] = {}
    heads: dict[tuple[str, ...], Classifier] = {}  # evaluation asks for the same head many times

    def build(classnames: list[str]) -> Classifier:
        if not classnames:
            raise TransportError("zero-shot head needs at least one class name")
        key = tuple(classnames)
        if key not in heads:
            heads[key] = _head(list(classnames))
        return heads[key]

    def _head(classnames: list[str]) -> Classifier:
        from transport.openclip import PROMPT_TEMPLATES

        if "model" not in state:
            from transformers import AutoTokenizer, CLIPModel
            from transformers.utils import logging as hf_logging

            bar = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()
            try:
                model = CLIPModel.from_pretrained(str(directory), local_files_only=True).float().eval()
                state["tokenizer"] = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
            except Exception as e:  # noqa: BLE001
                raise TransportError(f"{directory}: could not load the CLIP text tower: {type(e).__name__}: "
                                     f"{str(e).splitlines()[0] if str(e) else ''}") from None
            finally:
                if bar:
                    hf_logging.enable_progress_bar()
            model.vision_model = None  # only the text tower is needed from here on
            state["model"] = model
        model, tok = state["model"], state["tokenizer"]
        texts = [t.format(c) for c in classnames for t in PROMPT_TEMPLATES]
        max_len = int(model.config.text_config.max_position_embeddings)
        with torch.no_grad():
            feats = []
            for i in range(0, len(texts), 256):
                enc = tok(texts[i:i + 256], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
                out = model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
                feats.append((out.pooler_output if hasattr(out, "pooler_output") else out).float())
        f = F.normalize(torch.cat(feats), dim=-1).reshape(len(classnames), len(PROMPT_TEMPLATES), -1).mean(1)
        return Classifier(F.normalize(f, dim=-1), normalize=True, logit_scale=logit_scale, classnames=list(classnames))

    return build


def load_hf(ref: str) -> Model:
    """``hf:ORG/NAME`` or a HF directory -> Model (canonical vision tower, head / zero-shot when present)."""
    from transport.arch import to_canonical
    from transport.io import check_family_tensors, tower_state_dict

    directory = resolve_dir(ref)
    cfg = _load_config(directory)
    _arch_from_config(cfg, directory, _arch_name(ref, directory), set())  # unsupported types fail before reading
    sd = read_weights(directory)
    arch = _arch_from_config(cfg, directory, _arch_name(ref, directory), set(sd))
    what = str(directory)
    tower = tower_state_dict(sd, arch)
    if arch.family == "hf_clip":
        tower.pop("logit_scale", None)
        tower = {k: v for k, v in tower.items() if not k.startswith(("text_model.", "text_projection."))}
    check_family_tensors(tower, arch, what)
    params = {k: v.float() for k, v in to_canonical(tower, arch, what=what).items()}
    head, zero_shot = None, None
    meta = {"family": arch.family, "hf_model_type": str(cfg.model_type),
            "hf_architectures": ",".join(getattr(cfg, "architectures", None) or [])}
    if arch.family == "hf_vit":
        body = {k[len("vit."):] if k.startswith("vit.") else k: v for k, v in sd.items()}
        if "classifier.weight" in body:
            w = body["classifier.weight"].float()
            id2label = getattr(cfg, "id2label", None) or {}
            names = [str(id2label.get(i, id2label.get(str(i), i))) for i in range(w.shape[0])]
            head = Classifier(w, body.get("classifier.bias").float() if "classifier.bias" in body else None,
                              classnames=names)
    elif cfg.model_type == "clip" and "text_projection.weight" in sd and _has_tokenizer(directory):
        scale = float(sd["logit_scale"].float().exp()) if "logit_scale" in sd else 100.0
        zero_shot = _clip_zero_shot(directory, scale)
    return Model(arch, params, ref=ref, head=head, zero_shot=zero_shot, meta=meta)


__all__ = ["hub_host", "offline_mode", "network_reachable", "hf_cache_dir", "resolve_dir", "hf_arch",
           "read_weights", "load_hf"]
