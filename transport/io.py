"""Loading what users have: zoo names, open_clip names + tags, Hugging Face ids/dirs, checkpoint files.

References (``REF``):
  ``zoo:NAME``                  a model of the built-in demo zoo (built by ``python -m transport zoo build``)
  ``open_clip:ARCH:TAG``        open_clip architecture + pretrained tag; TAG ``none`` = random init
  ``hf:ORG/NAME`` or a HF dir   Hugging Face CLIP (vision tower) or ViT
  a file                        ``.safetensors`` (preferred), ``.pt/.pth/.bin`` state dicts (``weights_only``)

Pickled whole modules are refused unless ``trust_pickle=True``. Every failure is a one-line
:class:`TransportError` that names the file and the problem.
"""
from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from transport.arch import ViTArch, open_clip_arch, to_canonical
from transport.errors import TransportError
from transport.functional import Classifier
from transport.model import Model

Tensor = torch.Tensor

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
STRIP_PREFIXES = ("module.", "model.", "clip_model.")
VISUAL_PREFIXES = ("visual.",)


# ----------------------------------------------------------------------------------------------
# raw files
# ----------------------------------------------------------------------------------------------
def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and string metadata of a safetensors file; truncated or foreign files give one clear line."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.exists():
        raise TransportError(f"{path}: file not found")
    if path.is_dir():
        raise TransportError(f"{path}: is a directory, expected a .safetensors file")
    try:
        with safe_open(str(path), framework="pt") as f:
            md = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise TransportError(f"{path}: not a readable safetensors file (truncated or another format): "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return tensors, md


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """Only the string metadata of a safetensors file (no tensors read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise TransportError(f"{path}: not a readable safetensors file (truncated or another format): "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _looks_like_safetensors(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        if len(head) < 9:
            return False
        n = int.from_bytes(head[:8], "little")
        return 2 <= n < 100_000_000 and head[8:9] == b"{"
    except OSError:
        return False


def read_checkpoint(path: str | os.PathLike, trust_pickle: bool = False) -> tuple[dict[str, Tensor], dict[str, str]]:
    """A flat name -> tensor dict from any supported checkpoint form, plus metadata (safetensors only).

    Unwraps ``state_dict`` / ``model_state_dict`` / ``model`` and strips ``module.``, ``model.``,
    ``clip_model.`` prefixes. Whole pickled modules load only with ``trust_pickle``.
    """
    path = Path(path)
    if not path.exists():
        raise TransportError(f"{path}: file not found")
    if path.is_dir():
        raise TransportError(f"{path}: is a directory (for a Hugging Face model directory use it as the reference)")
    if path.stat().st_size == 0:
        raise TransportError(f"{path}: file is empty")
    if path.suffix == ".safetensors" or _looks_like_safetensors(path):
        tensors, md = read_safetensors(path)
        return strip_prefixes(tensors), md
    obj = _torch_load(path, trust_pickle)
    return strip_prefixes(_unwrap(obj, path)), {}


def _first_sentence(e: BaseException) -> str:
    text = " ".join(str(e).split())
    if not text:
        return type(e).__name__
    cut = text.find(". ")
    return text[:cut + 1] if 0 < cut < 200 else text[:200]


_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def _torch_load(path: Path, trust_pickle: bool) -> Any:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = _GLOBAL.search(str(e))
        if found is None:  # the weights-only unpickler choked on bytes that are not a pickle at all
            raise TransportError(f"{path}: not a readable checkpoint (truncated, or neither safetensors nor "
                                 f"a PyTorch file)") from None
        if not trust_pickle:
            raise TransportError(
                f"{path}: refusing to unpickle {found.group(1)} (a pickled object can run code on load); "
                f"re-save it as a state dict, or pass --trust-pickle if you trust its source"
            ) from None
        try:
            return torch.load(str(path), map_location="cpu", weights_only=False)
        except Exception as e2:  # noqa: BLE001 - any failure of a foreign pickle is the file's problem
            raise TransportError(f"{path}: could not load even with --trust-pickle: {type(e2).__name__}: "
                                 f"{_first_sentence(e2)}") from None
    except (RuntimeError, OSError, EOFError) as e:  # torch's zip reader: cut or damaged archives
        raise TransportError(f"{path}: not a readable checkpoint (truncated or damaged): {_first_sentence(e)}") from None
    except Exception:  # noqa: BLE001 - garbage bytes make the unpickler fail in arbitrary ways (KeyError, ...)
        raise TransportError(f"{path}: not a readable checkpoint (truncated, or neither safetensors nor "
                             f"a PyTorch file)") from None


def _unwrap(obj: Any, path: Path) -> dict[str, Tensor]:
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    for _ in range(3):
        if isinstance(obj, Mapping):
            for k in WRAPPER_KEYS:
                if k in obj and isinstance(obj[k], (Mapping, torch.nn.Module)):
                    obj = obj[k]
                    obj = obj.state_dict() if isinstance(obj, torch.nn.Module) else obj
                    break
            else:
                break
    if not isinstance(obj, Mapping):
        raise TransportError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise TransportError(f"{path}: holds no tensors")
    return tensors


def strip_prefixes(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out = dict(sd)
    changed = True
    while changed:
        changed = False
        for p in STRIP_PREFIXES:
            if out and all(k.startswith(p) for k in out):
                out = {k[len(p):]: v for k, v in out.items()}
                changed = True
    return out


def tower_state_dict(sd: Mapping[str, Tensor], arch: ViTArch) -> dict[str, Tensor]:
    """Keep the transported tower: a full CLIP dict (``visual.`` keys) gives its visual tower."""
    if arch.family == "open_clip" and any(k.startswith("visual.") for k in sd):
        return {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    if arch.family == "hf_clip" and not any(k.startswith("vision_model.") for k in sd) \
            and any(k.startswith(("embeddings.", "encoder.layers.")) for k in sd):
        # transformers >= 5 saves a CLIPVisionModel without its ``vision_model.`` wrapper
        sd = {(k if k.startswith(("visual_projection.", "classifier.")) else f"vision_model.{k}"): v
              for k, v in sd.items()}
    if arch.family == "hf_clip" and any(k.startswith("text_model.") for k in sd):
        return {k: v for k, v in sd.items() if k.startswith("vision_model.") or k.startswith("visual_projection.")
                and arch.output_dim}
    if arch.family == "hf_vit":
        sd = strip_prefix_if_all(sd, "vit.", keep=("classifier.",))
        return {k: v for k, v in sd.items() if not k.startswith("classifier.")}
    return {k: v for k, v in sd.items() if not k.startswith("classifier.")}


def strip_prefix_if_all(sd: Mapping[str, Tensor], prefix: str, keep: tuple[str, ...] = ()) -> dict[str, Tensor]:
    body = [k for k in sd if not k.startswith(keep)] if keep else list(sd)
    if body and all(k.startswith(prefix) for k in body):
        return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in sd.items()}
    return dict(sd)


def family_shapes(arch: ViTArch) -> dict[str, tuple[int, ...]]:
    """The family's own tensor names and shapes for ``arch`` (computed on the meta device, no memory)."""
    from transport.arch import from_canonical, param_axes

    meta = {k: torch.empty(v.shape, device="meta") for k, v in param_axes(arch).items()}
    return {k: tuple(v.shape) for k, v in from_canonical(meta, arch).items()}


def check_family_tensors(tower: Mapping[str, Tensor], arch: ViTArch, what: str) -> None:
    """Shape and NaN/Inf checks named by the checkpoint's OWN keys (missing/unexpected keys: ``to_canonical``)."""
    from transport.arch import family

    fam = family(arch)
    alias = fam.alias or (lambda k: k)
    want = family_shapes(arch)
    for key, t in tower.items():
        k = alias(key)
        if k not in want:
            continue
        shape = want[k]
        got = tuple(t.shape)
        squeezable = fam.name == "hf_vit" and tuple(s for s in got if s != 1) == tuple(s for s in shape if s != 1)
        if got != shape and not squeezable:
            raise TransportError(f"{what}: shape mismatch for {key}: got {got}, {arch.name} needs {shape}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise TransportError(f"{what}: tensor {key} contains NaN or Inf values")


def _head_from_state(sd: Mapping[str, Tensor]) -> Classifier | None:
    if "classifier.weight" in sd:
        md_names: list[str] = []
        return Classifier(sd["classifier.weight"].float(), sd.get("classifier.bias"), classnames=md_names)
    return None


# ----------------------------------------------------------------------------------------------
# references
# ----------------------------------------------------------------------------------------------
def parse_arch(name: str) -> ViTArch:
    """``open_clip:ViT-B-16``, ``zoo:NAME`` (architecture of that zoo model) or ``hf:ID`` / HF dir (config only)."""
    if name.startswith("open_clip:"):
        return open_clip_arch(name.split(":", 2)[1])
    if name.startswith("zoo:"):
        from transport import zoo

        return zoo.arch_of(name[len("zoo:"):])
    if name.startswith("hf:") or Path(name).is_dir():
        from transport.hf import hf_arch

        return hf_arch(name)
    if Path(name).is_file():  # a model file that records its architecture, or the description as JSON
        if Path(name).suffix == ".json":
            return ViTArch.from_json(Path(name).read_text())
        md = read_safetensors_metadata(name)
        if "arch" not in md:
            raise TransportError(f"{name}: the file does not record an architecture (no 'arch' metadata)")
        return ViTArch.from_json(md["arch"])
    raise TransportError(f"unknown architecture '{name}' (use open_clip:ARCH, zoo:NAME, hf:ORG/NAME, or a "
                         "model file that records its architecture)")


def load_model(ref: str, arch: ViTArch | str | None = None, trust_pickle: bool = False, seed: int = 0) -> Model:
    """Resolve a reference to a :class:`Model` (canonical params validated: keys, shapes, NaN/Inf)."""
    if isinstance(arch, str):
        arch = parse_arch(arch)
    if ref.startswith("zoo:"):
        from transport import zoo

        return zoo.load(ref[len("zoo:"):])
    if ref.startswith("open_clip:"):
        from transport.openclip import load_open_clip

        return load_open_clip(ref, seed=seed)
    if ref.startswith("hf:") or (Path(ref).is_dir() and (Path(ref) / "config.json").exists()):
        from transport.hf import load_hf

        return load_hf(ref)
    return load_file_model(ref, arch, trust_pickle)


def load_file_model(path: str, arch: ViTArch | None, trust_pickle: bool = False) -> Model:
    sd, md = read_checkpoint(path, trust_pickle)
    if arch is None:
        if "arch" in md:
            arch = ViTArch.from_json(md["arch"])
        else:
            raise TransportError(f"{path}: the file does not say its architecture; pass --arch "
                                 "(e.g. open_clip:ViT-B-16)")
    head = _head_from_state(sd)
    if head is not None and "classnames" in md:
        head.classnames = json.loads(md["classnames"])
    tower = tower_state_dict(sd, arch)
    check_family_tensors(tower, arch, str(path))
    params = {k: v.float() for k, v in to_canonical(tower, arch, what=str(path)).items()}
    return Model(arch, params, ref=str(path), head=head, meta=md)


def save_model(model: Model, path: str | os.PathLike, **meta: str) -> Path:
    """Write a model (family names + classifier + arch metadata) atomically as safetensors."""
    from safetensors.torch import save_file

    from transport.arch import from_canonical

    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in from_canonical(model.params, model.arch).items()}
    md = {**model.meta, **{k: str(v) for k, v in meta.items()}, "arch": model.arch.to_json(), "ref": model.ref}
    if model.head is not None:
        tensors.update({k: v.detach().contiguous().cpu() for k, v in model.head.state().items()})
        md["classnames"] = json.dumps(model.head.classnames)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=md)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
