"""Where models come from and go to: a reference (``REF``) -> :class:`~transport.core.model.Model`, and
models and task vectors written in their family's own names.

References:
  ``zoo:NAME[@SEED]``           a model of the built-in demo zoo (``python -m transport zoo build``)
  ``zoo:text/NAME[@SEED]``      a model of the text demo zoo (``python -m transport.zoo.text_build``)
  ``open_clip:ARCH:TAG``        open_clip architecture + pretrained tag; TAG ``none`` = random init; the image
                                tower, or with ``#text`` the text tower (``open_clip:ViT-B-32:openai#text``)
  ``hf:ORG/NAME`` or a HF dir   a Hugging Face model directory (``config.json`` + weights, sharded or not; its
                                tokenizer when it has one); from the local cache first
  a file                        ``.safetensors`` (preferred), ``.pt/.pth/.bin`` state dicts (``weights_only``);
                                ``arch`` (``--arch``) says what it holds when it does not: ``open_clip:ARCH[#text]``,
                                ``hf:ORG/NAME``, a HF directory or its ``config.json`` (whose tokenizer comes along)

This is the only module that imports :mod:`transport.families`. Pickled whole modules are refused
unless ``trust_pickle=True``. Every failure is a one-line :class:`TransportError` naming the input.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable, Mapping, Optional

import torch

from transport import __version__, families, zoo
from transport.core.arch import Arch
from transport.core.heads import Classifier
from transport.core.layout import param_axes
from transport.core.model import Model
from transport.core.task_vector import TaskVector
from transport.errors import TransportError
from transport.families import hf_common
from transport.families.open_clip import load_open_clip, open_clip_arch, split_tower, tiny_arch
from transport.families.open_clip_text import load_open_clip_text, open_clip_text_arch
from transport.files import (
    LazyWeights,
    read_checkpoint,
    read_safetensors_metadata,
    read_weights,
    safetensors_bytes,
    write_atomic,
    write_safetensors,
)
from transport.hub import resolve_dir
from transport.zoo import text_store

Tensor = torch.Tensor


# ----------------------------------------------------------------------------------------------
# names: canonical <-> a family's own
# ----------------------------------------------------------------------------------------------
def family_of(arch: Arch) -> families.Family:
    return families.get(arch.family)


def to_canonical(sd: Mapping[str, Tensor], arch: Arch, what: str = "checkpoint") -> dict[str, Tensor]:
    """Family-named tensors (a whole checkpoint or its tower) -> canonical tensors (validated)."""
    return family_of(arch).to_canonical(sd, arch, what)


def from_canonical(params: Mapping[str, Tensor], arch: Arch) -> dict[str, Tensor]:
    """Canonical tensors -> the family's own names and shapes (fused keys re-fused)."""
    return family_of(arch).from_canonical(params, arch)


def family_shapes(arch: Arch) -> dict[str, tuple[int, ...]]:
    """The family's own tensor names and shapes for ``arch`` (no memory)."""
    return family_of(arch).family_shapes(arch)


def init_params(arch: Arch, seed: int) -> dict[str, Tensor]:
    """The family's own random initialisation of ``arch`` as canonical float tensors (seeded)."""
    fam = family_of(arch)
    module = fam.init_module(arch, seed)
    return {k: v.detach().clone().float() for k, v in fam.table.to_canonical(fam.module_state(module), arch,
                                                                              "init").items()}


def tower_state_dict(sd: Mapping[str, Tensor], arch: Arch) -> dict[str, Tensor]:
    """The transported tower's tensors of a (prefix-stripped) state dict, in the family's names."""
    return family_of(arch).tower(sd, arch)


# ----------------------------------------------------------------------------------------------
# architectures
# ----------------------------------------------------------------------------------------------
def hf_arch_from_config(cfg, directory: Path, name: str, keys: Optional[set[str]] = None) -> Arch:
    """The architecture a Hugging Face config describes (``keys``: the checkpoint's tensor names, when known)."""
    return families.for_model_type(getattr(cfg, "model_type", ""), name).arch_from_config(cfg, directory, name, keys)


