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
import warnings
import zipfile
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


def _torch_load(path: Path, trust_pickle: bool) -> Any:
    """``torch.load`` with ``weights_only``; a pickle that needs more is named by what it would import."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols: the error below says it in one line
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # the weights-only unpickler refused something: find out what below
    except (RuntimeError, OSError, EOFError) as e:  # torch's zip reader: cut or damaged archives
        raise TransportError(f"{path}: not a readable checkpoint (truncated or damaged): {_first_sentence(e)}") from None
    except Exception:  # noqa: BLE001 - garbage bytes make the unpickler fail in arbitrary ways (KeyError, ...)
        raise TransportError(f"{path}: not a readable checkpoint (truncated, or neither safetensors nor "
                             f"a PyTorch file)") from None
    from transport.pickles import is_legacy_torch_file, pickle_globals, weights_only_allowed

    names = pickle_globals(path)
    if names is None:  # not a pickle at all
        raise TransportError(f"{path}: not a readable checkpoint (truncated, or neither safetensors nor "
                             f"a PyTorch file)")
    allowed = weights_only_allowed()
    blocked = [n for n in dict.fromkeys(names) if n not in allowed]
    if not trust_pickle:
        if blocked:
            more = f", and {len(blocked) - 1} more" if len(blocked) > 1 else ""
            raise TransportError(f"{path}: this file runs code when loaded (GLOBAL {blocked[0]}{more}); "
                                 f"pass --trust-pickle only if you trust it")
        raise TransportError(f"{path}: a pickle that only full unpickling reads (not written by torch.save); "
                             f"pass --trust-pickle only if you trust it")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if zipfile.is_zipfile(path) or is_legacy_torch_file(path):
                return torch.load(str(path), map_location="cpu", weights_only=False)
            with open(path, "rb") as f:  # a raw pickle stream (pickle.dump), which torch.load does not read
                return pickle.load(f)
    except Exception as e:  # noqa: BLE001 - any failure of a foreign pickle is the file's problem
        raise TransportError(f"{path}: could not load even with --trust-pickle: {type(e).__name__}: "
                             f"{_first_sentence(e)}") from None


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
    """Keep the transported tower: a full CLIP dict (``visual.`` keys) gives its visual tower, an
    ImageClassifier / ImageEncoder dict (``image_encoder.model.visual.``, ``model.visual.``) its image tower."""
    if arch.family == "open_clip":
        p = open_clip_tower_prefix(sd, arch)
        if p:
            return {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}
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
    return {k: v for k, v in sd.items() if not k.startswith(HEAD_PREFIXES)}


#: a head the checkpoint carries: ours (``classifier.``) or WiSE-FT / task_vectors' ``classification_head.``
HEAD_PREFIXES = ("classifier.", "classification_head.")
#: keys only an open_clip image tower has (its text tower has transformer blocks too, but none of these)
_ANCHORS = ("conv1.weight", "class_embedding", "ln_pre.weight", "ln_post.weight")


def open_clip_tower_prefix(sd: Mapping[str, Tensor], arch: ViTArch) -> str:
    """The prefix under which ``sd`` holds an open_clip image tower ('' at the top level, ``visual.`` in a
    CLIP dict, ``image_encoder.model.visual.`` in an ImageClassifier, ...): the one holding most of its keys."""
    from transport.arch import family

    keys = family(arch).keys(arch)
    found = {k[: -len(a)] for k in sd for a in _ANCHORS if k.endswith(a)}
    found = {p for p in found if p == "" or p.endswith(".")}
    if not found:  # e.g. a task vector of the transformer blocks only: the tower sits under some '...visual.'
        found = {k[: k.index("visual.") + len("visual.")] for k in sd if "visual." in k}
    if not found:
        return ""
    return max(sorted(found), key=lambda p: (sum(1 for k in keys if p + k in sd), -len(p)))


def open_clip_text_state(sd: Mapping[str, Tensor], arch: ViTArch) -> dict[str, Tensor]:
    """The text tower next to an open_clip image tower (``token_embedding.weight``, ``transformer.*``,
    ``ln_final.*``, ``text_projection``, ``logit_scale``), in open_clip's CLIP names; {} when absent."""
    p = open_clip_tower_prefix(sd, arch)
    if not p.endswith("visual."):
        return {}
    base = p[: -len("visual.")]
    text = {k[len(base):]: v for k, v in sd.items() if k.startswith(base) and not k.startswith(p)
            and not k[len(base):].startswith(HEAD_PREFIXES)}
    return text if "token_embedding.weight" in text else {}


def _head_from_state(sd: Mapping[str, Tensor], what: str) -> Classifier | None:
    """Our saved head (``classifier.*``) or WiSE-FT / task_vectors' ``classification_head.*`` (logits of
    unit-normalised features, the scale folded into the weights)."""
    if "classifier.weight" in sd:
        prefix, normalize = "classifier.", False
    else:
        heads = sorted((k for k in sd if k.endswith("classification_head.weight")), key=len)
        if not heads:
            return None
        prefix, normalize = heads[0][: -len("weight")], True
    w, b = sd[prefix + "weight"], sd.get(prefix + "bias")
    for name, t in ((prefix + "weight", w), (prefix + "bias", b)):
        if t is not None and not t.is_floating_point():
            raise TransportError(f"{what}: tensor {name} holds {str(t.dtype).replace('torch.', '')} values; "
                                 "a head must be floating point")
    if w.dim() != 2 or (b is not None and tuple(b.shape) != (w.shape[0],)):
        raise TransportError(f"{what}: {prefix}weight / bias have shapes {tuple(w.shape)} / "
                             f"{None if b is None else tuple(b.shape)}, not a linear head")
    return Classifier(w.float(), None if b is None else b.float(), normalize=normalize, classnames=[])