def hf_arch(ref: str) -> Arch:
    """The architecture of a HF model (``hf:ORG/NAME`` from the local cache, or a directory) from its config."""
    directory = resolve_dir(ref)
    cfg = hf_common.load_config(directory)
    fam = families.for_model_type(getattr(cfg, "model_type", ""), hf_common.arch_name(ref, directory))
    return fam.arch_from_config(cfg, directory, hf_common.arch_name(ref, directory), hf_common.weight_keys(directory))


def hf_config_arch(path: Path) -> Arch:
    """The architecture a Hugging Face ``config.json`` file describes (its directory's, with what its weights say
    when it is a model directory)."""
    if path.name == "config.json":
        return hf_arch(str(path.parent))
    cfg = hf_common.load_config(path)
    name = f"hf:{path}"
    return families.for_model_type(getattr(cfg, "model_type", ""), name).arch_from_config(cfg, path.parent, name, None)


def _json_arch(path: Path) -> Arch:
    """A JSON file: a Hugging Face config (it has ``model_type``) or our own architecture description."""
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TransportError(f"{path}: not a readable JSON file ({type(e).__name__}: {e})") from None
    if isinstance(d, dict) and "model_type" in d:
        return hf_config_arch(path)
    return Arch.from_json(d if isinstance(d, dict) else path.read_text())


def parse_arch(name: str) -> Arch:
    """``open_clip:ViT-B-16`` (``#text``: its text tower), ``zoo:NAME`` (architecture of that zoo model), ``hf:ID`` /
    HF dir (config only), a Hugging Face ``config.json``, a model file that records its architecture, or the
    description as a JSON file."""
    if name.startswith("open_clip:"):
        base, tower = split_tower(name)
        model_name = base.split(":", 2)[1]
        return open_clip_text_arch(model_name) if tower == "text" else open_clip_arch(model_name)
    if name.startswith(text_store.PREFIX):
        return text_store.arch_of(name[len(text_store.PREFIX):])
    if name.startswith("zoo:"):
        return zoo.arch_of(name[len("zoo:"):])
    if name.startswith("hf:") or Path(name).is_dir():
        return hf_arch(name)
    if Path(name).is_file():
        if Path(name).suffix == ".json":
            return _json_arch(Path(name))
        md = read_safetensors_metadata(name)
        if "arch" not in md:
            raise TransportError(f"{name}: the file does not record an architecture (no 'arch' metadata)")
        return Arch.from_json(md["arch"])
    raise TransportError(f"unknown architecture '{name}' (use open_clip:ARCH, zoo:NAME, hf:ORG/NAME, a Hugging Face "
                         "directory or config.json, or a model file that records its architecture)")


# ----------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------
def load_model(ref: str, arch: Arch | str | None = None, trust_pickle: bool = False, seed: int = 0,
               stream: bool = False) -> Model:
    """Resolve a reference to a :class:`Model` (canonical params validated: keys, shapes, dtypes, NaN/Inf).

    ``stream``: a model in safetensors files (a Hugging Face directory, a language model's file) keeps its
    tensors in the files and reads them block by block when asked for
    (:class:`~transport.core.streamed.StreamedParams`); other sources load resident as always."""
    if isinstance(arch, str):
        arch = parse_arch(arch)
    if ref.startswith(text_store.PREFIX):
        return load_text_zoo_model(ref[len(text_store.PREFIX):])
    if ref.startswith("zoo:"):
        return load_zoo_model(ref[len("zoo:"):])
    if ref.startswith("open_clip:"):
        return load_open_clip_text(ref, seed) if split_tower(ref)[1] == "text" else load_open_clip(ref, seed=seed)
    if ref.startswith("hf:") or (Path(ref).is_dir() and (Path(ref) / "config.json").exists()):
        return load_hf(ref, stream)
    if Path(ref).is_dir() and (Path(ref) / "adapter_config.json").is_file():
        raise TransportError(f"{ref}: a PEFT LoRA adapter, not a model: give it as --source-ft (or --task-vector) "
                             "with the model it adapts as --source-pre")
    return load_file_model(ref, arch, trust_pickle, stream)


def load_zoo_model(name: str, root: Optional[str | os.PathLike] = None) -> Model:
    """A model of the demo zoo (``A``, ``A+rot90``, ``B_next+invert``, ``W_grown@1``...), ref ``zoo:NAME@SEED``."""
    path, arch, canonical_ref = zoo.locate(name, root)
    model = load_file_model(str(path), arch)
    return model.with_params(model.params, ref=canonical_ref)


def load_text_zoo_model(name: str, root: Optional[str | os.PathLike] = None) -> Model:
    """A model of the text demo zoo (``A``, ``A+codeprose``, ``V_vocab@1``...): its Hugging Face directory, with
    the reference ``zoo:text/NAME@SEED`` and the architecture name the zoo's manifest records."""
    path, ref = text_store.locate(name, root)
    arch = text_store.arch_of(name, root)
    model = load_hf(str(path))
    if model.arch.differences(arch):
        raise TransportError(f"{path}: the directory does not hold the architecture the text zoo records "
                             f"({'; '.join(model.arch.differences(arch))})")
    return Model(arch, model.params, ref, model.head, model.zero_shot, {**model.meta, "zoo_dir": str(path)},
                 model.tokenizer)


def load_hf(ref: str, stream: bool = False) -> Model:
    """``hf:ORG/NAME`` or a HF directory -> Model (canonical tower, head / zero-shot when present); ``stream``:
    see :func:`load_model`."""
    directory = resolve_dir(ref)
    cfg = hf_common.load_config(directory)
    name = hf_common.arch_name(ref, directory)
    fam = families.for_model_type(getattr(cfg, "model_type", ""), name)
    fam.arch_from_config(cfg, directory, name, set())  # unsupported configurations fail before reading weights
    sd = read_weights(directory)
    arch = fam.arch_from_config(cfg, directory, name, set(sd))
    return fam.load_directory(directory, cfg, ref, sd, arch, stream=stream)


def _head_from_state(sd: Mapping[str, Tensor], md: Mapping[str, str], what: str) -> Optional[Classifier]:
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
    names = json.loads(md["classnames"]) if "classnames" in md else []
    return Classifier(w.float(), None if b is None else b.float(), normalize=normalize, classnames=names)


_DECODER_KEY = re.compile(r"(^|\.)(layers\.\d+\.(self_attn|mlp)\.|h\.\d+\.(attn|mlp)\.c_)")


def arch_hint(keys: Iterable[str]) -> str:
    """What ``--arch`` could be for a file holding ``keys``: a Hugging Face decoder's names
    (``model.layers.0.self_attn.q_proj.weight``, GPT-2's ``h.0.attn.c_attn.weight``) or an image tower's."""
    if any(_DECODER_KEY.search(k) for k in keys):
        return "--arch hf:ORG/NAME, a model directory or a config.json"
    return "e.g. open_clip:ViT-B-16"


def resolve_arch(path: str | os.PathLike, md: Mapping[str, str], arch: Optional[Arch],
                 keys: Iterable[str] = ()) -> Arch:
    """The architecture to read a file with: the one given, which must not contradict the one the file
    records (``arch`` metadata); else the recorded one. ``keys``: the file's tensor names (for the hint)."""
    recorded = Arch.from_json(md["arch"]) if "arch" in md else None
    if arch is None:
        if recorded is None:
            raise TransportError(f"{path}: the file does not say its architecture; pass --arch ({arch_hint(keys)})")
        return recorded
    if recorded is not None:
        diffs = [d.replace(" vs ", " in the file, ", 1) + " by --arch" for d in recorded.differences(arch)]
        if diffs:
            raise TransportError(f"{path}: --arch {arch.name} contradicts the architecture the file records "
                                 f"({recorded.name}): " + "; ".join(diffs))
    return arch