def resolve_arch(path: str | os.PathLike, md: Mapping[str, str], arch: ViTArch | None) -> ViTArch:
    """The architecture to read a file with: the one given, which must not contradict the one the
    file records (``arch`` metadata); else the recorded one."""
    recorded = ViTArch.from_json(md["arch"]) if "arch" in md else None
    if arch is None:
        if recorded is None:
            raise TransportError(f"{path}: the file does not say its architecture; pass --arch "
                                 "(e.g. open_clip:ViT-B-16)")
        return recorded
    if recorded is not None:
        diffs = arch_differences(recorded, arch)
        if diffs:
            raise TransportError(f"{path}: --arch {arch.name} contradicts the architecture the file records "
                                 f"({recorded.name}): " + "; ".join(diffs))
    return arch


def arch_differences(recorded: ViTArch, given: ViTArch) -> list[str]:
    """``field: RECORDED in the file, GIVEN by --arch`` for every field but the name that differs."""
    import dataclasses

    out = []
    for f in dataclasses.fields(ViTArch):
        a, b = getattr(recorded, f.name), getattr(given, f.name)
        if f.name != "name" and a != b:
            out.append(f"{f.name} {a} in the file, {b} by --arch")
    return out


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
        if not t.is_floating_point():  # casting integer "weights" to float would run silently wrong
            raise TransportError(f"{what}: tensor {key} holds {str(t.dtype).replace('torch.', '')} values; "
                                 "weights must be floating point")
        shape = want[k]
        got = tuple(t.shape)
        squeezable = fam.name == "hf_vit" and tuple(s for s in got if s != 1) == tuple(s for s in shape if s != 1)
        if got != shape and not squeezable:
            raise TransportError(f"{what}: shape mismatch for {key}: got {got}, {arch.name} needs {shape}")
        if not torch.isfinite(t).all():
            raise TransportError(f"{what}: tensor {key} contains NaN or Inf values")


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
    """A checkpoint file -> Model: its tower (wherever the file keeps it), the head it carries, and for
    an open_clip CLIP dict with its text tower the zero-shot heads of that text tower."""
    sd, md = read_checkpoint(path, trust_pickle)
    arch = resolve_arch(path, md, arch)
    head = _head_from_state(sd, str(path))
    if head is not None and "classnames" in md:
        head.classnames = json.loads(md["classnames"])
    tower = tower_state_dict(sd, arch)
    check_family_tensors(tower, arch, str(path))
    params = {k: v.float() for k, v in to_canonical(tower, arch, what=str(path)).items()}
    zero_shot = None
    if arch.family == "open_clip" and arch.name.startswith("open_clip:"):
        text = open_clip_text_state(sd, arch)
        if text:
            from transport.openclip import text_tower_zero_shot

            zero_shot = text_tower_zero_shot(arch.name[len("open_clip:"):], arch.act == "quick_gelu", text, str(path))
    return Model(arch, params, ref=str(path), head=head, zero_shot=zero_shot, meta=md)


def save_model(model: Model, path: str | os.PathLike, **meta: str) -> Path:
    """Write a model (family names + classifier + arch metadata) atomically as safetensors."""
    from transport.arch import from_canonical

    tensors = {k: v.detach().contiguous().cpu() for k, v in from_canonical(model.params, model.arch).items()}
    md = {**model.meta, **{k: str(v) for k, v in meta.items()}, "arch": model.arch.to_json(), "ref": model.ref}
    if model.head is not None:
        tensors.update({k: v.detach().contiguous().cpu() for k, v in model.head.state().items()})
        md["classnames"] = json.dumps(model.head.classnames)
    return write_safetensors(path, tensors, md)


# ----------------------------------------------------------------------------------------------
# writing safetensors deterministically
# ----------------------------------------------------------------------------------------------
_ST_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.complex64: "C64",
}
for _name, _code in (("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"), ("float8_e4m3fn", "F8_E4M3"),
                     ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        _ST_DTYPES[getattr(torch, _name)] = _code


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, Tensor],
                      metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``tensors`` and string ``metadata`` as a safetensors file whose bytes depend only on the content.

    ``safetensors.save_file`` writes the metadata in an order that changes from process to process, so
    the header is written here: 8-byte little-endian length, JSON with sorted keys (``__metadata__``
    included, its entries sorted too), padded with spaces to 8 bytes; then the tensors' bytes, largest
    element size first and by name (every tensor aligned to its element size), exactly as safetensors
    lays them out. Atomic: a temp file next to ``path``, then a rename.
    """
    import sys

    path = Path(path)
    items = []
    for name in tensors:
        t = tensors[name].detach().cpu().contiguous()
        if t.dtype not in _ST_DTYPES:
            raise TransportError(f"{path}: tensor {name} has dtype {t.dtype}, which safetensors cannot store")
        items.append((name, t))
    items.sort(key=lambda it: (-it[1].element_size(), it[0]))
    header: dict[str, Any] = {}
    offset = 0
    for name, t in items:
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    if sys.byteorder != "little":  # safetensors is little-endian; this writer copies native bytes
        raise TransportError(f"{path}: writing safetensors needs a little-endian machine")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(len(text).to_bytes(8, "little"))
            f.write(text)
            for _, t in items:
                if t.numel():
                    f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