def load_file_model(path: str, arch: Optional[Arch], trust_pickle: bool = False, stream: bool = False) -> Model:
    """A checkpoint file -> Model: its tower (wherever the file keeps it), the head it carries, and the
    zero-shot heads of a text tower it holds too (an open_clip CLIP dict). A language model's safetensors file
    is read one tensor at a time; with ``stream`` any safetensors file stays in its file (see :func:`load_model`); with ``arch`` given, the model gets that architecture's tokenizer (the
    Hugging Face directory it names, or open_clip's own)."""
    given = arch
    sd, md = read_checkpoint(path, trust_pickle, lazy=True)
    arch = resolve_arch(path, md, arch, sd)
    fam = family_of(arch)
    if not (stream or getattr(fam, "streams", False)) and isinstance(sd, LazyWeights):
        sd, md = read_checkpoint(path, trust_pickle)
    head = _head_from_state(sd, md, str(path))
    streams = stream and isinstance(sd, LazyWeights)
    params = (fam.streamed(sd, arch, str(path)) if streams else
              {k: v.float() for k, v in to_canonical(sd, arch, what=str(path)).items()})
    zero_shot = fam.file_zero_shot(sd, arch, str(path))
    tokenizer = fam.file_tokenizer(arch, explicit=given is not None)
    return Model(arch, params, ref=str(path), head=head, zero_shot=zero_shot, meta=md, tokenizer=tokenizer)


def save_model(model: Model, path: str | os.PathLike, **meta: str) -> Path:
    """Write a model (family names + classifier + arch metadata) atomically and deterministically."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in from_canonical(model.params, model.arch).items()}
    md = {**model.meta, **{k: str(v) for k, v in meta.items()}, "arch": model.arch.to_json(), "ref": model.ref}
    if model.head is not None:
        tensors.update({k: v.detach().contiguous().cpu() for k, v in model.head.state().items()})
        md["classnames"] = json.dumps(model.head.classnames)
    return write_safetensors(path, tensors, md)


# ----------------------------------------------------------------------------------------------
# task vectors in a family's own names
# ----------------------------------------------------------------------------------------------
def _family_keys_for(arch: Arch, canon: set[str]) -> set[str]:
    """Family keys whose every canonical part is in ``canon``."""
    parts: dict[str, set[str]] = {}
    for e in family_of(arch).table.expand(arch):
        parts.setdefault(e.key, set()).add(e.canon)
    return {k for k, cs in parts.items() if cs <= canon}


def task_vector_state_dict(tau: TaskVector) -> dict[str, Tensor]:
    """tau's tensors in the architecture's own family names and shapes (fused keys re-fused)."""
    present = _family_keys_for(tau.arch, set(tau.tensors))
    full = {k: tau.tensors.get(k, torch.zeros(v.shape)) for k, v in param_axes(tau.arch).items()}
    return {k: v for k, v in from_canonical(full, tau.arch).items() if k in present}


SCALING_NOTE = "unscaled: the transported tau at alpha = 1; use theta_target + alpha * tau"


def scaling_metadata(alpha: float) -> dict[str, str]:
    """The one convention of every task-vector file this tool writes: the tensors are the transported tau at
    alpha = 1; ``alpha`` is the scaling that was chosen (or given) for it."""
    return {"alpha": repr(float(alpha)), "scaling": SCALING_NOTE}


def task_vector_bytes(tau: TaskVector, names_of: Optional[Mapping[str, str]] = None, full_model: bool = False,
                      **meta: str) -> bytes:
    """The safetensors file of :func:`save_task_vector`, in memory (for downloads)."""
    tensors, naming = checkpoint_state_dict(tau, names_of, full_model)
    md = {**tau.meta, **{k: str(v) for k, v in meta.items()}, "arch": tau.arch.to_json(), "names": naming,
          "format": "transport.task_vector", "transport_version": __version__}
    return safetensors_bytes({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, md)


def checkpoint_state_dict(tau: TaskVector, names_of: Optional[Mapping[str, str]] = None,
                          full_model: bool = False) -> tuple[dict[str, Tensor], str]:
    """tau under the names the checkpoint class of the model whose meta is ``names_of`` (the target's) loads,
    so ``module.load_state_dict({k: theta[k] + tau[k]})`` works on it; and a phrase naming that naming.
    ``full_model``: a whole CLIP model's names (``visual.*``) for an open_clip image tower."""
    return family_of(tau.arch).checkpoint_names(task_vector_state_dict(tau), names_of or {}, full_model)


def checkpoint_naming(arch: Arch, names_of: Optional[Mapping[str, str]] = None, full_model: bool = False) -> str:
    """The phrase :func:`checkpoint_state_dict` returns, without computing any tensor (refusals included)."""
    return family_of(arch).checkpoint_names({}, names_of or {}, full_model)[1]


def save_task_vector(tau: TaskVector, path: str | os.PathLike, names_of: Optional[Mapping[str, str]] = None,
                     full_model: bool = False, **meta: str) -> Path:
    """Write atomically in the target checkpoint's own names (see :func:`checkpoint_state_dict`); metadata:
    arch, version, the naming, and any string fields given."""
    return write_atomic(path, task_vector_bytes(tau, names_of, full_model, **meta))


def load_task_vector(path: str | os.PathLike, arch: Optional[Arch] = None, trust_pickle: bool = False) -> TaskVector:
    """Read a task vector: one :func:`save_task_vector` wrote, or family-named tensors in any form a checkpoint
    may take (safetensors or a ``weights_only`` .pt, wrapped, prefixed, a full CLIP dict's visual tower, an
    ImageClassifier's image encoder) plus an explicit ``arch``.

    Tensors the file lacks (e.g. only the transformer blocks were fine-tuned) are zero; their family names
    are in the result's ``absent``.
    """
    sd, md = read_checkpoint(path, trust_pickle)
    if arch is None and "arch" not in md:
        raise TransportError(f"{path}: no architecture in the file's metadata; pass --arch")
    arch = resolve_arch(path, md, arch, sd)
    fam = family_of(arch)
    table = fam.table
    tower = {table.alias(k): v for k, v in fam.tower(sd, arch).items()}
    shapes = fam.family_shapes(arch)
    tied = {e.key for e in table.expand(arch) if e.kind == "tied"}
    unknown = [k for k in tower if k not in shapes and not table.ignored(k)]
    if unknown:
        raise TransportError(f"{path}: unexpected keys for {arch.name}: {', '.join(unknown[:4])}"
                             + (f" (+{len(unknown) - 4} more)" if len(unknown) > 4 else ""))
    tower = {k: v for k, v in tower.items() if k in shapes}
    if not tower:
        raise TransportError(f"{path}: holds none of the tensors of {arch.name}")
    table.check_tensors(tower, arch, str(path), fam.squeezable)
    absent = [k for k in shapes if k not in tower and k not in tied]
    full = {k: tower[k].float() if k in tower else torch.zeros(shape) for k, shape in shapes.items() if k not in tied}
    canon = table.to_canonical(full, arch, what=str(path))
    tv = TaskVector(arch, canon, {k: v for k, v in md.items() if k not in ("arch",)})
    tv.absent = absent
    return tv


__all__ = ["load_model", "load_zoo_model", "load_text_zoo_model", "load_file_model", "load_hf", "save_model", "parse_arch",
           "hf_arch", "to_canonical",
           "from_canonical", "family_shapes", "hf_arch_from_config", "tower_state_dict", "family_of", "task_vector_state_dict",
           "save_task_vector", "checkpoint_state_dict", "checkpoint_naming", "load_task_vector", "task_vector_bytes",
           "resolve_arch", "scaling_metadata", "SCALING_NOTE", "tiny_arch", "open_clip_arch", "init_params",
           "hf_config_arch", "open_clip_text_arch"]
